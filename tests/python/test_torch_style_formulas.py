"""Torch-style constructs against the same formula evaluated by plain torch on the materialized
scores (reference path, float64): out, lse and the gradients of q, k, v.

Each score_mod / mask_mod below is traced by cudnn-flex into its graph DSL; its formula is the
same expression written with torch ops on [B, H, Sq, Skv] scores and index grids. A construct
mapped to the wrong op (maximum and minimum swapped, a reversed comparison, `a - b` as `b - a`,
an integer division, a captured tensor indexed along the wrong axis) fails here.
"""

import pytest
import torch

import cudnn_flex
from mod_cases import check_against_formula
from oracle import NEG_INF

# (B, H_q, H_kv, Sq, Skv, D, Dv): odd lengths, Sq != Skv both ways, GQA, Dv != D
SHAPES = {"7x12_gqa_dv6": (2, 4, 2, 7, 12, 8, 6), "9x5": (1, 4, 4, 9, 5, 8, 8)}
_g = torch.Generator().manual_seed(5)
HEAD = torch.tensor([0.5, -0.25, 0.125, 1.0])                             # [H]
PER_BATCH_HEAD = torch.randn(2, 4, generator=_g)                          # [B, H]
PER_QUERY = torch.randn(12, generator=_g)                                 # [S]
TABLE = torch.randn(4, 12, 12, generator=_g)                              # [H, S, S]
FULL = torch.randn(2, 4, 12, 12, generator=_g)                            # [B, H, S, S]
POSITIONS = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])           # int64 [S]
SCALAR = torch.tensor(0.625)                                              # one element: by value
D = {name: t.double() for name, t in dict(HEAD=HEAD, PER_BATCH_HEAD=PER_BATCH_HEAD, PER_QUERY=PER_QUERY,
                                          TABLE=TABLE, FULL=FULL, POSITIONS=POSITIONS).items()}


def where(cond, a, b):
    return torch.where(cond, a, b)


