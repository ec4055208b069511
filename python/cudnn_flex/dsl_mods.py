"""score_mods written in the graph DSL (graph, score, tensors): examples of the DSL and of a
hand-written bprop (Softcap). cudnn_flex.mods has the same mods torch-style, composable.

Module-level functions and keyed objects, so that their graphs are cached (see _registry).
"""

from __future__ import annotations

from .mods import alibi_slopes  # noqa: F401  (re-exported: tensors['slopes'] for alibi)


def causal(graph, score, tensors):
    """Keeps key positions <= the query position (top-left aligned)."""
    row = graph.gen_index(score, 2)
    col = graph.gen_index(score, 3)
    return graph.binary_select(score, float("-inf"), graph.cmp_ge(row, col))


def relative_bias(graph, score, tensors):
    """Adds (q_idx - kv_idx) to the score after scaling ("post-scale bias")."""
    row = graph.gen_index(score, 2)
    col = graph.gen_index(score, 3)
    return graph.add(score, graph.sub(row, col))


class RelativeBias:
    """Adds scale * (q_idx - kv_idx), as mods.relative_bias(scale) does torch-style
    (relative_bias above is RelativeBias(1.0) as a plain function)."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def score_mod_graph_cache_key(self):
        return (self.scale,)

    def __call__(self, graph, score, tensors):
        distance = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        return graph.add(score, graph.mul(distance, self.scale))


def alibi(graph, score, tensors):
    """ALiBi: adds slopes[h] * (kv_idx - q_idx); needs tensors['slopes'] shaped [1, H, 1, 1]."""
    row = graph.gen_index(score, 2)
    col = graph.gen_index(score, 3)
    return graph.add(score, graph.mul(graph.sub(col, row), tensors["slopes"]))


def add_bias(graph, score, tensors):
    """Adds tensors['bias'], any tensor broadcastable to [B, H, Sq, Skv]."""
    return graph.add(score, tensors["bias"])


class Softcap:
    """cap * tanh(score / cap), with its exact backward.

    Use score_mod=softcap.forward, score_mod_bprop=softcap.backward (same object: the backward
    reuses the tensor that forward kept while the same graph was built).
    """

    def __init__(self, cap: float):
        if not cap > 0:
            raise ValueError(f"cudnn_flex: softcap cap must be > 0, got {cap}")
        self.cap = float(cap)
        self._before_tanh = None

    def score_mod_graph_cache_key(self):
        return (self.cap,)

    def forward(self, graph, score, tensors):
        self._before_tanh = graph.div(score, self.cap)
        return graph.mul(graph.tanh(self._before_tanh), self.cap)

    def backward(self, graph, d_p, tensors):
        # d/ds cap*tanh(s/cap) = 1 - tanh^2(s/cap)
        return graph.tanh_backward(d_p, self._before_tanh)

    def __getstate__(self):
        # The kept graph tensor belongs to a graph being built: not part of a copy or a pickle.
        return {**self.__dict__, "_before_tanh": None}


class SlidingWindow:
    """Causal sliding window: keeps keys with 0 <= q_idx - kv_idx < window.

    Two chained binary_selects rather than logical_and of two comparisons: cuDNN 9.19 fuses the
    former into SDPA and refused the latter.
    """

    def __init__(self, window: int):
        if int(window) < 1:
            raise ValueError(f"cudnn_flex: sliding window must be >= 1, got {window}")
        self.window = int(window)

    def score_mod_graph_cache_key(self):
        return (self.window,)

    def __call__(self, graph, score, tensors):
        distance = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        causal_part = graph.binary_select(score, float("-inf"), graph.cmp_ge(distance, 0.0))
        return graph.binary_select(causal_part, float("-inf"), graph.cmp_lt(distance, float(self.window)))


