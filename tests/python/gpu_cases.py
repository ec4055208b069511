"""Inputs and the float32 reference shared by the GPU tests and the GPU report."""

import math

import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods, reference

TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}


def make_inputs(b=2, h=4, h_kv=None, s_q=128, s_kv=None, d=64, dtype=torch.bfloat16, layout="bhsd", seed=0):
    """Fresh random q, k, v (never zeros) in `layout`, requiring grad."""
    h_kv = h_kv or h
    s_kv = s_kv or s_q
    g = torch.Generator(device="cuda").manual_seed(seed)
    perm = TO_BHSD[layout]
    inv = tuple(sorted(range(4), key=lambda i: perm[i]))

    def one(heads, seq):
        bhsd = torch.randn(b, heads, seq, d, device="cuda", generator=g)
        return bhsd.permute(inv).contiguous().to(dtype).requires_grad_()

    return one(h, s_q), one(h_kv, s_kv), one(h_kv, s_kv)


def identity(graph, score, tensors):
    return score


def run_both(q, k, v, score_mod=None, score_mod_bprop=None, tensors=None, layout="bhsd", scale=None,
             deterministic=False):
    """(cudnn, reference) results: each a dict of out, lse, dq, dk, dv (float32, BHSD).
    A score_mod_bprop gets the same tensors as the score_mod."""
    perm = TO_BHSD[layout]
    g = torch.Generator(device="cuda").manual_seed(123)
    bprop_tensors = tensors if score_mod_bprop is not None and tensors else None
    out, lse = cudnn_flex.flex_attention(q, k, v, score_mod, score_mod_bprop, tensors, bprop_tensors,
                                         scale=scale, layout=layout, return_lse=True,
                                         deterministic=deterministic)
    d_out = torch.randn(out.shape, device="cuda", generator=g).to(out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    got = {"out": out.permute(perm), "lse": lse, "dq": dq.permute(perm), "dk": dk.permute(perm),
           "dv": dv.permute(perm)}

    qf, kf, vf = (t.detach().float().permute(perm).requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = reference.attention(qf, kf, vf, score_mod, tensors, scale)
    rdq, rdk, rdv = torch.autograd.grad(ref_out, (qf, kf, vf), d_out.float().permute(perm))
    want = {"out": ref_out, "lse": ref_lse, "dq": rdq, "dk": rdk, "dv": rdv}
    return {k: v.float() for k, v in got.items()}, want


def rel_err(a, b):
    """max |a - b| / max |b|: one number per tensor, fit for bf16/fp16 against float32."""
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    return ((a - b)[finite].abs().max() / b[finite].abs().max().clamp_min(1e-6)).item()


def errors(got, want):
    return {k: rel_err(got[k], want[k]) for k in want}


TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}

MODS = {
    "none": dict(),
    "identity": dict(score_mod=identity),
    "causal": dict(score_mod=dsl_mods.causal),
    "softcap": "softcap",
    "relative_bias": dict(score_mod=dsl_mods.relative_bias),
    "alibi": "alibi",
}


def mod_args(name, h):
    if name == "softcap":
        cap = dsl_mods.Softcap(2.0)  # small cap so that the tanh really bends the scores
        return dict(score_mod=cap.forward, score_mod_bprop=cap.backward)
    if name == "alibi":
        slopes = mods.alibi_slopes(h, "cuda")
        return dict(score_mod=dsl_mods.alibi, tensors={"slopes": slopes})
    return dict(MODS[name])


def bias_pattern(mask, b, h, s_q, s_kv, seed=0):
    """A random bias of the broadcast pattern mask (B, H, Sq, Skv present or 1)."""
    shape = [n if keep else 1 for keep, n in zip(mask, (b, h, s_q, s_kv))]
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(shape, device="cuda", generator=g)


ALL_PATTERNS = [tuple(bool(i >> (3 - j) & 1) for j in range(4)) for i in range(16)]


def pattern_name(mask):
    return "".join(c if keep else "1" for c, keep in zip("BHQK", mask))
