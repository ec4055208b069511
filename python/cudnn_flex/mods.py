"""Ready score_mods and mask_mods, torch-style: the signatures of torch.nn.attention.flex_attention.

score_mods take (score, b, h, q_idx, kv_idx) and return the new score; mask_mods take
(b, h, q_idx, kv_idx) and return where to attend. Pass a score_mod as score_mod= and a mask_mod as
mask_mod= (or turn it into a score_mod with masked()). Combine them with compose(), and_masks(),
or_masks(). Factories return closures: their captured numbers are part of the graph's cache key,
their captured tensors are runtime inputs (changing a tensor's values never rebuilds a graph).
The backward of each is derived automatically (none is needed for masks and biases).
"""

from __future__ import annotations

from typing import Callable

import torch

from .torch_style import mask_to_score_mod


def causal(b, h, q_idx, kv_idx):
    """mask_mod: keys at or before the query position (top-left aligned)."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> Callable:
    """mask_mod: causal, and at most `window` keys back (q_idx - kv_idx < window)."""
    window = int(window)
    if window < 1:
        raise ValueError(f"cudnn_flex: sliding_window needs window >= 1, got {window}")

    def sliding_window_mask(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)
    return sliding_window_mask


def prefix_lm(prefix_length: int) -> Callable:
    """mask_mod: the first `prefix_length` keys are seen by every query; causal after them."""
    prefix_length = int(prefix_length)

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)
    return prefix_lm_mask


def document_mask(doc_ids: torch.Tensor) -> Callable:
    """mask_mod: a query sees only keys of its own document. doc_ids[s] (or doc_ids[b, s] per
    batch) numbers the document of each position of packed sequences."""
    if doc_ids.dim() == 1:
        def document(b, h, q_idx, kv_idx):
            return doc_ids[q_idx] == doc_ids[kv_idx]
    elif doc_ids.dim() == 2:
        def document(b, h, q_idx, kv_idx):
            return doc_ids[b, q_idx] == doc_ids[b, kv_idx]
    else:
        raise ValueError(f"cudnn_flex: doc_ids must be [S] or [B, S], got shape {tuple(doc_ids.shape)}")
    return document


def softcap(cap: float) -> Callable:
    """score_mod: cap * tanh(score / cap) (Gemma 2, Grok)."""
    cap = float(cap)
    if not cap > 0:
        raise ValueError(f"cudnn_flex: softcap needs cap > 0, got {cap}")

    def softcap_score(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return softcap_score


def alibi(slopes: torch.Tensor) -> Callable:
    """score_mod: score + slopes[h] * (kv_idx - q_idx); slopes has one entry per query head
    (alibi_slopes(H) gives the standard ones)."""
    slopes = slopes.reshape(-1)

    def alibi_score(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi_score


def relative_bias(scale: float = 1.0) -> Callable:
    """score_mod: score + scale * (q_idx - kv_idx)."""
    scale = float(scale)

    def relative_bias_score(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * scale
    return relative_bias_score


def alibi_slopes(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The standard ALiBi slopes 2^(-8 (h + 1) / H), shaped [1, H, 1, 1] (a score_mod tensor for
    dsl_mods.alibi; alibi() takes them in any shape)."""
    exponents = torch.arange(1, heads + 1, dtype=torch.float64) * (-8.0 / heads)
    return torch.pow(2.0, exponents).to(device=device, dtype=dtype).view(1, heads, 1, 1)


def compose(*score_mods: Callable) -> Callable:
    """score_mod applying each of score_mods in turn (e.g. compose(softcap(50), masked(causal)))."""
    def composed(score, b, h, q_idx, kv_idx):
        for fn in score_mods:
            score = fn(score, b, h, q_idx, kv_idx)
        return score
    return composed


def masked(mask_mod: Callable) -> Callable:
    """The score_mod of a mask_mod: the score where it holds, -inf elsewhere."""
    return mask_to_score_mod(mask_mod, None)


def and_masks(*mask_mods: Callable) -> Callable:
    """mask_mod true where all of mask_mods are."""
    def both(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for fn in mask_mods[1:]:
            result = result & fn(b, h, q_idx, kv_idx)
        return result
    return both


def or_masks(*mask_mods: Callable) -> Callable:
    """mask_mod true where any of mask_mods is."""
    def either(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for fn in mask_mods[1:]:
            result = result | fn(b, h, q_idx, kv_idx)
        return result
    return either
