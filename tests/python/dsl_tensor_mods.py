"""DSL score_mods over score_mod_tensors, written as users write their own (the ready ones are in
cudnn_flex.dsl_mods): shared by the CPU and GPU tests of the tensors' paths."""


def scaled_by(graph, score, tensors):
    return graph.mul(score, tensors["c"])


def scaled_by_bprop(graph, d_p, tensors):
    return graph.mul(d_p, tensors["c"])  # d(c * s)/ds = c


def masked_by(graph, score, tensors):
    """The score where tensors['keep'] holds (a bool mask), -inf elsewhere."""
    return graph.binary_select(score, float("-inf"), tensors["keep"])


def same_document(graph, score, tensors):
    """A document mask over ids given per query (tensors['q_doc'], [B, 1, Sq, 1]) and per key
    (tensors['kv_doc'], [B, 1, 1, Skv])."""
    return graph.binary_select(score, float("-inf"), graph.cmp_eq(tensors["q_doc"], tensors["kv_doc"]))
