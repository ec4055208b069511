"""The cudnn_flex path: each case written the way a user of this library would write it.

The grid cases keep issue 5's DSL mods (graph, score, tensors); the mask cases use the ready
torch-style mods (mods.sliding_window, mods.softcap) and lambdas, because cudnn-flex recognises
causal and sliding-window bands inside such recorded programs and lowers them to cuDNN's
tile-skipping form: these cases measure that. A padded batch passes its lengths (seq_lens_q/kv),
and packed documents go through flex_attention_varlen with cu_seqlens made once from the ids
(cu_seqlens_from_document_ids) and max_seqlen given, as a user who packs documents would.
"""

from __future__ import annotations

import uuid
from typing import Callable, Optional

from ..cases import CASES, GEMMA_CAP, REL_C, SOFTCAP


def na_reason(case: str) -> Optional[str]:
    return None if case in CASES else f"unknown case {case}"


def doc_mask(graph, score, tensors):
    """Keeps keys in the query's document: doc_q [B,1,S,1] == doc_kv [B,1,1,S]."""
    same = graph.cmp_eq(tensors["doc_q"], tensors["doc_kv"])
    return graph.binary_select(score, float("-inf"), same)


class ColdMod:
    """A score_mod no other part of the run uses, with a fresh cache key per object, so its first
    call misses the cache: score + 0.5 * sin((q_idx - kv_idx) * c)."""

    def __init__(self, c: float):
        self.c = float(c)
        self.token = uuid.uuid4().hex

    def score_mod_graph_cache_key(self):
        return (self.token, self.c)

    def __call__(self, graph, score, tensors):
        dist = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        return graph.add(score, graph.mul(graph.sin(graph.mul(dist, self.c)), 0.5))


def kwargs(case: str, inputs: dict) -> dict:
    """cudnn_flex.flex_attention keyword arguments for one case."""
    from cudnn_flex import dsl_mods, mods
    if case in ("nomod", "decode"):
        return {}
    if case == "causal":
        return {"score_mod": dsl_mods.causal}
    if case == "softcap":
        cap = dsl_mods.softcap(SOFTCAP)
        return {"score_mod": cap.forward, "score_mod_bprop": cap.backward}
    if case == "alibi":
        return {"score_mod": dsl_mods.alibi, "score_mod_tensors": {"slopes": inputs["slopes"]}}
    if case == "relbias":
        return {"score_mod": dsl_mods.relative_bias(REL_C)}
    if case == "docmask":
        return {"score_mod": doc_mask, "score_mod_tensors": {"doc_q": inputs["doc_q"], "doc_kv": inputs["doc_kv"]}}
    if case == "window1k":
        return {"mask_mod": mods.sliding_window(inputs["window"])}
    if case in ("docs8x2k", "docsmix"):  # the dense form; runner() takes the packed one
        return {"mask_mod": mods.document_mask(inputs["doc_ids"])}
    if case == "decode_softcap":
        return {"score_mod": mods.softcap(GEMMA_CAP)}
    if case == "gemma2":
        return {"score_mod": mods.softcap(GEMMA_CAP), "mask_mod": mods.sliding_window(inputs["window"])}
    if case == "padded":
        return {"seq_lens_q": inputs["seq_len_q"].view(-1), "seq_lens_kv": inputs["seq_len_kv"].view(-1)}
    if case == "decode_alibi":
        slopes, offset = inputs["slopes"].view(-1), inputs["offset"]
        return {"score_mod": lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - (q_idx + offset))}
    raise ValueError(case)


def runner(case: str, inputs: dict) -> Callable:
    import cudnn_flex
    if case in ("docs8x2k", "docsmix"):
        return _packed_documents(inputs)
    kw = kwargs(case, inputs)
    return lambda q, k, v: cudnn_flex.flex_attention(q, k, v, **kw)


def _packed_documents(inputs: dict) -> Callable:
    """One packed row [1, H, S, D] as flex_attention_varlen's [S, H, D] (views), one sequence per
    document; out back as [1, H, S, D]."""
    import cudnn_flex
    cu = cudnn_flex.cu_seqlens_from_document_ids(inputs["doc_ids"])
    longest = max(inputs["doc_lengths"])

    def packed(q, k, v):
        row = lambda t: t.squeeze(0).transpose(0, 1)  # noqa: E731
        out = cudnn_flex.flex_attention_varlen(row(q), row(k), row(v), cu, cu, max_seqlen_q=longest,
                                               max_seqlen_kv=longest)
        return out.transpose(0, 1).unsqueeze(0)
    return packed
