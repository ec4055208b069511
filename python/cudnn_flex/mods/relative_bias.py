"""A relative-position bias linear in the distance: score + scale * (q_idx - kv_idx)."""

from typing import Callable


def relative_bias(scale: float = 1.0) -> Callable:
    """score_mod: score + scale * (q_idx - kv_idx), added after the softmax scale."""
    scale = float(scale)

    def relative_bias_score(score, b, h, q_idx, kv_idx):
        return score + (q_idx - kv_idx) * scale
    return relative_bias_score


class RelativeBias:
    """DSL score_mod of relative_bias(scale) (dsl_mods.relative_bias(scale) makes one)."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def score_mod_graph_cache_key(self):
        return (self.scale,)

    def __call__(self, graph, score, tensors):
        distance = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        if self.scale != 1.0:  # x * 1.0 is x: the default adds the distance itself, one op fewer
            distance = graph.mul(distance, self.scale)
        return graph.add(score, distance)