# name -> (score_mod, mask_mod, formula(s, b, h, q, kv)); the score_mods use the torch-style
# signature (score, b, h, q_idx, kv_idx), the mask_mods (b, h, q_idx, kv_idx).
CASES = {
    # clamp, maximum, minimum
    "clamp_min": (lambda s, b, h, q, kv: torch.clamp(s, min=-0.5), None, lambda s, b, h, q, kv: s.clamp(min=-0.5)),
    "clamp_max": (lambda s, b, h, q, kv: torch.clamp(s, max=0.75), None, lambda s, b, h, q, kv: s.clamp(max=0.75)),
    "clamp_both_positional": (lambda s, b, h, q, kv: torch.clamp(s, -1.0, 1.5), None,
                              lambda s, b, h, q, kv: s.clamp(-1.0, 1.5)),
    "maximum": (lambda s, b, h, q, kv: torch.maximum(s, (q - kv) * 0.25), None,
                lambda s, b, h, q, kv: torch.maximum(s, (q - kv) * 0.25)),
    "minimum": (lambda s, b, h, q, kv: torch.minimum(s, (kv - q) * 0.25 + 1.0), None,
                lambda s, b, h, q, kv: torch.minimum(s, (kv - q) * 0.25 + 1.0)),
    "maximum_captured_first": (lambda s, b, h, q, kv: torch.maximum(TABLE[h, q, kv], s), None,
                               lambda s, b, h, q, kv: torch.maximum(D["TABLE"][h, q, kv], s)),
    "minimum_captured_first": (lambda s, b, h, q, kv: torch.minimum(TABLE[h, q, kv], s), None,
                               lambda s, b, h, q, kv: torch.minimum(D["TABLE"][h, q, kv], s)),
    # pow in each position
    "square": (lambda s, b, h, q, kv: s ** 2 * 0.25, None, lambda s, b, h, q, kv: s ** 2 * 0.25),
    "pow_base": (lambda s, b, h, q, kv: torch.pow(torch.abs(s) + 0.5, 1.5), None,
                 lambda s, b, h, q, kv: torch.pow(s.abs() + 0.5, 1.5)),
    "pow_exponent_rpow": (lambda s, b, h, q, kv: 2.0 ** (s * 0.5), None, lambda s, b, h, q, kv: 2.0 ** (s * 0.5)),
    "pow_both": (lambda s, b, h, q, kv: (torch.abs(s) + 0.5) ** (s * 0.25), None,
                 lambda s, b, h, q, kv: (s.abs() + 0.5) ** (s * 0.25)),
    # unary functions
    "sin": (lambda s, b, h, q, kv: torch.sin(s) * 2.0, None, lambda s, b, h, q, kv: torch.sin(s) * 2.0),
    "cos": (lambda s, b, h, q, kv: torch.cos(s) * 2.0, None, lambda s, b, h, q, kv: torch.cos(s) * 2.0),
    "tan": (lambda s, b, h, q, kv: torch.tan(s * 0.2), None, lambda s, b, h, q, kv: torch.tan(s * 0.2)),
    "erf": (lambda s, b, h, q, kv: torch.erf(s) * 2.0, None, lambda s, b, h, q, kv: torch.erf(s) * 2.0),
    "floor": (lambda s, b, h, q, kv: torch.floor(s * 2.0) / 2.0 + s * 0.1, None,
              lambda s, b, h, q, kv: torch.floor(s * 2.0) / 2.0 + s * 0.1),
    "ceil": (lambda s, b, h, q, kv: torch.ceil(s) - s * 0.1, None, lambda s, b, h, q, kv: torch.ceil(s) - s * 0.1),
    "rsqrt": (lambda s, b, h, q, kv: torch.rsqrt(torch.abs(s) + 0.25), None,
              lambda s, b, h, q, kv: torch.rsqrt(s.abs() + 0.25)),
    "sqrt_reciprocal": (lambda s, b, h, q, kv: torch.sqrt(abs(s) + 1.0) + torch.reciprocal(torch.abs(s) + 1.0), None,
                        lambda s, b, h, q, kv: torch.sqrt(s.abs() + 1.0) + 1.0 / (s.abs() + 1.0)),
    "exp_log_sigmoid": (lambda s, b, h, q, kv: torch.log(torch.sigmoid(s)) + torch.exp(s * 0.2), None,
                        lambda s, b, h, q, kv: torch.log(torch.sigmoid(s)) + torch.exp(s * 0.2)),
    "abs_neg": (lambda s, b, h, q, kv: -abs(s) * 0.5 + torch.neg(s), None, lambda s, b, h, q, kv: -s.abs() * 0.5 - s),
    # operators whose operand order matters
    "rsub": (lambda s, b, h, q, kv: 1.0 - s * 0.5, None, lambda s, b, h, q, kv: 1.0 - s * 0.5),
    "rtruediv": (lambda s, b, h, q, kv: 2.0 / (torch.abs(s) + 1.0), None, lambda s, b, h, q, kv: 2.0 / (s.abs() + 1.0)),
    "functional_forms": (lambda s, b, h, q, kv: torch.div(torch.sub(torch.mul(s, 3), torch.add(s, 1)), 2), None,
                         lambda s, b, h, q, kv: ((s * 3) - (s + 1)) / 2),
    "fmod": (lambda s, b, h, q, kv: s + torch.fmod(s, 1.5), None, lambda s, b, h, q, kv: s + torch.fmod(s, 1.5)),
    "python_remainder": (lambda s, b, h, q, kv: s + s % 1.5, None, lambda s, b, h, q, kv: s + torch.remainder(s, 1.5)),
    "torch_remainder_of_indices": (lambda s, b, h, q, kv: s + torch.remainder(q - kv, 3) * 0.5, None,
                                   lambda s, b, h, q, kv: s + torch.remainder(q - kv, 3) * 0.5),
    "floor_division_of_indices": (lambda s, b, h, q, kv: s + (q - kv) // 2 * 0.5, None,
                                  lambda s, b, h, q, kv: s + torch.div(q - kv, 2, rounding_mode="floor") * 0.5),
    "index_true_division": (lambda s, b, h, q, kv: s + (q - kv) / 2, None, lambda s, b, h, q, kv: s + (q - kv) / 2.0),
    "index_arithmetic_ints": (lambda s, b, h, q, kv: s * 2 + (kv * 3 - q) * 0.125 + 1, None,
                              lambda s, b, h, q, kv: s * 2 + (kv * 3 - q) * 0.125 + 1),
    # comparisons, torch.where, ~, &, |
    "where_score_condition": (lambda s, b, h, q, kv: torch.where(s > 0, s, s * 0.1), None,
                              lambda s, b, h, q, kv: where(s > 0, s, s * 0.1)),
    "where_numbers": (lambda s, b, h, q, kv: s + torch.where(q >= kv, 0.5, -1.5), None,
                      lambda s, b, h, q, kv: s + where(q >= kv, 0.5, -1.5)),
    "where_number_first": (lambda s, b, h, q, kv: torch.where(kv > q, NEG_INF, s), None,
                           lambda s, b, h, q, kv: where(kv > q, NEG_INF, s)),
    "reflected_comparison": (lambda s, b, h, q, kv: torch.where(0.5 >= s, s, 1.0 - s), None,
                             lambda s, b, h, q, kv: where(s <= 0.5, s, 1.0 - s)),
    "captured_compared_first": (lambda s, b, h, q, kv: torch.where(TABLE[h, q, kv] < s, s, -s), None,
                                lambda s, b, h, q, kv: where(D["TABLE"][h, q, kv] < s, s, -s)),
    "torch_gt_captured_first": (lambda s, b, h, q, kv: torch.where(torch.gt(TABLE[h, q, kv], s), s * 2.0, s), None,
                                lambda s, b, h, q, kv: where(D["TABLE"][h, q, kv] > s, s * 2.0, s)),
    "invert_mask": (None, lambda b, h, q, kv: ~(kv > q), lambda s, b, h, q, kv: where(~(kv > q), s, NEG_INF)),
    "invert_in_score_mod": (lambda s, b, h, q, kv: torch.where(~(q < kv) & ~(q - kv > 2), s, NEG_INF), None,
                            lambda s, b, h, q, kv: where((q >= kv) & (q - kv <= 2), s, NEG_INF)),
    "and_or_mask": (None, lambda b, h, q, kv: ((q - kv >= 0) & (q - kv < 3)) | (kv == 4),
                    lambda s, b, h, q, kv: where(((q - kv >= 0) & (q - kv < 3)) | (kv == 4), s, NEG_INF)),
    "logical_functions": (None, lambda b, h, q, kv: torch.logical_or(torch.logical_and(q >= kv, kv != 1),
                                                                       torch.logical_not(q > 1)),
                          lambda s, b, h, q, kv: where(((q >= kv) & (kv != 1)) | (q <= 1), s, NEG_INF)),
    "bool_to_float": (lambda s, b, h, q, kv: s + (q >= kv).to(torch.float32) * 2.0 - (kv > 3).float(), None,
                      lambda s, b, h, q, kv: s + (q >= kv).double() * 2.0 - (kv > 3).double()),
    # captured tensors of 0 to 4 dims
    "captured_1d_head": (lambda s, b, h, q, kv: s + HEAD[h] * (kv - q), None,
                         lambda s, b, h, q, kv: s + D["HEAD"][h] * (kv - q)),
    "captured_1d_query": (lambda s, b, h, q, kv: s + PER_QUERY[q], None, lambda s, b, h, q, kv: s + D["PER_QUERY"][q]),
    "captured_1d_key_int64": (lambda s, b, h, q, kv: s - POSITIONS[kv] * 0.25, None,
                              lambda s, b, h, q, kv: s - D["POSITIONS"][kv] * 0.25),
    "captured_2d": (lambda s, b, h, q, kv: s * PER_BATCH_HEAD[b, h], None,
                    lambda s, b, h, q, kv: s * D["PER_BATCH_HEAD"][b, h]),
    "captured_3d_table": (lambda s, b, h, q, kv: s + TABLE[h, q, kv], None,
                          lambda s, b, h, q, kv: s + D["TABLE"][h, q, kv]),
    "captured_3d_transposed": (lambda s, b, h, q, kv: s + TABLE[h, kv, q], None,
                               lambda s, b, h, q, kv: s + D["TABLE"][h, kv, q]),
    "captured_4d": (lambda s, b, h, q, kv: s + FULL[b, h, q, kv], None, lambda s, b, h, q, kv: s + D["FULL"][b, h, q, kv]),
    "captured_scalar_by_value": (lambda s, b, h, q, kv: s * SCALAR, None, lambda s, b, h, q, kv: s * 0.625),
    "captured_documents": (None, lambda b, h, q, kv: POSITIONS[q] == POSITIONS[kv],
                           lambda s, b, h, q, kv: where(D["POSITIONS"][q] == D["POSITIONS"][kv], s, NEG_INF)),
}


