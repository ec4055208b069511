"""Band masks on cuDNN in the tile-skipping form (masks/lower.py): the same values as the mask
written out here, forward, LSE and all three gradients, on lengths that are not multiples of
cuDNN's 128 tile, with rows the band leaves empty, Sq != Skv and GQA; and the graph really holds
the frontend's diagonal band mask (the form cuDNN skips tiles for), not the user's selects.
"""

import zlib

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from gpu_cases import check, compare, make_inputs, on_device

pytestmark = pytest.mark.gpu

NEG_INF = float("-inf")


def band(lo=None, hi=None, then=None):
    """Formula: scores with lo <= q_idx - kv_idx <= hi (None: unbounded), -inf elsewhere, after
    `then` (the score_mod part, a formula)."""
    def formula(s, b, h, q, kv):
        if then is not None:
            s = then(s, b, h, q, kv)
        keep = torch.ones_like(q - kv, dtype=torch.bool)
        if lo is not None:
            keep = keep & (q - kv >= lo)
        if hi is not None:
            keep = keep & (q - kv <= hi)
        return torch.where(keep, s, NEG_INF)
    return formula


def softcap_formula(cap):
    return lambda s, b, h, q, kv: cap * torch.tanh(s / cap)


def alibi_formula(slopes):
    return lambda s, b, h, q, kv: s + slopes.double().view(1, -1, 1, 1)[:, h.view(-1)] * (kv - q)


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])

# name -> (flex_attention kwargs, formula)
CASES = {
    "causal": (dict(mask_mod=mods.causal), band(lo=0)),
    "window 40": (dict(mask_mod=mods.sliding_window(40)), band(lo=0, hi=39)),
    "user window kv > q - 40": (dict(mask_mod=lambda b, h, q, kv: (kv <= q) & (kv > q - 40)), band(lo=0, hi=39)),
    "dsl SlidingWindow(40)": (dict(score_mod=dsl_mods.sliding_window(40)), band(lo=0, hi=39)),
    "two-sided |q - kv| <= 8": (dict(mask_mod=lambda b, h, q, kv: (q - kv).abs() <= 8), band(lo=-8, hi=8)),
    "causal shifted right q + 5 >= kv": (dict(mask_mod=lambda b, h, q, kv: q + 5 >= kv), band(lo=-5)),
    "strictly below q - kv >= 3 (empty first rows)": (dict(mask_mod=lambda b, h, q, kv: q - kv >= 3), band(lo=3)),
    "anti-causal kv >= q": (dict(mask_mod=lambda b, h, q, kv: kv >= q), band(hi=0)),
    "torch.where(kv > q, -inf, s)": (dict(score_mod=lambda s, b, h, q, kv: torch.where(kv > q, NEG_INF, s)),
                                     band(lo=0)),
    "softcap 20 + window 64 (Gemma 2)": (dict(score_mod=mods.softcap(20.0), mask_mod=mods.sliding_window(64)),
                                         band(lo=0, hi=63, then=softcap_formula(20.0))),
    "alibi + causal": (dict(score_mod=mods.alibi(SLOPES), mask_mod=mods.causal),
                       band(lo=0, then=alibi_formula(SLOPES))),
}

SHAPES = {"1x129": (1, 129), "129x1": (129, 1), "127x127": (127, 127), "129x129": (129, 129), "300x300": (300, 300),
          "129x300": (129, 300), "300x129": (300, 129)}


def lowered_ops(kwargs, q, k, v):
    return cudnn_flex.validate_graphs(q, k, v, **kwargs)


def check_case(cases, shapes, name, shape):
    """cases[name] at shapes[shape] (B=2, H=4, H_kv=2) against its formula: out, lse, dq, dk, dv."""
    s_q, s_kv = shapes[shape]
    kwargs, formula = cases[name]
    q, k, v = make_inputs(b=2, h=4, h_kv=2, s_q=s_q, s_kv=s_kv, d=64, seed=zlib.crc32((name + shape).encode()) % 1000)
    got, want = compare(q, k, v, formula, **kwargs)
    check(got, want, label=f"{name} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", CASES)
def test_band_matches_its_formula(name, shape):
    check_case(CASES, SHAPES, name, shape)


