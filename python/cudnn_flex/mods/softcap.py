"""Softcapping of the scores: cap * tanh(score / cap) (Gemma 2, Grok)."""

from typing import Callable

import torch


def _checked(cap) -> float:
    if not float(cap) > 0:
        raise ValueError(f"cudnn_flex: softcap needs cap > 0, got {cap}")
    return float(cap)


def softcap(cap: float) -> Callable:
    """score_mod: cap * tanh(score / cap); its backward is derived."""
    cap = _checked(cap)

    def softcap_score(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return softcap_score


class Softcap:
    """DSL score_mod of softcap(cap) with its exact hand-written backward
    (dsl_mods.softcap(cap) makes one).

    Pass score_mod=s.forward, score_mod_bprop=s.backward of one object: the backward reuses the
    tensor that forward kept while the same graph was built.
    """

    def __init__(self, cap: float):
        self.cap = _checked(cap)
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
