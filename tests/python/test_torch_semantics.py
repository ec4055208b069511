"""Operators in torch-style mods mean what they mean in torch.

Each mod runs through cudnn-flex's reference path (the recorded program, which is what cuDNN is
given) and, as the oracle, on plain torch tensors: the mod called with broadcast index tensors, so
torch itself decides what `&`, `%`, `//`, `>>` mean. Indices include negative left-hand sides
(kv_idx - q_idx) and lengths that are not multiples of anything (13, 29).
"""

import warnings

import pytest
import torch

import cudnn_flex

B, H, SQ, SKV, D = 2, 3, 13, 29, 8


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, SQ, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, SKV, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, SKV, D, generator=g, dtype=torch.float64))


def index_grids():
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    q = torch.arange(SQ).view(1, 1, SQ, 1)
    kv = torch.arange(SKV).view(1, 1, 1, SKV)
    return b, h, q, kv


def plain_torch(q, k, v, score_mod=None, mask_mod=None):
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5
    b, h, qi, kvi = index_grids()
    if score_mod is not None:
        scores = score_mod(scores, b, h, qi, kvi).to(torch.float64).expand(B, H, SQ, SKV)
    if mask_mod is not None:
        keep = mask_mod(b, h, qi, kvi).expand(B, H, SQ, SKV)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def ours(q, k, v, score_mod=None, mask_mod=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        return cudnn_flex.flex_attention(q, k, v, score_mod, mask_mod=mask_mod)


MASKS = {
    "bitwise_and_low_bits": lambda b, h, q, kv: (kv & 3) == (q & 3),
    "bitwise_and_constant_with_holes": lambda b, h, q, kv: (kv & 5) == (q & 5),
    "bitwise_and_negative": lambda b, h, q, kv: ((kv - q) & 7) == 0,
    "bitwise_and_negative_constant": lambda b, h, q, kv: ((kv - q) & -4) == 0,
    "bitwise_or": lambda b, h, q, kv: (kv | 1) == (q | 1),
    "bitwise_xor": lambda b, h, q, kv: (kv ^ 2) < (q ^ 6),
    "invert_integer": lambda b, h, q, kv: (~kv) + q >= -1,
    "invert_bool": lambda b, h, q, kv: ~(kv > q),
    "remainder_negative_left": lambda b, h, q, kv: (kv - q) % 4 == 1,
    "remainder_negative_divisor": lambda b, h, q, kv: ((kv - q) % -3) > -2,
    "floor_divide_negative": lambda b, h, q, kv: (kv - q) // 4 >= -1,
    "floor_divide_chunks": lambda b, h, q, kv: (q // 5) == (kv // 5),
    "shift_right": lambda b, h, q, kv: (kv >> 2) == (q >> 2),
    "shift_left": lambda b, h, q, kv: (q << 1) >= kv,
    "logical_on_bools": lambda b, h, q, kv: (q >= kv) & ((q - kv < 4) | (kv == 0)),
    "xor_on_bools": lambda b, h, q, kv: (q >= kv) ^ (kv % 2 == 0),
}


@pytest.mark.parametrize("name", MASKS)
def test_mask_operators_follow_torch(name):
    q, k, v = qkv()
    mask = MASKS[name]
    torch.testing.assert_close(ours(q, k, v, mask_mod=mask), plain_torch(q, k, v, mask_mod=mask),
                               rtol=1e-10, atol=1e-10)


SCORE_MODS = {
    "fmod_keeps_the_dividend_sign": lambda s, b, h, q, kv: s + torch.fmod((kv - q).float(), 3.0),
    "remainder_of_floats": lambda s, b, h, q, kv: s + (kv - q).float() % 2.5,
    "true_division_of_integers": lambda s, b, h, q, kv: s + (kv - q) / 4,
    "floor_division_of_floats": lambda s, b, h, q, kv: s + (s * 3.0) // 1.0,
    "integer_truncation": lambda s, b, h, q, kv: s + (s * 2.0).to(torch.int32),
    "method_forms": lambda s, b, h, q, kv: s.abs().clamp(min=0.1, max=2.0) + (kv - q).abs().float() * 0.1,
    "exp2_slopes": lambda s, b, h, q, kv: s + torch.exp2(-(h + 1.0)) * (kv - q),
}


@pytest.mark.parametrize("name", SCORE_MODS)
def test_score_operators_follow_torch(name):
    q, k, v = qkv()
    mod = SCORE_MODS[name]
    # torch computes `.float()` values in float32: agreement to float32 rounding.
    torch.testing.assert_close(ours(q, k, v, mod), plain_torch(q, k, v, mod), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mod,message", [
    (lambda b, h, q, kv: (q & kv) == 0, "two computed integer values"),
    (lambda b, h, q, kv: (q.float() & 1) == 0, "floating-point"),
    (lambda b, h, q, kv: (q >> kv) == 0, "shifted by a constant"),
])
def test_unsupported_bitwise_forms_name_themselves(mod, message):
    q, k, v = qkv()
    with pytest.raises(cudnn_flex.UnsupportedConstruct, match=message):
        ours(q, k, v, mask_mod=mod)


# --- masks filled with a large finite value --------------------------------------------------------

def finfo_fill(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx + 3, score, torch.finfo(torch.float32).min)


def test_finite_fill_gets_a_bprop_and_inf_fill_none():
    from cudnn_flex.record_call import record_call as _record
    qf = torch.empty(B, H, SQ, D)
    finite, _, _ = _record(finfo_fill, None, None, None, None, qf, SKV)
    assert finite.bprop_id != 0, "a finite fill needs the masked gradient (rows can be uniform)"
    inf, _, _ = _record(None, None, lambda b, h, q, kv: q >= kv + 3, None, None, qf, SKV)
    assert inf.bprop_id == 0


def test_finite_fill_gradients_match_autograd_with_fully_masked_rows():
    """Rows q < 3 are fully masked: torch gives uniform attention there, and the gradient at
    masked positions is 0. The derived bprop (what cuDNN runs) must agree with autograd."""
    from cudnn_flex import bprop_check
    from cudnn_flex.record_call import record_call as _record
    program, tensors, _ = _record(finfo_fill, None, None, None, None, torch.empty(B, H, SQ, D), SKV)
    forward, backward = bprop_check.program_pair(program)
    cudnn_flex.check_score_mod_bprop(forward, backward, shape=(B, H, SQ, SKV))


def test_finite_fill_forward_and_grads_on_the_reference_path():
    q, k, v = (t.requires_grad_() for t in qkv())
    out = ours(q, k, v, finfo_fill)
    want = plain_torch(q, k, v, finfo_fill)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    g_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g_out)
    exp = torch.autograd.grad(want, (q, k, v), g_out)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-8)


