"""Causal sliding window: each query sees itself and the window - 1 keys before it."""

from typing import Callable


def _checked(window) -> int:
    if int(window) < 1:
        raise ValueError(f"cudnn_flex: sliding_window needs window >= 1, got {window}")
    return int(window)


def sliding_window(window: int) -> Callable:
    """mask_mod: causal, and at most `window` keys back (0 <= q_idx - kv_idx < window)."""
    window = _checked(window)

    def sliding_window_mask(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & (distance < window)
    return sliding_window_mask


class SlidingWindow:
    """DSL score_mod of sliding_window(window) (dsl_mods.sliding_window(window) makes one).

    Two chained binary_selects rather than logical_and of two comparisons: cuDNN 9.19 fuses the
    former into SDPA and refused the latter.
    """

    def __init__(self, window: int):
        self.window = _checked(window)

    def score_mod_graph_cache_key(self):
        return (self.window,)

    def __call__(self, graph, score, tensors):
        distance = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        causal_part = graph.binary_select(score, float("-inf"), graph.cmp_ge(distance, 0.0))
        return graph.binary_select(causal_part, float("-inf"), graph.cmp_lt(distance, float(self.window)))
