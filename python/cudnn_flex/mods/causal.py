"""Causal masking (top-left aligned: query i sees keys 0..i)."""


def causal(b, h, q_idx, kv_idx):
    """mask_mod: keys at or before the query position."""
    return q_idx >= kv_idx


def causal_dsl(graph, score, tensors):
    """DSL score_mod: the score where kv_idx <= q_idx, -inf elsewhere."""
    row = graph.gen_index(score, 2)
    col = graph.gen_index(score, 3)
    return graph.binary_select(score, float("-inf"), graph.cmp_ge(row, col))
