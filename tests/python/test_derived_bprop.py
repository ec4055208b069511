"""The bprop cudnn-flex derives from a score_mod's ops, rule by rule, against autograd.

check_score_mod_bprop(score_mod, None, ...) runs the score_mod and the derived bprop on the
reference graph in float64 and compares with autograd of the score_mod (raising
BpropMismatchError). Every derivative rule is exercised with the score in each operand position;
functions that need a positive argument get |score| + 0.5. Torch-style mods: their CPU gradients
against autograd of the formula written out in the test.
"""

import math

import pytest
import torch

import cudnn_flex
from cudnn_flex import mods
from oracle import NEG_INF, attention

SHAPE = (2, 3, 5, 7)  # [B, H, Sq, Skv]
_g = torch.Generator().manual_seed(7)
BIAS = torch.randn(SHAPE, generator=_g, dtype=torch.float64)
POSITIVE = torch.rand(SHAPE, generator=_g, dtype=torch.float64) + 0.5
HEAD_BIAS = torch.randn(1, SHAPE[1], 1, 1, generator=_g, dtype=torch.float64)
TENSORS = {"bias": BIAS, "pos": POSITIVE, "head": HEAD_BIAS}


def pos(g, s):
    """|s| + 0.5: a positive function of the score."""
    return g.add(g.abs(s), 0.5)


def causal_mask(g, s):
    return g.cmp_ge(g.gen_index(s, 2), g.gen_index(s, 3))


