"""One case table for the ready mods (cudnn_flex.mods and cudnn_flex.dsl_mods): each case is the
flex_attention arguments that use a mod and the mod's formula written out in torch ops, for
oracle.attention. Usable by CPU (reference path, float64) and GPU (cuDNN) tests alike.

A case is a function (B, H_q, Sq, Skv) -> (kwargs for flex_attention, formula(s, b, h, q, kv));
a `scale` in the kwargs is the scale of the formula's scores too.
check_against_formula runs such a case on the CPU reference path in float64.
Slopes are literal numbers (oracle.ALIBI_SLOPES), never the library's alibi_slopes, and every
formula indexes by the index grids rather than relying on broadcasting. Tensors a case passes are
exactly representable in float32 or are compared in float64 on both sides.
"""

from __future__ import annotations

import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from oracle import ALIBI_SLOPES, NEG_INF, attention

# Packed documents: segment lengths written out (40 positions, enough for Sq, Skv <= 40).
DOC = torch.repeat_interleave(torch.arange(7), torch.tensor([3, 2, 5, 1, 7, 15, 7]))
DOC_PER_BATCH = torch.stack([DOC, torch.repeat_interleave(torch.arange(5), torch.tensor([1, 9, 4, 20, 6]))])
MAX_LEN = 40


def _where(cond, s):
    return torch.where(cond, s, NEG_INF)


def _slopes(h_q: int) -> torch.Tensor:
    return torch.tensor(ALIBI_SLOPES[h_q], dtype=torch.float64)