def _float32_tensors_are_exact():
    # The tracer passes captured tensors as float32 (the score_mod's arithmetic); the formulas read
    # them in float64, so the tables must be float32 numbers already.
    return all(torch.equal(t, t.float().double()) for t in D.values())


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", CASES)
def test_construct_matches_plain_torch(name, shape):
    assert _float32_tensors_are_exact()
    score_mod, mask_mod, formula = CASES[name]
    check_against_formula(shape, dict(score_mod=score_mod, mask_mod=mask_mod), formula)


# Tensor methods: the method forms of the supported functions (score.abs(), score.clamp(...))
METHOD_FORMS = {
    "abs": (lambda s, b, h, q, kv: s.abs() * 0.5, lambda s, b, h, q, kv: s.abs() * 0.5),
    "clamp": (lambda s, b, h, q, kv: s.clamp(min=-1.0, max=0.75), lambda s, b, h, q, kv: s.clamp(-1.0, 0.75)),
    "cos": (lambda s, b, h, q, kv: s.cos(), lambda s, b, h, q, kv: torch.cos(s)),
    "ceil": (lambda s, b, h, q, kv: s.ceil() - s * 0.1, lambda s, b, h, q, kv: torch.ceil(s) - s * 0.1),
    "tanh": (lambda s, b, h, q, kv: s.tanh(), lambda s, b, h, q, kv: torch.tanh(s)),
    "exp": (lambda s, b, h, q, kv: (s * 0.2).exp(), lambda s, b, h, q, kv: torch.exp(s * 0.2)),
}


