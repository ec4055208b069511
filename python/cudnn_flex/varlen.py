"""flex_attention_varlen: packed sequences in FlashAttention's varlen layout, with any mod.

Sequences of different lengths are concatenated along the token dim, as `flash_attn_varlen_func`
takes them: q [total_q, H, D], k and v [total_kv, H_kv, D / D_v], and `cu_seqlens_q/kv` (int32,
[n + 1], the running sum of the lengths, starting at 0) say where each sequence starts. Inside the
mods, `b` is the sequence number and `q_idx`/`kv_idx` are positions within that sequence, so a
causal mask_mod or an ALiBi score_mod means what it means for one sequence.

On cuDNN the packed tokens are read in place (ragged offsets into q, k, v, o and the gradients,
in any dimension order without gaps; the lengths as seq_len tensors) and the tiles past each
sequence are skipped, so n sequences cost what n separate calls would, not one call over the
whole packed row. Sequences all of one length
run as a batch of views. Elsewhere the sequences are copied into a padded batch [n, H, longest, D]
and run as flex_attention with seq_lens_q/seq_lens_kv (the reference path). With max_seqlen_q/kv
given, a call reads nothing on the host once its cu_seqlens tensors were checked (once per tensor
and version), and a repeat with the same mods and cu_seqlens tensors goes straight to the op
(fast_path.py).
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, NamedTuple, Optional, Union

import torch

from . import fast_path
from ._validation import TensorDict, check_dense_last_dim, check_mods, check_scale, once_per_version, use_cudnn
from ._ops import strides_like
from .api import cudnn_call, flex_attention
from .record_call import record_call


class _Sequences(NamedTuple):
    """What a checked cu_seqlens says, from one host read per tensor and version."""
    n: int
    longest: int      # max_seqlen as given, else the longest sequence
    all_full: bool    # every sequence is `longest` long
    lengths: torch.Tensor  # int32 [n] on cu_seqlens' device: one tensor per version, so that
    #                        flex_attention (seq_lens) reads it on the host once too


def _checked_cu_seqlens(cu_seqlens, name: str, tokens: torch.Tensor, tokens_name: str, given,
                        max_name: str) -> _Sequences:
    """Checks cu_seqlens (and max_seqlen against it) and says what it holds; its values are read
    on the host once per tensor and version (_validation.once_per_version)."""
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
    if given is not None:
        try:
            value = operator.index(given)  # int, numpy and 0-dim integer tensors; not floats or bools
        except TypeError:
            value = None
        if isinstance(given, bool) or value is None:
            raise ValueError(f"cudnn_flex: {max_name} must be an int, got {given!r}")

    def read() -> _Sequences:
        if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
            raise ValueError(f"cudnn_flex: {name} was not checked with {max_name}={given!r} since its last change, "
                             "and its values cannot be read on the host during CUDA graph capture; call "
                             "flex_attention_varlen once with the same cu_seqlens and max_seqlen before capturing "
                             "(the warm-up call), then capture")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            raise ValueError(f"cudnn_flex: {name} must start at 0, got {bounds[0]}")
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if any(n < 0 for n in lengths):
            raise ValueError(f"cudnn_flex: {name} must not decrease (it is a running sum of lengths), got {bounds}")
        if bounds[-1] != tokens.shape[0]:
            raise ValueError(f"cudnn_flex: {name} ends at {bounds[-1]} but {tokens_name} has {tokens.shape[0]} "
                             "tokens; the last entry is the total length")
        if given is not None and given < max(lengths, default=0):
            raise ValueError(f"cudnn_flex: {max_name} must be an int at least the longest sequence "
                             f"({max(lengths)}), got {given!r}")
        longest = int(given) if given is not None else max(lengths, default=0)
        return _Sequences(len(lengths), longest, all(n == longest for n in lengths),
                          (cu_seqlens[1:] - cu_seqlens[:-1]).contiguous())

    return once_per_version(cu_seqlens, ("sequences", tokens.shape[0], None if given is None else int(given)), read)


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
    shapes = lambda: f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"  # noqa: E731  (errors only)
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"cudnn_flex: k and v must have the same number of tokens ({shapes()})")
    if k.shape[1] == 0 or k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(f"cudnn_flex: k and v need one head count H_kv >= 1 that divides q's ({shapes()})")
    if q.shape[2] != k.shape[2] or q.shape[2] == 0:
        raise ValueError(f"cudnn_flex: q and k need one head dim of at least 1 ({shapes()})")


def _padded_rows(cu_seqlens: torch.Tensor, total: int, longest: int, capturing: bool = False) -> torch.Tensor:
    """The row of each packed token in the padded batch's [n * longest] rows: sequence * longest +
    position within it (on the device, no host read; made once per cu_seqlens version: five
    launches that cost more host time than the attention call at small sizes; made in the graph
    while a CUDA graph is captured, so that replays follow new values)."""
    def rows():
        tokens = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
        seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
        return seq * longest + (tokens - cu_seqlens[seq]).long()
    return rows() if capturing else once_per_version(cu_seqlens, ("padded rows", total, longest), rows)


def _replayable(seq: _Sequences, cu_seqlens: torch.Tensor, given, which: str) -> _Sequences:
    """What a CUDA graph captured now may use of cu_seqlens: its replays run with whatever values
    the tensor holds then (static buffers updated in place, as servers do), so the lengths are
    computed inside the graph, the longest sequence is the caller's bound, and no shortcut is
    taken on what the values were at capture (all sequences full)."""
    if given is None:
        raise ValueError(f"cudnn_flex: under CUDA graph capture, pass max_seqlen_{which} (the bound every "
                         "replay's sequences keep to); the longest sequence at capture time would be baked "
                         "into the graph")
    return seq._replace(all_full=False, lengths=cu_seqlens[1:] - cu_seqlens[:-1])


def _padded(x: torch.Tensor, rows: torch.Tensor, n: int, longest: int) -> torch.Tensor:
    """[total, H, D] -> [n, H, longest, D], zeros after each sequence: one copy of whole token rows
    (index_copy_, in place into the zeros: the out-of-place form copies them once more; its
    backward gathers rows), differentiable. Zeros, not garbage: cuDNN reads the padding of the
    last partial tile, and NaN there would reach the valid rows."""
    flat = x.reshape(x.shape[0], -1)
    out = flat.new_zeros((n * longest, flat.shape[1])).index_copy_(0, rows, flat)
    return out.view((n, longest) + tuple(x.shape[1:])).permute(0, 2, 1, 3)


def _unpadded(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[n, H, longest, *] -> [total, H, *]: the rows of the packed tokens (index_select)."""
    n, h, longest = x.shape[:3]
    by_token = x.permute(0, 2, 1, *range(3, x.dim())).reshape(n * longest, -1)
    return by_token.index_select(0, rows).view((rows.numel(), h) + tuple(x.shape[3:]))


