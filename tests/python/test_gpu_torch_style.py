"""Torch-style mods on cuDNN against torch.nn.attention.flex_attention on the same mod (GPU).

Each case runs cudnn_flex in bf16 (automatic bprop: no score_mod_bprop is given) and torch's
flex_attention in float32 on the same inputs and mod; out, dq, dk, dv must agree to bf16 accuracy.
"""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import cudnn_flex
from cudnn_flex import dsl_mods, mods

pytestmark = pytest.mark.gpu

B, H, H_KV, S, D = 2, 4, 2, 256, 64


def doc_ids(batched=False):
    g = torch.Generator().manual_seed(3)
    cuts = torch.sort(torch.randint(1, S, (3,), generator=g)).values
    ids = torch.bucketize(torch.arange(S), cuts, right=True)
    ids = torch.stack([ids, ids.flip(0).max() - ids.flip(0)]) if batched else ids
    return ids.cuda()


def torch_style_cases():
    slopes = mods.alibi_slopes(H, device="cuda").reshape(H)
    bias = torch.randn(B, H, device="cuda")
    table = torch.randn(H, S, S, device="cuda") * 0.5
    docs, docs_batched = doc_ids(), doc_ids(batched=True)

    def bias_bh(score, b, h, q_idx, kv_idx):
        return score + bias[b, h]

    def table_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx, kv_idx]

    def gemma2(score, b, h, q_idx, kv_idx):  # softcap then a sliding window, as in Gemma 2
        score = torch.tanh(score / 10.0) * 10.0
        return torch.where((q_idx - kv_idx < 64) & (q_idx >= kv_idx), score, -float("inf"))

    def exp_log(score, b, h, q_idx, kv_idx):
        return torch.log(torch.exp(score * 0.5) + 1.0) * 2.0

    return {
        "causal": (None, mods.causal),
        "sliding_window": (None, mods.sliding_window(48)),
        "prefix_lm": (None, mods.prefix_lm(40)),
        "document_mask": (None, mods.document_mask(docs)),
        "document_mask_per_batch": (None, mods.document_mask(docs_batched)),
        "alibi": (mods.alibi(slopes), None),
        "softcap": (mods.softcap(5.0), None),
        "relative_bias": (mods.relative_bias(0.02), None),
        "softcap_sliding_window": (mods.softcap(5.0), mods.sliding_window(64)),
        "alibi_causal": (mods.alibi(slopes), mods.causal),
        "document_causal": (None, mods.and_masks(mods.causal, mods.document_mask(docs))),
        "prefix_or_window": (None, mods.or_masks(mods.prefix_lm(16), mods.sliding_window(32))),
        "bias_per_batch_head": (bias_bh, None),
        "table_bias": (table_bias, None),
        "gemma2_inline": (gemma2, None),
        "exp_log_chain": (exp_log, None),
    }


CASES = [
    "causal", "sliding_window", "prefix_lm", "document_mask", "document_mask_per_batch", "alibi",
    "softcap", "relative_bias", "softcap_sliding_window", "alibi_causal", "document_causal",
    "prefix_or_window", "bias_per_batch_head", "table_bias", "gemma2_inline", "exp_log_chain"]


def torch_flex(q, k, v, score_mod, mask_mod):
    # torch's eager flex_attention compiles its HOP per mod; a fresh dynamo keeps the many mods of
    # this file (and compile tests on the same worker) under its recompile limit.
    torch._dynamo.reset()
    block_mask = create_block_mask(mask_mod, B, H, S, S, device="cuda") if mask_mod else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)


def inputs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, S, D, device="cuda", generator=g)
    k = torch.randn(B, H_KV, S, D, device="cuda", generator=g)
    v = torch.randn(B, H_KV, S, D, device="cuda", generator=g)
    d_out = torch.randn(B, H, S, D, device="cuda", generator=g)
    return q, k, v, d_out


def run(fn, q, k, v, d_out, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), d_out.to(dtype))
    return [out.float()] + [g.float() for g in grads]


def assert_matches(got, want, label):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((g - w).abs().max() / w.abs().max().clamp_min(1e-6)).item()
        assert err < 2e-2, f"{label}: {name} relative error {err:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_torch_style_mod_matches_torch_flex_attention(case):
    score_mod, mask_mod = torch_style_cases()[case]
    q, k, v, d_out = inputs(seed=CASES.index(case))
    got = run(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, score_mod, mask_mod=mask_mod),
              q, k, v, d_out, torch.bfloat16)
    want = run(lambda q, k, v: torch_flex(q, k, v, score_mod, mask_mod), q, k, v, d_out, torch.float32)
    assert_matches(got, want, case)


def test_second_call_with_new_captured_values_builds_nothing():
    q, k, v, d_out = inputs(seed=99)
    first = mods.document_mask(doc_ids())
    run(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, mask_mod=first), q, k, v, d_out, torch.bfloat16)
    builds = cudnn_flex.cache_stats()["builds"]
    other = doc_ids(batched=True)[1]
    second = mods.document_mask(other)
    got = run(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, mask_mod=second), q, k, v, d_out, torch.bfloat16)
    assert cudnn_flex.cache_stats()["builds"] == builds
    want = run(lambda q, k, v: torch_flex(q, k, v, None, second), q, k, v, d_out, torch.float32)
    assert_matches(got, want, "new doc ids")


def test_automatic_bprop_matches_the_hand_written_one():
    q, k, v, d_out = inputs(seed=7)
    cap = dsl_mods.Softcap(5.0)
    hand = run(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward),
               q, k, v, d_out, torch.bfloat16)
    auto = run(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, dsl_mods.Softcap(5.0).forward),
               q, k, v, d_out, torch.bfloat16)
    torch_style = run(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, mods.softcap(5.0)),
                      q, k, v, d_out, torch.bfloat16)
    for a, b, c in zip(hand, auto, torch_style):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a, c, atol=2e-2, rtol=2e-2)
