"""Mask recognition (cudnn_flex.masks.recognize): which programs are a diagonal band, however
they were written, and which are not (those keep the dense path)."""

import pytest
import torch

from cudnn_flex import dsl_mods, mods
from cudnn_flex.record_call import record_call as _record
from cudnn_flex.masks.recognize import band

S = 64


def recognised(score_mod=None, mask_mod=None):
    program, _, _ = _record(score_mod, None, mask_mod, None, None, torch.empty(1, 1, S, 8), S)
    found = band(program)
    return None if found is None else (found.lo, found.hi)


MATCH = {
    "mods.causal": (dict(mask_mod=mods.causal), (0, None)),
    "dsl causal": (dict(score_mod=dsl_mods.causal), (0, None)),
    "user causal kv <= q": (dict(mask_mod=lambda b, h, q, kv: kv <= q), (0, None)),
    "mods.sliding_window(1024)": (dict(mask_mod=mods.sliding_window(1024)), (0, 1023)),
    "user window": (dict(mask_mod=lambda b, h, q, kv: (q >= kv) & (q - kv < 1024)), (0, 1023)),
    "dsl SlidingWindow": (dict(score_mod=dsl_mods.sliding_window(1024)), (0, 1023)),
    "window written kv > q - w": (dict(mask_mod=lambda b, h, q, kv: (kv <= q) & (kv > q - 1024)), (0, 1023)),
    "two-sided |q - kv| <= 8": (dict(mask_mod=lambda b, h, q, kv: (q - kv).abs() <= 8), (-8, 8)),
    "offset causal q + 5 >= kv": (dict(mask_mod=lambda b, h, q, kv: q + 5 >= kv), (-5, None)),
    "softcap + window (Gemma 2)": (dict(score_mod=mods.softcap(50.0), mask_mod=mods.sliding_window(4096)),
                                   (0, 4095)),
    "alibi + causal": (dict(score_mod=mods.alibi(torch.ones(1)), mask_mod=mods.causal), (0, None)),
    "where(kv > q, -inf, s)": (dict(score_mod=lambda s, b, h, q, kv: torch.where(kv > q, float("-inf"), s)),
                               (0, None)),
    "where(q - kv >= 64, -inf, s) + causal": (
        dict(score_mod=lambda s, b, h, q, kv: torch.where(q - kv >= 64, float("-inf"), s), mask_mod=mods.causal),
        (0, 63)),
}


@pytest.mark.parametrize("name", MATCH)
def test_bands_are_recognised_however_written(name):
    kwargs, bounds = MATCH[name]
    assert recognised(**kwargs) == bounds


def test_user_window_and_library_window_are_the_same_band():
    assert recognised(mask_mod=lambda b, h, q, kv: (q >= kv) & (q - kv < 1024)) == \
        recognised(mask_mod=mods.sliding_window(1024))


NO_MATCH = {
    "strict causal q > kv is another band": (lambda b, h, q, kv: q > kv, (1, None)),
    "off-by-one window q - kv <= 1024": (lambda b, h, q, kv: (q >= kv) & (q - kv <= 1024), (0, 1024)),
}


@pytest.mark.parametrize("name", NO_MATCH)
def test_near_misses_get_their_own_bounds(name):
    mask, bounds = NO_MATCH[name]
    assert recognised(mask_mod=mask) == bounds


@pytest.mark.parametrize("mask", [
    lambda b, h, q, kv: (q >= kv) & (kv % 2 == 0),            # an extra condition
    lambda b, h, q, kv: (q >= kv) | (kv < 4),                  # prefix LM: an OR
    lambda b, h, q, kv: (q >= kv + 8) | (q <= kv - 8),         # outside a band: an OR of bounds
    lambda b, h, q, kv: 2 * q >= kv,                           # not a function of q - kv
    lambda b, h, q, kv: q // 4 >= kv // 4,                     # block causal
    mods.document_mask(torch.zeros(S, dtype=torch.long)),     # a tensor
])
def test_other_masks_are_not_bands(mask):
    assert recognised(mask_mod=mask) is None


def test_minus_inf_where_two_conditions_hold_is_not_a_band():
    """torch.where(a & b, -inf, s) keeps (not a) or (not b): outside a band, never a band."""
    assert recognised(score_mod=lambda s, b, h, q, kv: torch.where((q >= kv) & (q - kv < 5), float("-inf"), s)) is None


def test_a_bias_or_no_mask_is_not_a_band():
    assert recognised(score_mod=mods.softcap(3.0)) is None
    assert recognised(score_mod=dsl_mods.relative_bias()) is None
    finite = lambda s, b, h, q, kv: torch.where(q >= kv, s, -1e9)  # noqa: E731  (a finite fill)
    assert recognised(score_mod=finite) is None