@pytest.mark.parametrize("name", CASES)
def test_band_is_lowered_as_the_frontend_band(name):
    kwargs, _ = CASES[name]
    q, k, v = make_inputs(s_q=129, s_kv=129, device="cuda")
    printed = lowered_ops(on_device(kwargs), q.detach(), k.detach(), v.detach())
    forward_ops = next(line for line in printed.splitlines() if line.startswith("score_mod ops:"))
    assert "DIAGONAL_BAND_MASK" in forward_ops
    assert "BINARY_SELECT" not in forward_ops and "CMP_" not in forward_ops


def test_fp16_window():
    q, k, v = make_inputs(s_q=257, s_kv=257, dtype=torch.float16, seed=5)
    got, want = compare(q, k, v, band(lo=0, hi=99), mask_mod=mods.sliding_window(100))
    check(got, want, dtype=torch.float16, label="fp16 window")


def test_band_and_dense_mask_agree_on_the_same_inputs():
    """The same window as a recognised band and as a mask the recogniser leaves dense (an extra
    always-true condition on b): the two graphs give the same values."""
    q, k, v = make_inputs(s_q=300, s_kv=300, seed=7)
    dense = lambda b, h, q_, kv: (q_ >= kv) & (q_ - kv < 40) & (b >= 0)  # noqa: E731
    got_band, want = compare(q, k, v, band(lo=0, hi=39), mask_mod=mods.sliding_window(40))
    got_dense, _ = compare(q, k, v, band(lo=0, hi=39), mask_mod=dense)
    check(got_band, want, label="band")
    check(got_dense, want, label="dense")
    printed = lowered_ops(dict(mask_mod=dense), q.detach(), k.detach(), v.detach())
    assert "DIAGONAL_BAND_MASK" not in printed


def test_one_query_one_key_runs_forward_and_backward():
    """cuDNN refuses the backward for Sq = Skv = 1 with a score_mod; cudnn-flex runs one query
    row as two (api.cudnn_call), so both run: one key gives P = 1, out = v, dv = dO, and no
    gradient for q and k (softmax of a single score is constant)."""
    q, k, v = make_inputs(s_q=1, s_kv=1)
    out = cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal)
    torch.testing.assert_close(out.float(), v.float(), atol=0, rtol=0)
    d_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    torch.testing.assert_close(dv, d_out.view_as(dv), atol=0, rtol=0)
    assert dq.abs().max() < 1e-3 and dk.abs().max() < 1e-3


# Padding and decoding masks written as Hugging Face models write them: per-batch lengths in a
# captured [B] tensor indexed by b. They stay on the dense path; cudnn_masks.md measured a plain
# compare of the key index against a [B,1,1,1] length tensor to be silently wrong on cuDNN 9.19,
# so each form is checked against its formula, rows past a length (fully masked) included.
LENGTHS = torch.tensor([1, 100])  # B = 2: one nearly empty row, one partial
OFFSETS = torch.tensor([0, 37])   # decode: the queries are the last ones of a longer cache

PADDING_CASES = {
    "keys past the length": (dict(mask_mod=lambda b, h, q, kv: kv < LENGTHS[b]),
                             lambda s, b, h, q, kv: torch.where(kv < LENGTHS[b], s, NEG_INF)),
    "queries and keys past the length": (
        dict(mask_mod=lambda b, h, q, kv: (q < LENGTHS[b]) & (kv < LENGTHS[b])),
        lambda s, b, h, q, kv: torch.where((q < LENGTHS[b]) & (kv < LENGTHS[b]), s, NEG_INF)),
    "bottom-right causal by a per-batch offset": (
        dict(mask_mod=lambda b, h, q, kv: q + OFFSETS[b] >= kv),
        lambda s, b, h, q, kv: torch.where(q + OFFSETS[b] >= kv, s, NEG_INF)),
    "softcap + keys past the length": (
        dict(score_mod=mods.softcap(20.0), mask_mod=lambda b, h, q, kv: kv < LENGTHS[b]),
        lambda s, b, h, q, kv: torch.where(kv < LENGTHS[b], 20.0 * torch.tanh(s / 20.0), NEG_INF)),
}
PADDING_SHAPES = {"4x129": (4, 129), "127x127": (127, 127), "129x129": (129, 129), "300x300": (300, 300)}


@pytest.mark.parametrize("shape", PADDING_SHAPES)
@pytest.mark.parametrize("name", PADDING_CASES)
def test_per_batch_length_masks_match_their_formula(name, shape):
    check_case(PADDING_CASES, PADDING_SHAPES, name, shape)
