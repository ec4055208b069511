"""ALiBi: a linear distance penalty with one slope per query head."""

from typing import Callable

import torch


def alibi_slopes(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The standard ALiBi slopes 2^(-8 (h + 1) / H), shaped [1, H, 1, 1] (score_mod_tensors['slopes']
    of the DSL form; the torch-style alibi() takes them in any shape)."""
    exponents = torch.arange(1, heads + 1, dtype=torch.float64) * (-8.0 / heads)
    return torch.pow(2.0, exponents).to(device=device, dtype=dtype).view(1, heads, 1, 1)


def alibi(slopes: torch.Tensor) -> Callable:
    """score_mod: score + slopes[h] * (kv_idx - q_idx); slopes has one entry per query head and
    is captured (a runtime input: new values never rebuild a graph)."""
    slopes = slopes.reshape(-1)

    def alibi_score(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi_score


def alibi_dsl(graph, score, tensors):
    """DSL score_mod of alibi(slopes): the slopes come as score_mod_tensors['slopes'], shaped
    [1, H, 1, 1] (alibi_slopes(H))."""
    row = graph.gen_index(score, 2)
    col = graph.gen_index(score, 3)
    return graph.add(score, graph.mul(graph.sub(col, row), tensors["slopes"]))
