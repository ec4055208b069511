"""Padded batches (flex_attention's seq_lens_q / seq_lens_kv) and packed sequences
(flex_attention_varlen) on cuDNN: cuDNN's seq_len tensors with the padding mask in the score_mod
(padded_batch.py). Checked against the float64 formula with the padding masked: out, lse and the
three gradients, at lengths that fill no tile (1, 127, 129), empty sequences and GQA; the padding
gets out 0, lse -inf and no gradient."""

import pytest
import torch

import cudnn_flex
import oracle
from cudnn_flex import dsl_mods, mods
from gpu_cases import check, make_inputs

pytestmark = pytest.mark.gpu

H, H_KV, D = 4, 2, 64
NEG_INF = float("-inf")
SOFTCAP = dsl_mods.Softcap(20.0)
SLOPES = mods.alibi_slopes(H)


def _where(keep, s):
    return torch.where(keep, s, torch.tensor(NEG_INF, dtype=s.dtype))


# name -> (flex_attention kwargs for a device, the formula of the scores)
MODS = {
    "none": (lambda device: {}, lambda s, b, h, q, kv: s),
    "causal": (lambda device: dict(mask_mod=mods.causal), lambda s, b, h, q, kv: _where(q >= kv, s)),
    "alibi": (lambda device: dict(score_mod=mods.alibi(SLOPES.to(device))),
              lambda s, b, h, q, kv: s + SLOPES.view(-1).double()[h] * (kv - q)),
    "dsl softcap with its bprop": (lambda device: dict(score_mod=SOFTCAP.forward, score_mod_bprop=SOFTCAP.backward),
                                   lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)),
    "softcap + window (a band)": (lambda device: dict(score_mod=mods.softcap(20.0), mask_mod=mods.sliding_window(50)),
                                  lambda s, b, h, q, kv: _where((q >= kv) & (q - kv < 50), 20.0 * torch.tanh(s / 20.0))),
}
# (padded Sq, padded Skv, [(q length, kv length) per batch element])
SHAPES = {
    "129x133": (129, 133, [(1, 1), (127, 129), (129, 127), (0, 5), (5, 0), (64, 133)]),
    "300x300": (300, 300, [(300, 300), (129, 257), (1, 300), (256, 128)]),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mod", MODS)
def test_padded_batch_matches_its_formula(mod, shape):
    s_q, s_kv, lengths = SHAPES[shape]
    kwargs, formula = MODS[mod]
    q, k, v = make_inputs(b=len(lengths), h=H, h_kv=H_KV, s_q=s_q, s_kv=s_kv, d=D, seed=11)
    len_q = torch.tensor([n for n, _ in lengths], dtype=torch.int32)
    len_kv = torch.tensor([n for _, n in lengths], dtype=torch.int32)
    out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs("cuda"), seq_lens_q=len_q.cuda(),
                                         seq_lens_kv=len_kv.cuda(), return_lse=True)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to("cuda", out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    got = {name: t.detach().double().cpu() for name, t in
           (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv))}

    def padded(s, b, h, q_idx, kv_idx):  # the formula, then the padding masked
        return _where((kv_idx < len_kv.long()[b]) & (q_idx < len_q.long()[b]), formula(s, b, h, q_idx, kv_idx))

    qf, kf, vf = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    want_out, want_lse = oracle.attention(qf, kf, vf, padded)
    grads = torch.autograd.grad(want_out, (qf, kf, vf), d_out.double().cpu())
    want = {"out": want_out.detach(), "lse": want_lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    check(got, want, label=f"{mod} {shape}")
    for i, (n_q, n_kv) in enumerate(lengths):  # the padding: exactly nothing
        assert torch.all(got["out"][i, :, n_q:] == 0) and torch.all(got["lse"][i, :, n_q:] == NEG_INF)
        assert torch.all(got["dq"][i, :, n_q:] == 0)
        assert torch.all(got["dk"][i, :, n_kv:] == 0) and torch.all(got["dv"][i, :, n_kv:] == 0)


def test_padding_values_do_not_reach_the_valid_rows():
    """What the padding holds changes no valid row: cuDNN reads the last partial tile, and its
    padding mask must keep those keys out. Finite values only: NaN in the padding reaches the
    valid rows on cuDNN (0 * NaN in P V; measured on the H200), as flex_attention documents."""
    lengths = [(100, 100), (129, 70)]
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=129, s_kv=133, d=D, seed=12)
    len_q = torch.tensor([n for n, _ in lengths], dtype=torch.int32, device="cuda")
    len_kv = torch.tensor([n for _, n in lengths], dtype=torch.int32, device="cuda")
    clean = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal, seq_lens_q=len_q, seq_lens_kv=len_kv)
    dirty = [t.detach().clone() for t in (q, k, v)]
    for i, (n_q, n_kv) in enumerate(lengths):
        for t, n in zip(dirty, (n_q, n_kv, n_kv)):
            t[i, :, n:] = 1e4 * torch.randn_like(t[i, :, n:])
    out = cudnn_flex.flex_attention(*dirty, mask_mod=mods.causal, seq_lens_q=len_q, seq_lens_kv=len_kv)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)


@pytest.mark.parametrize("mod", ["causal", "alibi"])
def test_packed_sequences_match_the_reference_path(mod):
    """flex_attention_varlen on cuDNN against the same call on the CPU reference path (float64),
    which test_varlen.py checks against one flex_attention call per sequence."""
    lengths = [1, 127, 129, 0, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(13)
    tokens = sum(lengths)
    host = [torch.randn(tokens, h, D, generator=g).to(torch.bfloat16) for h in (H, H_KV, H_KV)]
    d_out = torch.randn(tokens, H, D, generator=g).to(torch.bfloat16)
    kwargs = MODS[mod][0]
    results = {}
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float64)):
        q, k, v = (t.to(device, dtype).requires_grad_() for t in host)
        c = cu.to(device)
        out, lse = cudnn_flex.flex_attention_varlen(q, k, v, c, c, **kwargs(device), max_seqlen_q=300,
                                                    max_seqlen_kv=300, return_lse=True)
        grads = torch.autograd.grad(out, (q, k, v), d_out.to(device, dtype))
        results[device] = {name: t.detach().double().cpu() for name, t in
                           zip(("out", "lse", "dq", "dk", "dv"), (out, lse) + grads)}
    errs = check(results["cuda"], results["cpu"], label=f"varlen {mod}")
    assert set(errs) == {"out", "lse", "dq", "dk", "dv"}


def test_a_padded_batch_builds_its_graphs_once():
    """The lengths are runtime data: new lengths reuse the graphs (no rebuild per batch)."""
    q, k, v = make_inputs(b=2, h=H, h_kv=H_KV, s_q=129, s_kv=129, d=D, seed=14)
    cudnn_flex.flex_attention(q, k, v, seq_lens_q=torch.tensor([3, 129], dtype=torch.int32, device="cuda"),
                              seq_lens_kv=torch.tensor([3, 129], dtype=torch.int32, device="cuda")).sum().backward()
    builds = cudnn_flex.cache_stats()["builds"]
    for n in (1, 64, 128):
        lengths = torch.tensor([n, 129 - n], dtype=torch.int32, device="cuda")
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths, seq_lens_kv=lengths).sum().backward()
    assert cudnn_flex.cache_stats()["builds"] == builds
