"""Combining torch-style mods: in turn (compose), as a score_mod (masked), and masks by and/or."""

from typing import Callable

from ..torch_style import mask_to_score_mod


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
