"""Hypothesis over shapes, layouts, dtypes, GQA ratios, scales and score_mods on the CPU (reference
path and argument checks).

Valid input must give the result: out and lse equal to oracle.attention (the formula written out),
and gradients equal to autograd of it, including empty batches and sequences (B, Sq or Skv = 0:
out zeros, lse -inf, gradients zeros) and a value head dim different from the query head dim.
Invalid input (a bad layout, H_q not a multiple of H_kv, head dim 0, a non-finite scale) must
raise the documented ValueError for one of its faults, and nothing else.
"""

import math
import warnings

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from oracle import NEG_INF, attention

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings, strategies as st  # noqa: E402

ORDER = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (2, 0, 1, 3), "bad": (0, 1, 2, 3)}
TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3), "bad": (0, 1, 2, 3)}
MODS = {
    "none": (dict(), None),
    "dsl_causal": (dict(score_mod=dsl_mods.causal), lambda s, b, h, q, kv: torch.where(q >= kv, s, NEG_INF)),
    "dsl_relative_bias": (dict(score_mod=dsl_mods.relative_bias()), lambda s, b, h, q, kv: s + (q - kv)),
    "dsl_sliding_window_2": (dict(score_mod=dsl_mods.sliding_window(2)),
                             lambda s, b, h, q, kv: torch.where((q - kv >= 0) & (q - kv < 2), s, NEG_INF)),
    "softcap_causal": (dict(score_mod=mods.softcap(1.5), mask_mod=mods.causal),
                       lambda s, b, h, q, kv: torch.where(q >= kv, 1.5 * torch.tanh(s / 1.5), NEG_INF)),
}
# Tolerances by dtype: (out, lse, gradients). bfloat16 rounds the output; lse stays float32.
TOLERANCE = {torch.float64: (1e-9, 1e-9, 1e-9), torch.float32: (1e-5, 1e-5, 1e-4), torch.bfloat16: (2e-2, 1e-5, None)}


def documented_errors(layout, h_q, h_kv, d, scale):
    """The documented refusals this input deserves (it gets one of them)."""
    errors = []
    if layout == "bad":
        errors.append(r"layout must be one of 'bhsd', 'bshd', 'sbhd', got 'bad'")
    if h_q % h_kv:
        errors.append(rf"the number of query heads \({h_q}\) must be a multiple of the number of key/value heads \({h_kv}\)")
    if d == 0:
        errors.append(r"q and k have head dim 0")
    if scale is not None and not math.isfinite(scale):
        errors.append(r"scale must be a finite number, got nan")
    return errors


@settings(max_examples=150, deadline=None)
@given(b=st.integers(0, 2), h_kv=st.integers(1, 3), ratio=st.integers(1, 3), s_q=st.integers(0, 9),
       s_kv=st.integers(0, 9), d=st.sampled_from([0, 1, 4, 8]), d_v=st.sampled_from([1, 3, 8]),
       layout=st.sampled_from(list(ORDER)), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       mod=st.sampled_from(list(MODS)), h_q_extra=st.integers(0, 1), scale=st.sampled_from([None, 0.5, float("nan")]))
# The empty and d_v != d cases always run:
@example(b=0, h_kv=2, ratio=2, s_q=5, s_kv=6, d=4, d_v=3, layout="bshd", dtype=torch.float64, mod="dsl_causal",
         h_q_extra=0, scale=None)
@example(b=2, h_kv=1, ratio=3, s_q=0, s_kv=6, d=4, d_v=8, layout="sbhd", dtype=torch.float64, mod="softcap_causal",
         h_q_extra=0, scale=0.5)
@example(b=2, h_kv=2, ratio=1, s_q=5, s_kv=0, d=8, d_v=3, layout="bhsd", dtype=torch.float64, mod="dsl_relative_bias",
         h_q_extra=0, scale=None)
@example(b=1, h_kv=2, ratio=2, s_q=0, s_kv=0, d=1, d_v=1, layout="bshd", dtype=torch.float32, mod="none",
         h_q_extra=0, scale=None)
@example(b=2, h_kv=3, ratio=2, s_q=7, s_kv=9, d=8, d_v=3, layout="sbhd", dtype=torch.float32, mod="dsl_sliding_window_2",
         h_q_extra=0, scale=0.5)
@example(b=1, h_kv=1, ratio=1, s_q=3, s_kv=3, d=0, d_v=3, layout="bhsd", dtype=torch.float64, mod="none",
         h_q_extra=0, scale=None)
def test_valid_input_gives_the_result_and_invalid_input_a_documented_error(
        b, h_kv, ratio, s_q, s_kv, d, d_v, layout, dtype, mod, h_q_extra, scale):
    h_q = h_kv * ratio + h_q_extra  # sometimes not a multiple: must be refused
    g = torch.Generator().manual_seed(b * 1000 + s_q * 100 + s_kv * 10 + d)
    q_bhsd = torch.randn(b, h_q, s_q, d, generator=g, dtype=torch.float64).to(dtype)
    k_bhsd = torch.randn(b, h_kv, s_kv, d, generator=g, dtype=torch.float64).to(dtype)
    v_bhsd = torch.randn(b, h_kv, s_kv, d_v, generator=g, dtype=torch.float64).to(dtype)
    q, k, v = (t.permute(ORDER[layout]).contiguous().requires_grad_() for t in (q_bhsd, k_bhsd, v_bhsd))
    kwargs, formula = MODS[mod]
    errors = documented_errors(layout, h_q, h_kv, d, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        if errors:
            with pytest.raises(ValueError, match=r"^cudnn_flex: (" + "|".join(errors) + ")"):
                cudnn_flex.flex_attention(q, k, v, scale=scale, layout=layout, return_lse=True, **kwargs)
            return
        out, lse = cudnn_flex.flex_attention(q, k, v, scale=scale, layout=layout, return_lse=True, **kwargs)

    out_tol, lse_tol, grad_tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == tuple((b, h_q, s_q, d_v)[i] for i in ORDER[layout])
    assert lse.shape == (b, h_q, s_q) and lse.dtype in ((torch.float64, torch.float32) if dtype == torch.float64
                                                         else (torch.float32,))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q_bhsd, k_bhsd, v_bhsd))
    expected, expected_lse = attention(q64, k64, v64, formula, scale=scale)
    got = out.permute(TO_BHSD[layout]).double()
    torch.testing.assert_close(got, expected, rtol=out_tol, atol=out_tol)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=lse_tol, atol=lse_tol)
    if s_kv == 0:
        assert torch.equal(out, torch.zeros_like(out)) and (lse == NEG_INF).all()
    if grad_tol is None:
        return
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), d_out.double().permute(TO_BHSD[layout]))
    for got_grad, exp_grad in zip(grads, expected_grads):
        assert got_grad.shape == tuple(exp_grad.shape[i] for i in ORDER[layout])
        torch.testing.assert_close(got_grad.permute(TO_BHSD[layout]).double(), exp_grad, rtol=grad_tol, atol=grad_tol)
        if 0 in (b, s_q, s_kv):
            assert not got_grad.any()