# name -> score_mod(graph, score, tensors); t["bias"], t["pos"] (> 0), t["head"] [1, H, 1, 1]
CASES = {
    # unary rules
    "sin": lambda g, s, t: g.sin(s),
    "cos": lambda g, s, t: g.cos(s),
    "tan": lambda g, s, t: g.tan(g.mul(s, 0.1)),
    "erf": lambda g, s, t: g.erf(g.mul(s, 0.5)),
    "rsqrt": lambda g, s, t: g.rsqrt(pos(g, s)),
    "sqrt": lambda g, s, t: g.sqrt(pos(g, s)),
    "reciprocal": lambda g, s, t: g.reciprocal(pos(g, s)),
    "reciprocal_signed": lambda g, s, t: g.reciprocal(g.add(s, 40.0)),
    "exp": lambda g, s, t: g.exp(g.mul(s, 0.5)),
    "log": lambda g, s, t: g.log(pos(g, s)),
    "tanh": lambda g, s, t: g.tanh(s),
    "sigmoid": lambda g, s, t: g.sigmoid(s),
    "abs": lambda g, s, t: g.abs(s),
    "neg": lambda g, s, t: g.neg(s),
    "identity": lambda g, s, t: g.mul(g.identity(s), 1.5),
    "gelu": lambda g, s, t: g.gelu(s),
    "elu": lambda g, s, t: g.elu(s),
    "softplus": lambda g, s, t: g.softplus(s),
    "gelu_approx_tanh": lambda g, s, t: g.gelu_approx_tanh(s),
    "relu": lambda g, s, t: g.relu(s),
    "relu_clipped": lambda g, s, t: g.relu(s, lower_clip=-1.0, upper_clip=2.0),
    "leaky_relu": lambda g, s, t: g.leaky_relu(s, 0.1),
    "swish": lambda g, s, t: g.swish(s, swish_beta=1.5),
    "floor_times_score": lambda g, s, t: g.mul(g.floor(s), s),   # floor has gradient 0
    "ceil_plus_score": lambda g, s, t: g.add(g.ceil(s), g.mul(s, 0.5)),
    # pow: score as base, as exponent, both
    "pow_base_number_exponent": lambda g, s, t: g.pow(pos(g, s), 2.5),
    "pow_base_integer_exponent": lambda g, s, t: g.pow(s, 3.0),
    "pow_base_tensor_exponent": lambda g, s, t: g.pow(pos(g, s), t["bias"]),
    "pow_exponent_number_base": lambda g, s, t: g.pow(1.5, g.mul(s, 0.5)),
    "pow_exponent_tensor_base": lambda g, s, t: g.pow(t["pos"], s),
    "pow_both": lambda g, s, t: g.pow(pos(g, s), g.mul(s, 0.3)),
    # max / min: score first, second, both
    "max_score_first": lambda g, s, t: g.max(s, 0.5),
    "max_score_second": lambda g, s, t: g.max(t["bias"], s),
    "max_both": lambda g, s, t: g.max(s, g.mul(s, 0.5)),
    "min_score_first": lambda g, s, t: g.min(s, t["bias"]),
    "min_score_second": lambda g, s, t: g.min(-0.5, s),
    "min_both": lambda g, s, t: g.min(g.mul(s, 0.5), s),
    # div: numerator, denominator, both
    "div_numerator": lambda g, s, t: g.div(s, 2.5),
    "div_numerator_tensor": lambda g, s, t: g.div(s, t["pos"]),
    "div_denominator": lambda g, s, t: g.div(1.5, pos(g, s)),
    "div_denominator_tensor": lambda g, s, t: g.div(t["bias"], pos(g, s)),
    "div_both": lambda g, s, t: g.div(s, pos(g, s)),
    # mul, sub, add: each position, both
    "mul_score_first": lambda g, s, t: g.mul(s, t["bias"]),
    "mul_score_second": lambda g, s, t: g.mul(0.7, s),
    "mul_both": lambda g, s, t: g.mul(s, s),
    "sub_score_first": lambda g, s, t: g.sub(s, t["bias"]),
    "sub_score_second": lambda g, s, t: g.sub(0.7, s),
    "sub_score_second_tensor": lambda g, s, t: g.sub(t["bias"], g.mul(s, 2.0)),
    "sub_both": lambda g, s, t: g.sub(g.mul(s, 3.0), g.mul(s, s)),
    "add_tensor_bias": lambda g, s, t: g.mul(g.add(s, t["bias"]), 2.0),
    "add_tensor_first": lambda g, s, t: g.mul(g.add(t["head"], s), 2.0),
    "add_both": lambda g, s, t: g.add(s, g.mul(s, s)),
    "add_square_score_first": lambda g, s, t: g.add_square(s, t["bias"]),
    "add_square_score_second": lambda g, s, t: g.add_square(t["bias"], s),
    "add_square_both": lambda g, s, t: g.add_square(s, s),
    "bias_op": lambda g, s, t: g.mul(g.bias(s, t["bias"]), 0.5),
    "scale_op": lambda g, s, t: g.scale(s, 0.3),
    "mod_score_first": lambda g, s, t: g.mod(s, 1.5),
    # binary_select: finite fills, -inf fills, score in each branch, both
    "select_finite_fill": lambda g, s, t: g.binary_select(g.mul(s, 2.0), 0.5, g.cmp_gt(s, 0.0)),
    "select_finite_fill_first": lambda g, s, t: g.binary_select(0.5, g.mul(s, 2.0), g.cmp_gt(s, 0.0)),
    "select_tensor_fill": lambda g, s, t: g.binary_select(g.mul(s, 2.0), t["bias"], causal_mask(g, s)),
    "select_minus_inf_fill": lambda g, s, t: g.binary_select(g.mul(s, 2.0), NEG_INF, causal_mask(g, s)),
    "select_minus_inf_first": lambda g, s, t: g.binary_select(NEG_INF, g.tanh(s), g.cmp_lt(g.gen_index(s, 2), g.gen_index(s, 3))),
    "select_huge_finite_fill": lambda g, s, t: g.binary_select(g.mul(s, 2.0), -1e30, causal_mask(g, s)),
    "select_float32_min_fill": lambda g, s, t: g.binary_select(g.mul(s, 2.0), -3.4028234663852886e38, causal_mask(g, s)),
    "select_both": lambda g, s, t: g.binary_select(g.tanh(s), g.mul(s, s), g.cmp_gt(s, 0.0)),
    "select_leaky": lambda g, s, t: g.binary_select(s, g.mul(s, 0.1), g.cmp_ge(s, 0.0)),
    # chains
    "softcap_chain": lambda g, s, t: g.mul(g.tanh(g.div(s, 2.0)), 2.0),
    "softcap_alibi_causal": lambda g, s, t: g.binary_select(
        g.add(g.mul(g.tanh(g.div(s, 3.0)), 3.0), g.mul(g.sub(g.gen_index(s, 3), g.gen_index(s, 2)), t["head"])),
        NEG_INF, causal_mask(g, s)),
    "tanh_times_score": lambda g, s, t: g.mul(g.tanh(s), s),
    "exp_sin_times_cos": lambda g, s, t: g.mul(g.exp(g.sin(s)), g.cos(s)),
    "log_sigmoid": lambda g, s, t: g.log(g.sigmoid(s)),
    "sqrt_of_square_plus_one": lambda g, s, t: g.sqrt(g.add(g.mul(s, s), 1.0)),
    "rsqrt_div_erf": lambda g, s, t: g.div(g.erf(g.mul(s, 0.3)), g.rsqrt(pos(g, s))),
    "operators": lambda g, s, t: (s * 0.5 - 1.0) / (abs(s) + 1.0) + (-s) ** 2.0,
    "score_used_four_times": lambda g, s, t: g.add(g.mul(g.sin(s), g.cos(s)), g.max(s, g.neg(s))),
}