# --- torch's own mask combinators and Hugging Face-style masks ------------------------------------

def _hf_and_masks(*masks):
    """The shape of Hugging Face's masking_utils.and_masks (new_ones, .to(result.device))."""
    def and_mask(batch_idx, head_idx, q_idx, kv_idx):
        result = q_idx.new_ones((), dtype=torch.bool)
        for mask in masks:
            result = result & mask(batch_idx, head_idx, q_idx, kv_idx).to(result.device)
        return result
    return and_mask


PADDING = torch.tensor([[True] * SKV, [True] * 20 + [False] * (SKV - 20)])


def _combinator_cases():
    from torch.nn.attention.flex_attention import and_masks, noop_mask, or_masks
    causal = lambda b, h, q, kv: q + (SKV - SQ) >= kv  # noqa: E731  (bottom-right causal)
    window = lambda b, h, q, kv: kv > q - 6  # noqa: E731
    padding = lambda b, h, q, kv: PADDING[b, kv]  # noqa: E731
    return {
        "torch_and_masks": and_masks(causal, window),
        "torch_or_masks": or_masks(window, lambda b, h, q, kv: kv == 0),
        "torch_noop_mask": noop_mask,
        "torch_and_of_noop": and_masks(noop_mask, causal),
        "hf_and_masks_with_padding": _hf_and_masks(causal, padding),
    }


@pytest.mark.parametrize("name", list(_combinator_cases()))
def test_torch_and_hugging_face_mask_combinators(name):
    mask = _combinator_cases()[name]
    q, k, v = qkv()
    torch.testing.assert_close(ours(q, k, v, mask_mod=mask), plain_torch(q, k, v, mask_mod=mask),
                               rtol=1e-10, atol=1e-10)
