"""cudnn_flex.mods and cudnn_flex.dsl_mods against their formulas written out in the test.

Every ready mod runs through flex_attention(backend="reference") in float64 and is compared with
oracle.attention (softmax of the formula applied to a materialized q k^T, times v): out, lse, and
the gradients of q, k and v (autograd on both sides). Shapes include odd lengths, Sq != Skv,
GQA and a value head dim different from the query head dim.
"""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from mod_cases import READY_MODS, check_against_formula, make_qkv
from oracle import ALIBI_SLOPES

# (B, H_q, H_kv, Sq, Skv, D, Dv)
SHAPES = {
    "7x7": (2, 4, 4, 7, 7, 8, 8),
    "1x1_gqa": (1, 4, 2, 1, 1, 8, 8),
    "33x33_gqa": (1, 4, 2, 33, 33, 8, 8),
    "7x12_gqa_dv4": (2, 4, 2, 7, 12, 8, 4),
    "12x7_gqa_dv16": (1, 4, 2, 12, 7, 4, 16),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", READY_MODS)
def test_ready_mod_matches_its_formula(name, shape):
    b, h_q, _, s_q, s_kv, _, _ = shape
    kwargs, formula = READY_MODS[name](b, h_q, s_q, s_kv)
    check_against_formula(shape, kwargs, formula)


# --- ALiBi slopes pinned to literal numbers -----------------------------------------------------

@pytest.mark.parametrize("heads", sorted(ALIBI_SLOPES))
def test_alibi_slopes_are_the_standard_numbers(heads):
    slopes = mods.alibi_slopes(heads)
    assert slopes.shape == (1, heads, 1, 1) and slopes.dtype == torch.float32
    assert slopes.flatten().tolist() == ALIBI_SLOPES[heads]
    as_double = mods.alibi_slopes(heads, dtype=torch.float64)
    assert as_double.dtype == torch.float64 and as_double.flatten().tolist() == ALIBI_SLOPES[heads]
    assert dsl_mods.alibi_slopes(heads).flatten().tolist() == ALIBI_SLOPES[heads]


@pytest.mark.parametrize("style", ["torch", "dsl"])
def test_alibi_with_eight_heads_and_gqa_uses_the_query_head_slope(style):
    shape = (1, 8, 2, 9, 9, 8, 8)
    slopes = torch.tensor(ALIBI_SLOPES[8], dtype=torch.float64)
    if style == "torch":
        kwargs = dict(score_mod=mods.alibi(mods.alibi_slopes(8)))
    else:
        kwargs = dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": mods.alibi_slopes(8)})
    check_against_formula(shape, kwargs, lambda s, b, h, q, kv: s + slopes[h] * (kv - q))


# --- one family, two dialects: the same name and arguments mean the same attention --------------

def _dsl_softcap(cap):
    mod = dsl_mods.softcap(cap)
    return dict(score_mod=mod.forward, score_mod_bprop=mod.backward)


# family -> (torch-style kwargs, DSL kwargs), both made from the same name and arguments.
DIALECTS = {
    "causal": (dict(mask_mod=mods.causal), dict(score_mod=dsl_mods.causal)),
    "sliding_window(3)": (dict(mask_mod=mods.sliding_window(3)), dict(score_mod=dsl_mods.sliding_window(3))),
    "softcap(2.5)": (dict(score_mod=mods.softcap(2.5)), _dsl_softcap(2.5)),
    "relative_bias()": (dict(score_mod=mods.relative_bias()), dict(score_mod=dsl_mods.relative_bias())),
    "relative_bias(0.375)": (dict(score_mod=mods.relative_bias(0.375)), dict(score_mod=dsl_mods.relative_bias(0.375))),
    "alibi": (dict(score_mod=mods.alibi(mods.alibi_slopes(4))),
              dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": mods.alibi_slopes(4)})),
}


def test_every_dsl_family_has_a_torch_style_form_of_the_same_name():
    families = {n for n in dsl_mods.__all__ if n.islower()} - {"add_bias", "alibi_slopes"}  # DSL-only helpers
    assert families <= set(mods.__all__)
    assert families == {name.split("(")[0] for name in DIALECTS}


@pytest.mark.parametrize("family", DIALECTS)
def test_both_dialects_of_a_family_compute_the_same_attention(family):
    torch_kwargs, dsl_kwargs = DIALECTS[family]
    results = []
    for kwargs in (torch_kwargs, dsl_kwargs):
        q, k, v = make_qkv((2, 4, 2, 9, 11, 8, 8))
        out, lse = cudnn_flex.flex_attention(q, k, v, return_lse=True, backend="reference", **kwargs)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((out, lse) + grads)
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# --- the hand-written bprop of dsl_mods.Softcap -------------------------------------------------

@pytest.mark.parametrize("cap", [0.5, 2.5, 30.0])
def test_dsl_softcap_backward_is_the_derivative_of_its_forward(cap):
    soft = dsl_mods.softcap(cap)
    assert cudnn_flex.check_score_mod_bprop(soft.forward, soft.backward, shape=(2, 3, 5, 7)) < 1e-12
    # and the derived one agrees with it
    assert cudnn_flex.check_score_mod_bprop(soft.forward, None, shape=(2, 3, 5, 7)) < 1e-12


# --- fully masked rows --------------------------------------------------------------------------

def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradients():
    # Sq > Skv with a window of 2: queries 8..11 see no key of the 7.
    q, k, v = make_qkv((1, 2, 2, 12, 7, 4, 4))
    out, lse = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.sliding_window(2), return_lse=True,
                                         backend="reference")
    assert torch.equal(out[:, :, 8:], torch.zeros_like(out[:, :, 8:]))
    assert (lse[:, :, 8:] == float("-inf")).all() and torch.isfinite(lse[:, :, :8]).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.equal(dq[:, :, 8:], torch.zeros_like(dq[:, :, 8:]))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))


# --- error branches of mods.py and dsl_mods.py --------------------------------------------------

@pytest.mark.parametrize("make,arg", [
    (lambda: mods.sliding_window(0), "window"),
    (lambda: mods.sliding_window(-3), "window"),
    (lambda: mods.softcap(0.0), "cap"),
    (lambda: mods.softcap(-1.0), "cap"),
    (lambda: mods.softcap(float("nan")), "cap"),
    (lambda: mods.document_mask(torch.zeros(2, 3, 4, dtype=torch.long)), "doc_ids"),
    (lambda: mods.document_mask(torch.tensor(3)), "doc_ids"),
    (lambda: dsl_mods.softcap(0.0), "cap"),
    (lambda: dsl_mods.softcap(-2.0), "cap"),
    (lambda: dsl_mods.sliding_window(0), "window"),
])
def test_mod_factories_refuse_bad_arguments_naming_them(make, arg):
    with pytest.raises(ValueError, match=rf"^cudnn_flex: .*\b{arg}\b") as info:
        make()
    assert "got" in str(info.value)