@pytest.mark.parametrize("name", CASES)
def test_derived_bprop_matches_autograd(name):
    err = cudnn_flex.check_score_mod_bprop(CASES[name], None, TENSORS, shape=SHAPE)
    assert err < 1e-9


@pytest.mark.parametrize("name", CASES)
def test_case_is_finite_and_depends_on_the_score(name):
    """Guards the table: the check skips non-finite positions and is empty for a constant mod,
    so each case must give finite attention that changes with the scores."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(SHAPE[0], SHAPE[1], n, 4, generator=g, dtype=torch.float64)
               for n in (SHAPE[2], SHAPE[3], SHAPE[3]))
    kwargs = dict(score_mod_tensors=TENSORS, backend="reference", scale=3.0)
    out = cudnn_flex.flex_attention(q, k, v, CASES[name], **kwargs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, cudnn_flex.flex_attention(q * 0.5, k, v, CASES[name], **kwargs))


def test_a_wrong_derivative_is_caught():
    """The comparison can fail: the true derivative of sin(s) is cos(s), a bprop giving sin(s) is refused."""
    with pytest.raises(cudnn_flex.BpropMismatchError, match="disagrees"):
        cudnn_flex.check_score_mod_bprop(CASES["sin"], lambda g, d_p, t: g.mul(d_p, g.sin(d_p)), shape=SHAPE)


@pytest.mark.parametrize("name,mod", [
    ("mod_score_second", lambda g, s, t: g.mod(1.5, s)),
    ("tanh_backward", lambda g, s, t: g.add(s, g.tanh_backward(s, s))),
    ("gelu_backward", lambda g, s, t: g.gelu_backward(s, s)),
])
def test_op_without_a_derivative_rule_is_not_derivable(name, mod):
    with pytest.raises(cudnn_flex.BpropNotDerivable, match=r"^cudnn_flex: .*score_mod_bprop"):
        cudnn_flex.check_score_mod_bprop(mod, None, shape=SHAPE)


# --- torch-style mods: CPU gradients against autograd of the written-out formula --------------

SLOPES = torch.tensor([0.5, -0.25, 0.125, 1.0])


def sin_bias(score, b, h, q_idx, kv_idx):
    return torch.sin(score) + SLOPES[h] * (q_idx - kv_idx) / 4.0


def ratio(score, b, h, q_idx, kv_idx):
    return score / (torch.abs(score) + 1.0) * 3.0


def max_min(score, b, h, q_idx, kv_idx):
    return torch.minimum(torch.maximum(score, score * 0.25), 2.0 - score * 0.5)


def pow_exp(score, b, h, q_idx, kv_idx):
    return (torch.abs(score) + 0.5) ** 1.5 - torch.exp(score * 0.25)


TORCH_STYLE = {
    "softcap": (mods.softcap(1.5), lambda s, b, h, q, kv: 1.5 * torch.tanh(s / 1.5)),
    "sin_bias": (sin_bias, lambda s, b, h, q, kv: torch.sin(s) + SLOPES.double()[h] * (q - kv) / 4.0),
    "ratio": (ratio, lambda s, b, h, q, kv: s / (s.abs() + 1.0) * 3.0),
    "max_min": (max_min, lambda s, b, h, q, kv: torch.minimum(torch.maximum(s, s * 0.25), 2.0 - s * 0.5)),
    "pow_exp": (pow_exp, lambda s, b, h, q, kv: (s.abs() + 0.5) ** 1.5 - torch.exp(s * 0.25)),
    "softcap_sliding_window": (mods.compose(mods.softcap(2.0), mods.masked(mods.sliding_window(3))),
                               lambda s, b, h, q, kv: torch.where((q - kv >= 0) & (q - kv < 3),
                                                                  2.0 * torch.tanh(s / 2.0), NEG_INF)),
}


@pytest.mark.parametrize("name", TORCH_STYLE)
def test_torch_style_gradients_match_autograd_of_the_formula(name):
    score_mod, formula = TORCH_STYLE[name]
    g = torch.Generator().manual_seed(11)
    q = (3.0 * torch.randn(2, 4, 9, 8, generator=g, dtype=torch.float64)).requires_grad_()
    k = torch.randn(2, 2, 11, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 2, 11, 6, generator=g, dtype=torch.float64).requires_grad_()
    out = cudnn_flex.flex_attention(q, k, v, score_mod, backend="reference")
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected, _ = attention(q2, k2, v2, formula)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for got, exp in zip(torch.autograd.grad(out, (q, k, v), d_out), torch.autograd.grad(expected, (q2, k2, v2), d_out)):
        torch.testing.assert_close(got, exp, rtol=1e-9, atol=1e-9)
    assert math.isfinite(out.sum().item())