def _packed_lse(lse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """lse [n, H, longest] -> FlashAttention's varlen layout [H, total]."""
    return _unpadded(lse.unsqueeze(-1), rows)[..., 0].t().contiguous()


@functools.lru_cache(maxsize=64)
def _stand_in(device: torch.device, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    return torch.empty((1, 1, 1, 1), device=device, dtype=dtype).expand(shape)


def _queries_shaped(q: torch.Tensor, n: int, longest_q: int, capturing: bool) -> torch.Tensor:
    """A stand-in for the queries as a padded batch [n, H, longest_q, D] (record_call reads the
    shape, device and dtype): one element, made once per shape (an allocation a call otherwise);
    not kept when made during a CUDA graph capture (it would come from the graph's memory pool)."""
    shape = (n, q.shape[1], longest_q, q.shape[2])
    return _stand_in.__wrapped__(q.device, q.dtype, shape) if capturing else _stand_in(q.device, q.dtype, shape)


def _readable_in_place(x: torch.Tensor) -> torch.Tensor:
    """x [total, H, D] as cuDNN's ragged offsets read it: in place when it is dense in its own
    dimension order (THD, or a [total, H, D] view of head-major storage), since its gradient is
    allocated in that order and shares its ragged offsets; else (e.g. k and v as views of one
    packed projection, with a gap between tokens) a contiguous copy."""
    if x.is_contiguous() or x.transpose(0, 1).is_contiguous():  # THD, HTD: the usual two, quickly
        return x
    return x if x.stride() == tuple(strides_like(x, x.shape)) else x.contiguous()


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
            Read once per tensor and version: change it in place or pass a new tensor (a write
            through .data, DLPack, numpy or a CUDA graph replay is not seen).
        cu_seqlens_kv: int32 [n + 1], the same for k and v.
        score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors, mask_mod: as for
            flex_attention, with b the sequence number and q_idx, kv_idx positions within the
            sequence; score_mod tensors broadcast against [n, H_q, max_seqlen_q, max_seqlen_kv].
        max_seqlen_q, max_seqlen_kv: the longest query / key sequence (read from cu_seqlens, a
            device sync, when not given; a smaller value is an error).
        scale: default 1/sqrt(D).
        return_lse: also return the float32 log-sum-exp [H_q, total_q] (FlashAttention's layout).
        deterministic: deterministic backward.
    Returns:
        out [total_q, H_q, D_v] in q's dtype, and with return_lse=True (out, lse). A query whose
        sequence has no keys gets out = 0 and lse = -inf.
    """
    args = (q, k, v, cu_seqlens_q, cu_seqlens_kv, score_mod, score_mod_bprop, score_mod_tensors,
            score_mod_bprop_tensors, mask_mod, max_seqlen_q, max_seqlen_kv, scale, return_lse, deterministic)
    # Host reads of the lengths: under torch.compile the call runs eagerly (a graph break). Eager
    # callers skip the disabled wrapper, whose frame switching costs ~5 us of host time a call.
    return _varlen_eagerly(*args) if torch.compiler.is_compiling() else _varlen(*args)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_kv, score_mod, score_mod_bprop, score_mod_tensors,
            score_mod_bprop_tensors, mask_mod, max_seqlen_q, max_seqlen_kv, scale, return_lse, deterministic):
    before = None  # a repeat of a packed call that ran in full (fast_path.py)
    shortcut = None
    found = fast_path.varlen_key(q, k, v, score_mod, score_mod_bprop, mask_mod, max_seqlen_q, max_seqlen_kv,
                                 score_mod_tensors, score_mod_bprop_tensors)
    if found is not None:
        shortcut = found[0]
        result = fast_path.varlen_call(shortcut, found[1], q, k, v, cu_seqlens_q, cu_seqlens_kv, scale, deterministic)
        if result is not None:
            return _packed_result(*result, cu_seqlens_q, q.shape[0], return_lse)
        before = fast_path.versions(cu_seqlens_q, cu_seqlens_kv)
    _check_tokens(q, k, v)
    check_mods(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors)
    seq_q = _checked_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, "q", max_seqlen_q, "max_seqlen_q")
    seq_kv = _checked_cu_seqlens(cu_seqlens_kv, "cu_seqlens_kv", k, "k", max_seqlen_kv, "max_seqlen_kv")
    if seq_q.n != seq_kv.n:
        raise ValueError(f"cudnn_flex: cu_seqlens_q describes {seq_q.n} sequences but cu_seqlens_kv "
                         f"{seq_kv.n}; each sequence needs both")
    longest_q, longest_kv = seq_q.longest, seq_kv.longest
    check_scale(scale)
    n = seq_q.n
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing and not use_cudnn(q, "auto"):
        raise ValueError(f"cudnn_flex: flex_attention_varlen under CUDA graph capture takes float16/bfloat16 "
                         f"tensors (cuDNN); {q.dtype} runs the reference path, which reads lengths on the host")
    if capturing:
        seq_q, seq_kv = _replayable(seq_q, cu_seqlens_q, max_seqlen_q, "q"), _replayable(seq_kv, cu_seqlens_kv,
                                                                                         max_seqlen_kv, "kv")
    if n > 0 and seq_q.all_full and seq_kv.all_full:
        # Sequences of one length are a batch already: views, no copies, no padding.
        batch = lambda t, s: t.unflatten(0, (n, s)).permute(0, 2, 1, 3)  # noqa: E731
        out, lse = flex_attention(batch(q, longest_q), batch(k, longest_kv), batch(v, longest_kv), score_mod,
                                  score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors, mask_mod=mask_mod,
                                  scale=scale, return_lse=True, deterministic=deterministic)
        out = out.permute(0, 2, 1, 3).flatten(0, 1)
        return (out, lse.permute(1, 0, 2).flatten(1, 2)) if return_lse else out
    if use_cudnn(q, "auto") and n > 0 and longest_q > 0 and longest_kv > 0:
        # cuDNN reads the packed tokens in place (ragged offsets), skipping the tiles past each length.
        reads = None if shortcut is None else fast_path.reads_before(shortcut, score_mod, score_mod_bprop, mask_mod)
        queries = _queries_shaped(q, n, longest_q, capturing)
        program, mod_tensors, bprop_tensors = record_call(
            score_mod, score_mod_bprop, mask_mod, score_mod_tensors, score_mod_bprop_tensors, queries, longest_kv)
        readable = [_readable_in_place(t) for t in (q, k, v)]
        check_dense_last_dim(*readable)
        # At most one query per sequence (decoding): cuDNN 9.19 evaluates kv_idx wrongly in a
        # score_mod when the query dim is 1 (api.cudnn_call); the dim is 2, the padding masks the rest.
        seq_lens, max_seqlens = [seq_q.lengths, seq_kv.lengths], [max(longest_q, 2), longest_kv]
        # The op takes the packed [total, H, D] tensors as they are and returns out as [total, H, D_v].
        out, lse = cudnn_call(*readable, program, mod_tensors, bprop_tensors, scale, deterministic, seq_lens,
                              [cu_seqlens_q, cu_seqlens_kv], max_seqlens)
        if shortcut is not None and not capturing and all(r is t for r, t in zip(readable, (q, k, v))):
            # (Copied tokens would be refused by the op on the shortcut, then copied again.)
            fast_path.remember_varlen(shortcut, reads, program, score_mod, score_mod_bprop, mask_mod, queries,
                                      cu_seqlens_q, cu_seqlens_kv, before, seq_lens, max_seqlens)
        return _packed_result(out, lse, longest_q, cu_seqlens_q, q.shape[0], return_lse, capturing)
    rows_q = _padded_rows(cu_seqlens_q, q.shape[0], longest_q, capturing)
    rows_kv = _padded_rows(cu_seqlens_kv, k.shape[0], longest_kv, capturing)
    qp = _padded(q, rows_q, n, longest_q)
    kp, vp = _padded(k, rows_kv, n, longest_kv), _padded(v, rows_kv, n, longest_kv)
    out, lse = flex_attention(qp, kp, vp, score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors,
                              mask_mod=mask_mod, scale=scale, return_lse=True, deterministic=deterministic,
                              seq_lens_q=seq_q.lengths, seq_lens_kv=seq_kv.lengths)
    # [n, H, longest_q, *] -> the valid rows, in token order.
    out = _unpadded(out, rows_q)
    return (out, _packed_lse(lse, rows_q)) if return_lse else out


def _packed_result(out: torch.Tensor, lse: torch.Tensor, longest_q: int, cu_seqlens_q: torch.Tensor, total_q: int,
                   return_lse: bool, capturing: bool = False):
    """out [total_q, H, D_v], and with return_lse the lse of cuDNN's packed call ([n, H, max_q],
    rows past each sequence unwritten) in FlashAttention's layout [H, total_q]."""
    if not return_lse:
        return out
    return out, _packed_lse(lse[:, :, :longest_q], _padded_rows(cu_seqlens_q, total_q, longest_q, capturing))


_varlen_eagerly = torch.compiler.disable(_varlen)


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
