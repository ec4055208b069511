"""Inference: forwards under torch.no_grad() and torch.inference_mode(), as a server runs them.
Checked against the float64 formula at lengths that fill no tile, one query row, padded batches
and packed sequences whose lengths are inference tensors (no version counter to remember a
host read by), and compiled."""

import pytest
import torch

import cudnn_flex
import oracle
from gpu_cases import check, make_inputs
from length_mods import H, MODS, where_kept

pytestmark = pytest.mark.gpu

H_KV, D = 2, 64
CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _formula(q, k, v, score):
    qf, kf, vf = (t.detach().double().cpu() for t in (q, k, v))
    out, lse = oracle.attention(qf, kf, vf, score)
    return out, lse


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("s_q,s_kv", [(127, 129), (129, 300), (1, 129)])
@pytest.mark.parametrize("mod", MODS)
def test_inference_forward_matches_its_formula(mod, s_q, s_kv, context):
    kwargs, formula = MODS[mod]
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, d=D, seed=21)
    want_out, want_lse = _formula(q, k, v, formula)
    with CONTEXTS[context]():
        out = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"))
        out_with_lse, lse = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"), return_lse=True)
    assert not out.requires_grad
    check({"out": out.double().cpu(), "out (lse asked for)": out_with_lse.double().cpu(), "lse": lse.double().cpu()},
          {"out": want_out, "out (lse asked for)": want_out, "lse": want_lse}, label=f"{mod} {s_q}x{s_kv}")


def test_padded_batch_and_packed_sequences_in_inference_mode():
    """Lengths made in inference mode are inference tensors: they have no version counter, so
    they are read on every call (_validation.once_per_version)."""
    lengths = [(1, 1), (127, 129), (0, 5), (129, 127)]
    q, k, v = make_inputs(b=len(lengths), h=H, h_kv=H_KV, s_q=129, s_kv=129, d=D, seed=23)
    len_q = torch.tensor([n for n, _ in lengths], dtype=torch.int32)
    len_kv = torch.tensor([n for _, n in lengths], dtype=torch.int32)
    kwargs, formula = MODS["alibi"]

    def padded(s, b, h, q_idx, kv_idx):
        return where_kept((kv_idx < len_kv.long()[b]) & (q_idx < len_q.long()[b]), formula(s, b, h, q_idx, kv_idx))

    want_out, _ = _formula(q, k, v, padded)
    with torch.inference_mode():
        out = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"), seq_lens_q=len_q.cuda(), seq_lens_kv=len_kv.cuda())
        assert out.is_inference()
    check({"out": out.double().cpu()}, {"out": want_out}, label="padded")
    for i, (n_q, _) in enumerate(lengths):
        assert torch.all(out[i, :, n_q:] == 0)

    # The same sequences packed: varlen's ragged path, one output row per token.
    def packed(t, which):
        return torch.cat([t[i, :, :n[which]].transpose(0, 1) for i, n in enumerate(lengths)]).detach()

    cu = [torch.tensor([0] + [sum(n[w] for n in lengths[:i + 1]) for i in range(len(lengths))], dtype=torch.int32,
                       device="cuda") for w in (0, 1)]
    with torch.inference_mode():
        cu = [c.clone() for c in cu]  # inference tensors
        out_packed = cudnn_flex.flex_attention_varlen(packed(q, 0), packed(k, 1), packed(v, 1), cu[0], cu[1],
                                                      **kwargs("cuda"), max_seqlen_q=129, max_seqlen_kv=129)
    want_packed = torch.cat([want_out[i, :, :n_q].transpose(0, 1) for i, (n_q, _) in enumerate(lengths)])
    check({"out": out_packed.double().cpu()}, {"out": want_packed}, label="packed")


def test_compiled_inference_matches_eager():
    kwargs, formula = MODS["dsl softcap with its bprop"]  # DSL: torch-style mods compile from torch 2.14 on
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=129, s_kv=129, d=D, seed=24)

    @torch.compile(fullgraph=True)
    def attend(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"))

    with torch.no_grad():
        compiled = attend(q, k, v)
        eager = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"))
    assert torch.equal(compiled, eager)
    want_out, _ = _formula(q, k, v, formula)
    check({"out": compiled.double().cpu()}, {"out": want_out}, label="compiled")
