"""An additive bias tensor (DSL only: torch-style, capture the tensor and index it,
`score + bias[b, h, q_idx, kv_idx]`)."""


def add_bias_dsl(graph, score, tensors):
    """DSL score_mod: adds score_mod_tensors['bias'], any tensor broadcastable to [B, H, Sq, Skv]."""
    return graph.add(score, tensors["bias"])
