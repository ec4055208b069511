"""The lowering's rewrites of forms cuDNN 9.19 gets wrong (program/replay.py, csrc/score_mod_bridge.h),
checked on the ops validate_graphs prints (no GPU). What each rewrite fixes was measured on the
H100 (test_gpu_correctness::test_backward_forms_cudnn_got_wrong_are_right runs them there)."""

import re

import pytest
import torch

import cudnn_flex

B, H, SQ, SKV, D = 1, 2, 129, 127, 64
NEG_INF = float("-inf")
PADDING = "GEN_INDEX CMP_LT BINARY_SELECT GEN_INDEX CMP_LT BINARY_SELECT"


def lowered(score_mod=None, mask_mod=None, s_q=SQ, s_kv=SKV):
    """(forward ops, backward ops) as emitted for cuDNN."""
    q = torch.empty(B, H, s_q, D, dtype=torch.bfloat16, device="meta")
    k = torch.empty(B, H, s_kv, D, dtype=torch.bfloat16, device="meta")
    text = cudnn_flex.validate_graphs(q, k, k, score_mod=score_mod, mask_mod=mask_mod)
    return tuple(re.findall(r"score_mod ops: (.*)", text))


@pytest.mark.parametrize("mod,forward", [
    (lambda s, b, h, q, kv: 1.0 - s * 0.5, "MUL NEG ADD"),               # c - x = -x + c
    (lambda s, b, h, q, kv: 2.0 * s, "MUL"),                            # swapped, no lift
    # (kv > 2q is no band: a band would become the frontend's band mask instead)
    (lambda s, b, h, q, kv: torch.where(kv > q * 2, NEG_INF, s), "GEN_INDEX MUL GEN_INDEX IDENTITY CMP_LE BINARY_SELECT"),
    (lambda s, b, h, q, kv: torch.where(q == kv, 0.0, s), "GEN_INDEX GEN_INDEX CMP_NEQ BINARY_SELECT"),
])
def test_a_constant_first_is_never_lifted(mod, forward):
    """The lift (zero + c, from a GEN_INDEX times 0) gave a wrong backward on cuDNN 9.19: the
    computed value goes first, and a select flips under the negated comparison, with no dangling
    original comparison."""
    fwd, _ = lowered(mod)
    assert fwd == forward


@pytest.mark.parametrize("power,forward", [(2, "MUL MUL"), (3, "MUL MUL MUL"), (-1, "RECIPROCAL MUL"),
                                           (1.5, "POW MUL")])
def test_integer_powers_are_products(power, forward):
    """cuDNN's POW is NaN for a negative base (`s ** 2`); integer powers become products."""
    fwd, _ = lowered(lambda s, b, h, q, kv: s ** power * 0.5)
    assert fwd == forward


def test_a_backward_with_a_bprop_masks_the_tile_padding():
    """cuDNN 9.19 gave NaN dV for any bprop at lengths like 129 unless the backward's score_mod
    masks the padding (-inf) and the bprop's result is 0 there."""
    fwd, bwd = lowered(lambda s, b, h, q, kv: torch.tanh(s / 30.0) * 30.0)
    assert fwd == "DIV TANH_FWD MUL"
    assert bwd == f"DIV TANH_FWD MUL {PADDING} MUL TANH_BWD DIV {PADDING}"


def test_a_pass_through_backward_masks_the_padding_of_a_partial_tile():
    """Biases need no bprop, but one growing with q_idx scored the padding rows of the last query
    tile to exp() = inf in cuDNN's backward (NaN dK and dV at 129 x 64); at whole tiles there is no
    padding, and the backward's score_mod is the forward's."""
    bias = lambda s, b, h, q, kv: s + (q - kv) * 0.1  # noqa: E731
    fwd, bwd = lowered(bias)
    assert bwd == f"{fwd} {PADDING}"
    for s_q, s_kv in ((128, 256), (256, 128)):
        fwd, bwd = lowered(bias, s_q=s_q, s_kv=s_kv)
        assert fwd == bwd and "CMP_LT" not in bwd


def test_a_recognised_band_is_the_frontend_band_mask_in_both_graphs():
    fwd, bwd = lowered(lambda s, b, h, q, kv: torch.tanh(s / 30.0) * 30.0,
                       mask_mod=lambda b, h, q, kv: (q >= kv) & (q - kv < 64))
    assert fwd == "DIV TANH_FWD MUL DIAGONAL_BAND_MASK DIAGONAL_BAND_MASK"
    assert bwd.startswith(fwd + f" {PADDING}")


def test_a_comparison_a_flipped_select_also_reads_as_a_value_is_emitted():
    def mod(s, b, h, q, kv):
        positive = s > 0
        return torch.where(positive, 0.5, positive) * s

    fwd, _ = lowered(mod)
    assert fwd.startswith("CMP_GT") and "CMP_LE" in fwd


@pytest.mark.parametrize("mask,lowered_as_band", [
    (lambda b, h, q, kv: q - kv >= -3e9, False),          # keeps everything: no band to skip for
    (lambda b, h, q, kv: (q - kv >= -3e9) & (q >= kv), True),   # the far bound dropped: causal
    (lambda b, h, q, kv: (q - kv <= 3e9) & (q - kv >= 0), True),
    (lambda b, h, q, kv: q - kv >= 3e9, False),           # keeps nothing: stays dense
])
def test_bounds_no_length_reaches_never_overflow_the_band(mask, lowered_as_band):
    """The band node takes its bounds as INT32 constants: -3e9 would wrap around."""
    fwd, _ = lowered(mask_mod=mask)
    assert (fwd == "DIAGONAL_BAND_MASK") == lowered_as_band, fwd


@pytest.mark.parametrize("dtype,forward", [
    (torch.int32, "GEN_INDEX MUL ADD IDENTITY CMP_LE BINARY_SELECT"),  # read in place: INT32 on the graph
    (torch.int64, "GEN_INDEX MUL ADD CMP_LE BINARY_SELECT"),           # a float32 copy
])
def test_an_int32_tensor_compared_with_a_float_goes_through_identity(dtype, forward):
    """int32 ids are read in place as INT32 inputs: compared first with a FLOAT tensor they go
    through identity(), as INT32 indices do (cuDNN 9.19 compares INT32 first, FLOAT second
    wrongly); INT32 with INT32 (`doc[q] == doc[kv]`) stays as it is."""
    ids, bound = torch.zeros(200, dtype=dtype, device="meta"), torch.zeros(H, device="meta")
    assert lowered(mask_mod=lambda b, h, q, kv: ids[q] <= bound[h])[0] == forward
    assert lowered(mask_mod=lambda b, h, q, kv: ids[q] == ids[kv])[0] == "GEN_INDEX MUL ADD CMP_EQ BINARY_SELECT"
