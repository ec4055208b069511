"""Inputs, expected values and tolerances of the GPU tests.

cudnn-flex on the GPU is compared with oracle.attention on the CPU in float64, on the very values
cuDNN saw (q, k, v, dO rounded to bf16/fp16, score_mod tensors as passed), with the score_mod as
a formula: written out in mod_cases.py for the ready mods, or the DSL evaluated on torch by
dsl_torch.py for DSL score_mods. Nothing here calls cudnn_flex's reference path. Importing this
module needs no GPU (the CPU tests of the probes read its tolerances).
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch

import cudnn_flex
import dsl_torch
import oracle
from cases import (ALL_PATTERNS, FROM_BHSD, TO_BHSD, in_layout, pattern_name,  # noqa: F401  (re-exported)
                   pattern_shape)

# out, dq, dk, dv: max |got - expected| / max |expected| per tensor. bf16 keeps 8 bits (relative
# rounding 2^-9) and cuDNN rounds P to bf16 before P V and dS before dS K, dS^T Q: a few 1e-3,
# up to ~1e-2 on gradients.
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
# lse is float32 (cuDNN's Stats) computed from the same rounded q and k as the expected value, so
# no bf16 error enters it: float32 sums over the head dim (~1e-6 of |S|), cuDNN's exp2/log2
# (~2^-22 relative) and approximate transcendental ops inside a score_mod (an approximate tanh
# errs by up to ~5e-4, times a softcap's cap of 2.5 is ~1e-3). An absolute 5e-3 covers those with
# margin; a normaliser wrong by 1% (log 1.01 = 1e-2) fails it. (The old check, 2e-2 relative to
# max |lse| ~ 5-10, let errors of 0.1-0.2 pass.)
LSE_ATOL = 5e-3
NAMES = ("out", "lse", "dq", "dk", "dv")


def make_inputs(b=2, h=4, h_kv=None, s_q=128, s_kv=None, d=64, d_v=None, dtype=torch.bfloat16,
                layout="bhsd", seed=0, device="cuda"):
    """Fresh random q, k, v (standard normal, drawn on the CPU from `seed`) in `layout` on
    `device`, requiring grad. s_kv=0 or b=0 give empty tensors."""
    h_kv = h_kv or h
    s_kv = s_q if s_kv is None else s_kv
    g = torch.Generator().manual_seed(seed)

    def one(heads, seq, dim):
        bhsd = torch.randn(b, heads, seq, dim, generator=g)
        return in_layout(bhsd, layout).to(device=device, dtype=dtype).requires_grad_()

    return one(h, s_q, d), one(h_kv, s_kv, d), one(h_kv, s_kv, d_v or d)


def _moved(obj, device, seen):
    """obj with the CPU tensors it holds (also in closures and tuples) moved to `device`, as a
    copy: mod_cases builds its mods on the CPU. A one-element CPU tensor is a host scalar passed
    by value and stays; float64 becomes float32 (cuDNN takes no float64 score_mod tensors)."""
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cpu" and obj.numel() == 1:
            return obj
        return obj.to(device=device, dtype=torch.float32 if obj.dtype == torch.float64 else obj.dtype)
    if isinstance(obj, dict):
        return {k: _moved(v, device, seen) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_moved(v, device, seen) for v in obj)
    if isinstance(obj, types.FunctionType):
        # Its closure cells, and the module globals it names, may hold tensors.
        names = [n for n in obj.__code__.co_names if isinstance(obj.__globals__.get(n), torch.Tensor)]
        if not obj.__closure__ and not names:
            return obj
        glob = dict(obj.__globals__) if names else obj.__globals__
        copy = types.FunctionType(obj.__code__, glob, obj.__name__, obj.__defaults__,
                                  tuple(types.CellType() for _ in obj.__closure__ or ()))
        copy.__kwdefaults__, copy.__qualname__ = obj.__kwdefaults__, obj.__qualname__
        copy.__dict__.update(obj.__dict__)
        seen[id(obj)] = copy
        for new, old in zip(copy.__closure__ or (), obj.__closure__ or ()):
            new.cell_contents = _moved(old.cell_contents, device, seen)
        for n in names:
            glob[n] = _moved(obj.__globals__[n], device, seen)
        return copy
    return obj


def on_device(kwargs: dict, device="cuda") -> dict:
    """flex_attention kwargs (from mod_cases or a test) with their tensors on `device`."""
    return _moved(kwargs, device, {})


def compare(q, k, v, formula: Optional[Callable] = None, *, layout="bhsd", deterministic=False,
            d_out_seed=123, attention: Optional[Callable] = None, **kwargs):
    """(got, want): dicts of out, lse, dq, dk, dv (float64, CPU, BHSD) from
    attention(q, k, v, **kwargs) (cudnn_flex.flex_attention, or a compiled form of it) on the
    GPU and from oracle.attention with `formula` on the same rounded q, k, v and dO. A `scale` in
    kwargs is the formula's too."""
    perm = TO_BHSD[layout]
    cpu = lambda t: t.detach().permute(perm).double().cpu()  # noqa: E731
    attention = attention or cudnn_flex.flex_attention
    out, lse = attention(q, k, v, layout=layout, return_lse=True, deterministic=deterministic,
                         **on_device(kwargs, q.device))
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(d_out_seed))
    d_out = d_out.to(device=out.device, dtype=out.dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    got = {"out": cpu(out), "lse": lse.detach().double().cpu(), "dq": cpu(dq), "dk": cpu(dk), "dv": cpu(dv)}

    qf, kf, vf = (cpu(t).requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = oracle.attention(qf, kf, vf, formula, scale=kwargs.get("scale"))
    grads = torch.autograd.grad(ref_out, (qf, kf, vf), cpu(d_out))
    want = {"out": ref_out.detach(), "lse": ref_lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    return got, want


def with_gradients(out, lse, qkv, d_out) -> dict:
    """out, lse and the gradients of q, k, v for d_out, in float64 on the CPU (BHSD tensors; for
    calls compare() cannot make: the same mod objects twice, the shortcut's repeat)."""
    dq, dk, dv = torch.autograd.grad(out, qkv, d_out)
    return {name: t.detach().double().cpu() for name, t in
            (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv))}


def formula_results(qkv, d_out, formula: Optional[Callable]) -> dict:
    """What with_gradients should give: oracle.attention with `formula`, float64 on the CPU, on
    the same rounded q, k, v and dO."""
    qf, kf, vf = (t.detach().double().cpu().requires_grad_() for t in qkv)
    out, lse = oracle.attention(qf, kf, vf, formula)
    grads = torch.autograd.grad(out, (qf, kf, vf), d_out.double().cpu())
    return {"out": out.detach(), "lse": lse.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def dsl_formula(score_mod, tensors=None):
    """The expected-value formula of a DSL score_mod (dsl_torch), or None for no score_mod."""
    return None if score_mod is None else dsl_torch.formula(score_mod, tensors)


def errors(got: dict, want: dict) -> dict:
    """Per tensor: max |got - want| / max(max |want|, 1e-3) (lse: max |got - want|, absolute). inf where
    the non-finite positions differ (an lse of -inf must be -inf on both sides)."""
    out = {}
    for name in want:
        a, b = got[name], want[name]
        if a.shape != b.shape:
            out[name] = float("inf")
            continue
        finite = torch.isfinite(b)
        if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], b[~finite]):
            out[name] = float("inf")
            continue
        if not finite.any():
            out[name] = 0.0
            continue
        diff = (a - b)[finite].abs().max()
        # Relative to the largest expected value, or to 1e-3 where all are smaller: a gradient
        # that is exactly 0 (a row with one key: softmax of one score is constant) is met to
        # ~1e-6 in bf16, which is no relative error.
        out[name] = (diff if name == "lse" else diff / b[finite].abs().max().clamp_min(1e-3)).item()
    return out


def check(got: dict, want: dict, dtype=torch.bfloat16, tol: Optional[float] = None, lse_atol: float = LSE_ATOL,
          label: str = "") -> dict:
    """Asserts errors(got, want) within tol (relative, out and gradients) and lse_atol (lse)."""
    tol = TOL[dtype] if tol is None else tol
    errs = errors(got, want)
    bad = {k: e for k, e in errs.items() if not e <= (lse_atol if k == "lse" else tol)}
    assert not bad, f"{label}: over tolerance (rel {tol}, lse abs {lse_atol}): {bad}; all: {errs}"
    return errs


def bias_pattern(mask, b, h, s_q, s_kv, seed=0):
    """A random float32 bias of the broadcast pattern mask (B, H, Sq, Skv present or 1), on the
    CPU: move it where it is used."""
    return torch.randn(pattern_shape(mask, b, h, s_q, s_kv), generator=torch.Generator().manual_seed(seed))