@pytest.mark.parametrize("name", METHOD_FORMS)
def test_tensor_method_form_matches_plain_torch(name):
    score_mod, formula = METHOD_FORMS[name]
    check_against_formula(SHAPES["9x5"], dict(score_mod=score_mod), formula)


# --- torch_score_mod: the signature does not show the style ----------------------------------

@cudnn_flex.torch_score_mod
def star_args(*args):
    score, b, h, q_idx, kv_idx = args
    return score + (q_idx - kv_idx) * 0.5 + HEAD[h]


class Shift:
    def __init__(self, amount):
        self.amount = amount

    def mod(self, *args):
        score, b, h, q_idx, kv_idx = args
        return torch.where(q_idx >= kv_idx, score * self.amount, NEG_INF)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_score_mod_on_a_star_args_function(shape):
    check_against_formula(shape, dict(score_mod=star_args),
                          lambda s, b, h, q, kv: s + (q - kv) * 0.5 + D["HEAD"][h])


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_score_mod_on_a_bound_method(shape):
    # A bound method takes no attributes: torch_score_mod wraps it.
    check_against_formula(shape, dict(score_mod=cudnn_flex.torch_score_mod(Shift(1.5).mod)),
                          lambda s, b, h, q, kv: where(q >= kv, s * 1.5, NEG_INF))


def test_a_star_args_function_without_the_decorator_is_not_torch_style():
    def undecorated(*args):
        score, b, h, q_idx, kv_idx = args
        return score

    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not enough values to unpack"):  # called as (graph, score, tensors)
        cudnn_flex.flex_attention(q, q, q, undecorated, backend="reference")
