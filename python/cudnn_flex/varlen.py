"""flex_attention_varlen: packed sequences in FlashAttention's varlen layout, with any mod.

Sequences of different lengths are concatenated along the token dim, as `flash_attn_varlen_func`
takes them: q [total_q, H, D], k and v [total_kv, H_kv, D / D_v], and `cu_seqlens_q/kv` (int32,
[n + 1], the running sum of the lengths, starting at 0) say where each sequence starts. Inside the
mods, `b` is the sequence number and `q_idx`/`kv_idx` are positions within that sequence, so a
causal mask_mod or an ALiBi score_mod means what it means for one sequence.

This first version runs the reference path (the padded batch's scores materialised in float32)
on every device, CUDA included, and says so once with ReferencePathWarning: it is right, not fast.
It copies q, k and v into a padded batch and reads the lengths on the host. The cuDNN ragged
layout with tile skipping (issue 13) replaces it without changing this function's contract.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional, Union

import torch

from . import reference
from ._validation import TensorDict, check_scale
from .api import warn_reference_once
from .record_call import record_call

def _lengths(cu_seqlens, name: str, tokens: torch.Tensor, tokens_name: str) -> list[int]:
    """The sequence lengths that cu_seqlens describes, checked against the token count."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cudnn_flex: {name} must be a torch.Tensor of int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cudnn_flex: {name} must be int32 (as FlashAttention's), got {cu_seqlens.dtype}; "
                         f"pass {name}.to(torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cudnn_flex: {name} must be 1-D [n + 1] (0, then the running sum of the n "
                         f"lengths), got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != tokens.device:
        raise ValueError(f"cudnn_flex: {name} is on {cu_seqlens.device} but {tokens_name} is on "
                         f"{tokens.device}; put it on {tokens_name}'s device")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cudnn_flex: {name} must start at 0, got {bounds[0]}")
    lengths = [b - a for a, b in zip(bounds, bounds[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cudnn_flex: {name} must not decrease (it is a running sum of lengths), got {bounds}")
    if bounds[-1] != tokens.shape[0]:
        raise ValueError(f"cudnn_flex: {name} ends at {bounds[-1]} but {tokens_name} has {tokens.shape[0]} "
                         "tokens; the last entry is the total length")
    return lengths


def _longest(lengths: list[int], given, name: str) -> int:
    longest = max(lengths, default=0)
    if given is None:
        return longest
    try:
        value = operator.index(given)  # int, numpy and 0-dim integer tensors; not floats or bools
    except TypeError:
        value = None
    if isinstance(given, bool) or value is None or value < longest:
        raise ValueError(f"cudnn_flex: {name} must be an int at least the longest sequence ({longest}), "
                         f"got {given!r}")
    return value


def _check_tokens(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cudnn_flex: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"cudnn_flex: {name} must be 3-D [total tokens, heads, head dim] (sequences "
                             f"concatenated, as FlashAttention's varlen layout), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"cudnn_flex: q is {q.dtype} on {q.device} but {name} is {t.dtype} on {t.device}; "
                             "q, k and v need one dtype and one device")
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"cudnn_flex: k and v must have the same number of tokens ({shapes})")
    if k.shape[1] == 0 or k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"cudnn_flex: k and v need one head count H_kv >= 1 that divides q's ({shapes})")
    if q.shape[2] != k.shape[2] or q.shape[2] == 0:
        raise ValueError(f"cudnn_flex: q and k need one head dim of at least 1 ({shapes})")


def _token_places(lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, position within it) of each packed token."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                  torch.tensor(lengths, device=device, dtype=torch.long))
    starts = torch.tensor([0] + lengths[:-1], device=device, dtype=torch.long).cumsum(0)
    return seq, torch.arange(seq.numel(), device=device) - starts[seq]


def _padded(x: torch.Tensor, places: tuple, n: int, longest: int) -> torch.Tensor:
    """[total, H, D] -> [n, H, longest, D], zeros after each sequence (a copy; differentiable)."""
    out = x.new_zeros((n, longest) + tuple(x.shape[1:]))
    return out.index_put(places, x).permute(0, 2, 1, 3)


@torch.compiler.disable  # host reads of the lengths: under torch.compile it runs eagerly (a graph break)
def flex_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor,
                          score_mod: Optional[Callable] = None,
                          score_mod_bprop: Optional[Callable] = None,
                          score_mod_tensors: TensorDict = None,
                          score_mod_bprop_tensors: TensorDict = None,
                          *, mask_mod: Optional[Callable] = None,
                          max_seqlen_q: Optional[int] = None, max_seqlen_kv: Optional[int] = None,
                          scale: Optional[float] = None, return_lse: bool = False,
                          deterministic: bool = False,
                          ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention over n packed sequences, each attending only to itself, with score_mod/mask_mod.

    Args:
        q: [total_q, H_q, D], the n query sequences concatenated.
        k: [total_kv, H_kv, D]; H_q a multiple of H_kv (GQA/MQA).
        v: [total_kv, H_kv, D_v].
        cu_seqlens_q: int32 [n + 1] on q's device: 0, then the running sum of the query lengths
            (sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]); zero lengths are allowed.
        cu_seqlens_kv: int32 [n + 1], the same for k and v.
        score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors, mask_mod: as for
            flex_attention, with b the sequence number and q_idx, kv_idx positions within the
            sequence; score_mod tensors broadcast against [n, H_q, max_seqlen_q, max_seqlen_kv].
        max_seqlen_q, max_seqlen_kv: the longest query / key sequence (read from cu_seqlens when
            not given; a smaller value is an error).
        scale: default 1/sqrt(D).
        return_lse: also return the float32 log-sum-exp [H_q, total_q] (FlashAttention's layout).
        deterministic: accepted; the reference path is deterministic.
    Returns:
        out [total_q, H_q, D_v] in q's dtype, and with return_lse=True (out, lse). A query whose
        sequence has no keys gets out = 0 and lse = -inf.
    """
    _check_tokens(q, k, v)
    lengths_q = _lengths(cu_seqlens_q, "cu_seqlens_q", q, "q")
    lengths_kv = _lengths(cu_seqlens_kv, "cu_seqlens_kv", k, "k")
    if len(lengths_q) != len(lengths_kv):
        raise ValueError(f"cudnn_flex: cu_seqlens_q describes {len(lengths_q)} sequences but cu_seqlens_kv "
                         f"{len(lengths_kv)}; each sequence needs both")
    longest_q = _longest(lengths_q, max_seqlen_q, "max_seqlen_q")
    longest_kv = _longest(lengths_kv, max_seqlen_kv, "max_seqlen_kv")
    check_scale(scale)
    places_q, places_kv = _token_places(lengths_q, q.device), _token_places(lengths_kv, q.device)
    n = len(lengths_q)
    qp = _padded(q, places_q, n, longest_q)
    kp, vp = _padded(k, places_kv, n, longest_kv), _padded(v, places_kv, n, longest_kv)
    program, mod_tensors, _ = record_call(score_mod, score_mod_bprop, mask_mod, score_mod_tensors,
                                          score_mod_bprop_tensors, qp, longest_kv)
    if q.is_cuda:  # 3: past torch.compiler.disable's wrapper, to the caller
        warn_reference_once("varlen", "cudnn_flex: flex_attention_varlen runs the PyTorch reference path "
                            "(materialised scores of the padded batch, not cuDNN) until its cuDNN ragged path "
                            "lands", 3)
    out, lse = reference.attention_program(qp, kp, vp, program, mod_tensors, scale,
                                           kv_lengths=torch.tensor(lengths_kv, device=q.device))
    # [n, H, longest_q, *] -> the valid rows, in token order.
    out = out.permute(0, 2, 1, 3)[places_q].to(q.dtype)
    if not return_lse:
        return out
    return out, lse.permute(0, 2, 1)[places_q].t().contiguous()


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32 [n + 1]) of a packed row whose tokens carry document ids, as torch flex's
    document mask takes them (`doc[q_idx] == doc[kv_idx]`): each run of equal ids is one sequence.
    With it, flex_attention_varlen(q[0].transpose(0, 1), ...) on the row computes what
    flex_attention with mask_mod=mods.document_mask(doc) computes (reads the ids on the host)."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.dim() != 1:
        raise ValueError("cudnn_flex: document_ids must be a 1-D tensor with one id per token of the packed row")
    ids, counts = torch.unique_consecutive(document_ids, return_counts=True)
    if ids.unique().numel() != ids.numel():
        # [0, 0, 1, 0]: the document mask lets the last token see the first two; packed sequences cannot.
        raise ValueError("cudnn_flex: each document's tokens must be contiguous in document_ids (an id comes back "
                         f"after another one: runs {ids.tolist()}); a document split in parts needs the dense "
                         "mask_mod=mods.document_mask(document_ids)")
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=document_ids.device)
    cu[1:] = counts.cumsum(0)
    return cu