def _random(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _same(mod_kwargs, formula):
    # a new dict per call: a test that pops from it leaves the next test's intact
    return lambda b, h_q, s_q, s_kv: (dict(mod_kwargs), formula)


def _alibi_slopes_tensor(b, h_q, s_q, s_kv):
    sl = _slopes(h_q)
    return dict(score_mod=mods.alibi(sl.float())), lambda s, b_, h, q, kv: s + sl[h] * (kv - q)


def _alibi_standard(b, h_q, s_q, s_kv):
    sl = _slopes(h_q)
    return dict(score_mod=mods.alibi(mods.alibi_slopes(h_q))), lambda s, b_, h, q, kv: s + sl[h] * (kv - q)


def _alibi_sliding(b, h_q, s_q, s_kv):
    sl = _slopes(h_q)
    return (dict(score_mod=mods.alibi(mods.alibi_slopes(h_q)), mask_mod=mods.sliding_window(4)),
            lambda s, b_, h, q, kv: _where((q - kv >= 0) & (q - kv < 4), s + sl[h] * (kv - q)))


def _dsl_alibi(b, h_q, s_q, s_kv):
    sl = _slopes(h_q)
    return (dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": sl.view(1, h_q, 1, 1)}),
            lambda s, b_, h, q, kv: s + sl[h] * (kv - q))


def _bias_full(b, h_q, s_q, s_kv):
    t = _random((b, h_q, s_q, s_kv), 1)
    return dict(score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": t}), lambda s, b_, h, q, kv: s + t[b_, h, q, kv]


def _bias_heads(b, h_q, s_q, s_kv):  # [H, 1, 1]: three dims
    t = _random((h_q, 1, 1), 2)
    return (dict(score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": t}),
            lambda s, b_, h, q, kv: s + t.view(-1)[h])


def _bias_keys(b, h_q, s_q, s_kv):  # [Skv]: one dim
    t = _random((s_kv,), 3)
    return dict(score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": t}), lambda s, b_, h, q, kv: s + t[kv]


def _bias_queries(b, h_q, s_q, s_kv):  # [Sq, 1]: two dims
    t = _random((s_q, 1), 4)
    return (dict(score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": t}),
            lambda s, b_, h, q, kv: s + t.view(-1)[q])


def _bias_host_scalar(b, h_q, s_q, s_kv):  # one-element CPU tensor: passed by value
    return (dict(score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": torch.tensor([0.75])}),
            lambda s, b_, h, q, kv: s + 0.75)


def _dsl_softcap(b, h_q, s_q, s_kv):
    cap = dsl_mods.softcap(2.5)
    return dict(score_mod=cap.forward, score_mod_bprop=cap.backward), lambda s, b_, h, q, kv: 2.5 * torch.tanh(s / 2.5)


def _first_key(b, h, q_idx, kv_idx):
    return kv_idx == 0


def _sliding(w):
    return lambda s, b, h, q, kv: _where((q - kv >= 0) & (q - kv < w), s)


READY_MODS = {
    # mask_mods
    "causal": _same(dict(mask_mod=mods.causal), lambda s, b, h, q, kv: _where(q >= kv, s)),
    "sliding_window_1": _same(dict(mask_mod=mods.sliding_window(1)), lambda s, b, h, q, kv: _where(q == kv, s)),
    "sliding_window_3": _same(dict(mask_mod=mods.sliding_window(3)), _sliding(3)),
    "prefix_lm_3": _same(dict(mask_mod=mods.prefix_lm(3)), lambda s, b, h, q, kv: _where((kv < 3) | (kv <= q), s)),
    "document_mask": _same(dict(mask_mod=mods.document_mask(DOC)),
                           lambda s, b, h, q, kv: _where(DOC[q] == DOC[kv], s)),
    "document_mask_per_batch": _same(dict(mask_mod=mods.document_mask(DOC_PER_BATCH)),
                                     lambda s, b, h, q, kv: _where(DOC_PER_BATCH[b, q] == DOC_PER_BATCH[b, kv], s)),
    "and_masks": _same(dict(mask_mod=mods.and_masks(mods.causal, mods.document_mask(DOC), mods.sliding_window(6))),
                       lambda s, b, h, q, kv: _where((q >= kv) & (DOC[q] == DOC[kv]) & (q - kv < 6), s)),
    "or_masks": _same(dict(mask_mod=mods.or_masks(mods.sliding_window(2), mods.document_mask(DOC), _first_key)),
                      lambda s, b, h, q, kv: _where(((q - kv >= 0) & (q - kv < 2)) | (DOC[q] == DOC[kv]) | (kv == 0), s)),
    # score_mods
    "softcap": _same(dict(score_mod=mods.softcap(2.5)), lambda s, b, h, q, kv: 2.5 * torch.tanh(s / 2.5)),
    "alibi": _alibi_slopes_tensor,
    "alibi_standard_slopes": _alibi_standard,
    "relative_bias": _same(dict(score_mod=mods.relative_bias()), lambda s, b, h, q, kv: s + (q - kv)),
    "relative_bias_scaled": _same(dict(score_mod=mods.relative_bias(0.375)),
                                  lambda s, b, h, q, kv: s + 0.375 * (q - kv)),
    "compose_bias_then_softcap": _same(dict(score_mod=mods.compose(mods.relative_bias(0.5), mods.softcap(2.0))),
                                       lambda s, b, h, q, kv: 2.0 * torch.tanh((s + 0.5 * (q - kv)) / 2.0)),
    "compose_softcap_masked": _same(dict(score_mod=mods.compose(mods.softcap(2.0), mods.masked(mods.sliding_window(4)))),
                                    lambda s, b, h, q, kv: _where((q - kv >= 0) & (q - kv < 4), 2.0 * torch.tanh(s / 2.0))),
    "masked_prefix_lm": _same(dict(score_mod=mods.masked(mods.prefix_lm(2))),
                              lambda s, b, h, q, kv: _where((kv < 2) | (kv <= q), s)),
    # a score_mod with a mask_mod
    "softcap_causal": _same(dict(score_mod=mods.softcap(2.5), mask_mod=mods.causal),
                            lambda s, b, h, q, kv: _where(q >= kv, 2.5 * torch.tanh(s / 2.5))),
    "alibi_sliding_window": _alibi_sliding,
    # an explicit scale
    "scale_relative_bias": _same(dict(score_mod=mods.relative_bias(0.25), scale=0.3),
                                 lambda s, b, h, q, kv: s + 0.25 * (q - kv)),
    # dsl_mods
    "dsl_causal": _same(dict(score_mod=dsl_mods.causal), lambda s, b, h, q, kv: _where(q >= kv, s)),
    "dsl_relative_bias": _same(dict(score_mod=dsl_mods.relative_bias()), lambda s, b, h, q, kv: s + (q - kv)),
    "dsl_relative_bias_scaled": _same(dict(score_mod=dsl_mods.relative_bias(0.375)),
                                      lambda s, b, h, q, kv: s + 0.375 * (q - kv)),
    "dsl_alibi": _dsl_alibi,
    "dsl_add_bias_full": _bias_full,
    "dsl_add_bias_heads_3d": _bias_heads,
    "dsl_add_bias_keys_1d": _bias_keys,
    "dsl_add_bias_queries_2d": _bias_queries,
    "dsl_add_bias_host_scalar": _bias_host_scalar,
    "dsl_softcap": _dsl_softcap,
    "dsl_sliding_window_1": _same(dict(score_mod=dsl_mods.sliding_window(1)), _sliding(1)),
    "dsl_sliding_window_3": _same(dict(score_mod=dsl_mods.sliding_window(3)), _sliding(3)),
}


def make_qkv(shape, seed=0):
    """float64 q, k, v requiring grad; q scaled by 2 so that scores reach the softcaps."""
    b, h_q, h_kv, s_q, s_kv, d, d_v = shape
    g = torch.Generator().manual_seed(seed)
    q = 2.0 * torch.randn(b, h_q, s_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, s_kv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, s_kv, d_v, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v)]


def check_against_formula(shape, kwargs, formula, seed=0):
    """flex_attention(**kwargs) on the reference path equals oracle.attention(formula): out, lse,
    dq, dk, dv, in float64."""
    q, k, v = make_qkv(shape, seed)
    out, lse = cudnn_flex.flex_attention(q, k, v, return_lse=True, backend="reference", **kwargs)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    exp_out, exp_lse = attention(q2, k2, v2, formula, scale=kwargs.get("scale"))
    assert out.dtype == torch.float64 and out.shape == exp_out.shape
    torch.testing.assert_close(out, exp_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse.double(), exp_lse, rtol=1e-9, atol=1e-9)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), d_out)
    expected = torch.autograd.grad(exp_out, (q2, k2, v2), d_out)
    for name, got, exp in zip("qkv", grads, expected):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")
