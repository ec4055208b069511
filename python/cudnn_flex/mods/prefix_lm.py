"""Prefix LM: a bidirectional prefix, causal after it (torch-style only)."""

from typing import Callable


def prefix_lm(prefix_length: int) -> Callable:
    """mask_mod: the first `prefix_length` keys are seen by every query; causal after them."""
    prefix_length = int(prefix_length)

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)
    return prefix_lm_mask
