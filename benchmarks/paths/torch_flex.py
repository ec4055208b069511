"""torch flex_attention under torch.compile: score_mods (score, b, h, q_idx, kv_idx) and masks as
BlockMasks made by create_block_mask from a mask_mod (b, h, q_idx, kv_idx), so that it skips the
masked blocks. Written without cudnn_flex, so this path runs when the extension does not build;
tests/python/test_bench_helpers.py checks both paths give the same attention."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..cases import CASES, GEMMA_CAP, REL_C, SOFTCAP


def na_reason(case: str) -> Optional[str]:
    return None if case in CASES else f"unknown case {case}"


def softcap(cap: float) -> Callable:
    def softcap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return softcap_score


def relbias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx) * REL_C


def alibi(slopes_1d: torch.Tensor, offset: int = 0) -> Callable:
    """ALiBi with the query at q_idx + offset (offset Skv - Sq: bottom-right)."""
    if offset == 0:   # the grid's form, without an add of 0 in the compiled kernel
        return lambda score, b, h, q_idx, kv_idx: score + slopes_1d[h] * (kv_idx - q_idx)

    def alibi_score(score, b, h, q_idx, kv_idx):
        return score + slopes_1d[h] * (kv_idx - (q_idx + offset))
    return alibi_score


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window_mask(window: int) -> Callable:
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < window)
    return sliding_window


def doc_mask(doc: torch.Tensor) -> Callable:
    """doc [B, S] (per batch row) or [S] (one packed sequence)."""
    if doc.dim() == 1:
        return lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]
    return lambda b, h, q_idx, kv_idx: doc[b, q_idx] == doc[b, kv_idx]


def padding_mask(lengths: torch.Tensor) -> Callable:
    def valid(b, h, q_idx, kv_idx):
        return (q_idx < lengths[b]) & (kv_idx < lengths[b])
    return valid


def mods(case: str, inputs: dict) -> tuple:
    """(score_mod, block_mask) for torch's flex_attention; block masks are built here, untimed."""
    from torch.nn.attention.flex_attention import create_block_mask
    shape, dev = inputs["shape"], inputs["q"].device

    def block(mask_mod, per_batch=False):
        return create_block_mask(mask_mod, shape.b if per_batch else None, None, shape.sq, shape.s, device=dev)

    if case in ("nomod", "decode"):
        return None, None
    if case == "causal":
        return None, block(causal_mask)
    if case == "softcap":
        return softcap(SOFTCAP), None
    if case == "alibi":
        return alibi(inputs["slopes"].view(-1)), None
    if case == "relbias":
        return relbias, None
    if case == "docmask":
        return None, block(doc_mask(inputs["doc"]), per_batch=True)
    if case == "window1k":
        return None, block(window_mask(inputs["window"]))
    if case in ("docs8x2k", "docsmix"):
        return None, block(doc_mask(inputs["doc_ids"]))
    if case == "decode_softcap":
        return softcap(GEMMA_CAP), None
    if case == "gemma2":
        return softcap(GEMMA_CAP), block(window_mask(inputs["window"]))
    if case == "padded":
        return None, block(padding_mask(inputs["lengths"]), per_batch=True)
    if case == "decode_alibi":
        return alibi(inputs["slopes"].view(-1), inputs["offset"]), None
    raise ValueError(case)


_compiled = {}


def compiled_flex(mode: str):
    """One torch.compile'd flex_attention for the whole run (compiled per new mod/shape on first
    use, which the runners do outside the timed region). mode: "static" or "auto"."""
    if mode not in _compiled:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dcfg
        # Many mods x shapes: the default recompile limit (8) would silently fall back to the
        # eager, score-materializing flex_attention. Raise it, and fail loudly if still hit.
        for name, value in (("recompile_limit", 1000), ("cache_size_limit", 1000),
                            ("accumulated_recompile_limit", 10000), ("accumulated_cache_size_limit", 10000),
                            ("fail_on_recompile_limit_hit", True)):
            if hasattr(dcfg, name):
                setattr(dcfg, name, value)
        _compiled[mode] = torch.compile(flex_attention, dynamic=False if mode == "static" else None)
    return _compiled[mode]


def runner(case: str, inputs: dict, compile_mode: str) -> Callable:
    fn = compiled_flex(compile_mode)
    score_mod, block_mask = mods(case, inputs)
    shape = inputs["shape"]
    gqa = {"enable_gqa": True} if shape.hkv != shape.h else {}
    return lambda q, k, v: fn(q, k, v, score_mod=score_mod, block_mask=block_mask, **gqa)
