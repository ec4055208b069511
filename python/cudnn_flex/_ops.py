"""The forward op as the Python entry points call it (fwd), and the fake kernels of
torch.ops.cudnn_flex.{fwd,bwd}: shapes and strides without running anything.

The CUDA kernels and the autograd of fwd (csrc/autograd.cpp) are C++."""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # loading the extension registers the ops


def _overridable(q, k, v, mod_tensors, bprop_tensors, seq_lens, cu_seqlens) -> bool:
    """Whether __torch_function__ may want to see the call: a TorchFunctionMode is on, or a tensor
    is of a subclass (torch.ops calls their handlers; _C.fwd does not)."""
    if torch._C._is_torch_function_mode_enabled():
        return True
    if type(q) is not _TENSOR or type(k) is not _TENSOR or type(v) is not _TENSOR:
        return True
    for t in (*mod_tensors, *bprop_tensors, *seq_lens, *cu_seqlens):  # most calls have none
        if type(t) is not _TENSOR:
            return True
    return False


_TENSOR = torch.Tensor


def fwd(q, k, v, program, mod_id: int, bprop_id: int, mod_tensors: list, bprop_tensors: list, scale,
        deterministic: bool, seq_lens=(), cu_seqlens=(), max_seqlens=(), compiling: bool = False,
        every_row_attends: bool = False, rows: Optional[int] = None, reads_head_or_key: Optional[bool] = None,
        plain: bool = False):
    """(out, lse) of torch.ops.cudnn_flex.fwd. Eager calls go through _C.fwd, the same op without
    boxing its arguments, unless __torch_function__ may want to see it (_overridable). `program`
    (None under torch.compile) is kept alive by the autograd node for its backward.
    every_row_attends: the padded lengths' values, read on the host, leave no query row outside its
    sequence or without a key (padded_batch.cudnn_seq_lens), so the op need not clear out and lse.
    rows: q.shape[2], where the caller knows it (the shortcut: a read of .shape costs ~0.13 us).
    reads_head_or_key: the program's, where it is not at hand (under torch.compile; None: taken
    as reading them).
    plain: the caller found every tensor of the call a plain torch.Tensor, with no TorchFunctionMode
    on, just before (the shortcut does: its key and call check them), so _overridable need not
    look again (about 0.3 us a call)."""
    at_one_row = mod_id != 0 and (q.shape[2] if rows is None else rows) == 1 and not cu_seqlens
    one_row = at_one_row and (
        needs_two_rows(program.reads_head_or_key if program is not None else reads_head_or_key, k.shape[2])
        # (not read while dynamo traces: it would guard on the whole set and recompile at each refusal)
        or not compiling and bool(_refused_at_one_row)
        and _one_row_key(q, k, v, mod_id, bprop_id, seq_lens) in _refused_at_one_row)
    if one_row:
        # The second row's out and lse are dropped. Without a backward it repeats the first (one
        # copy kernel; a zero row takes a fill too). With one it is zero: its share of the
        # gradients is zero as long as its scores are finite (its dO row is zero, so are its dP
        # and D = rowsum(dO * O), and so its dS), and a mask over q_idx may show it a key the
        # first row does not see (the next slot of a KV cache: 0 * k stays finite where k is,
        # q * k need not; an inf or NaN there still reaches the gradients). (Not an expanded
        # view: the op lays out out like q, and a stride-0 row dim would come innermost.)
        backward = _backward_follows(q, k, v)
        q = torch.cat([q, torch.zeros_like(q) if backward else q], dim=2)
        every_row_attends = False  # the second row lies past the query lengths: the op clears it
    op = torch.ops.cudnn_flex.fwd if compiling or not plain and _overridable(q, k, v, mod_tensors, bprop_tensors,
                                                                           seq_lens, cu_seqlens) else _C.fwd
    try:
        out, lse = op(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, True, scale, deterministic, seq_lens,
                      cu_seqlens, max_seqlens, every_row_attends)
    except (ValueError, RuntimeError) as refusal:  # (a refusal past choosing a kernel is a RuntimeError)
        if one_row or not at_one_row or not str(refusal).startswith(_REFUSED_FORWARD):
            raise
        # cuDNN took no kernel for this program at one row: two rows, now and for the calls after.
        key = _one_row_key(q, k, v, mod_id, bprop_id, seq_lens)
        if len(_refused_at_one_row) >= _MAX_REFUSED:
            _refused_at_one_row.clear()
        _refused_at_one_row.add(key)
        try:
            return fwd(q, k, v, program, mod_id, bprop_id, mod_tensors, bprop_tensors, scale, deterministic,
                       seq_lens, cu_seqlens, max_seqlens, compiling, every_row_attends, rows, reads_head_or_key, plain)
        except (ValueError, RuntimeError) as at_two_rows:
            if not str(at_two_rows).startswith(_REFUSED_FORWARD):
                raise
            _refused_at_one_row.discard(key)  # refused at two rows too: the problem, not the row count
            raise refusal from None
    if program is not None and out.requires_grad:
        # The backward graph may be built long after: its program lives as long as the node.
        out.grad_fn.metadata["cudnn_flex_program"] = program
    if one_row:
        out, lse = out.narrow(2, 0, 1), lse.narrow(2, 0, 1)
    return out, lse


# One-row calls that cuDNN refused to build (_one_row_key). cuDNN 9.19 refuses some programs at one
# query row that it takes at two (measured on the H200: random programs over erf, sin, exp or the
# *_backward ops; NOT_SUPPORTED at finalize), which then run two rows, as all did before; the
# refusal (a failed build, tens of ms) is not asked again in this process. A compiled graph fixes
# its rows when traced: there a refused program raises.
_refused_at_one_row: set = set()
_MAX_REFUSED = 4096
_REFUSED_FORWARD = "cudnn_flex: cuDNN refused the forward attention graph"


def _one_row_key(q, k, v, mod_id: int, bprop_id: int, seq_lens) -> tuple:
    """What a refusal at one row is known for: the program, the shapes and dtype, a padded batch,
    and whether a backward follows (a forward-only graph is another graph)."""
    return (mod_id, bprop_id, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), bool(seq_lens),
            _backward_follows(q, k, v))


def _backward_follows(q, k, v) -> bool:
    """Whether the op's autograd node will be made (a tensor to differentiate, grad mode on)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def needs_two_rows(reads_head_or_key: Optional[bool], s_kv: int) -> bool:
    """Whether a call with one query row of a program that reads the head or key index
    (Program.reads_head_or_key; None: not known) runs as two on cuDNN, the second dropped.
    cuDNN 9.19 computes the key index, and the head index under GQA, wrongly inside a score_mod
    when the query dim is 1 (measured on the H200: `s + 0.01 * kv_idx` had out off by 0.12 over
    2048 keys, `s + 0.3 * h` lse by 0.9 with 8 query heads over 2), and refuses the backward
    graph of one query and one key. Programs that read neither index (the score alone, q_idx, b,
    score_mod tensors: a softcap, a bias) came out right at one row, forward and backward."""
    return reads_head_or_key is not False or s_kv == 1


def strides_like(like: torch.Tensor, sizes) -> list[int]:
    """Strides of a new tensor of `sizes` in the dimension order of `like` (mirrors ops.cpp)."""
    order = sorted(range(like.dim()), key=lambda d: -like.stride(d))  # stable: ties keep order
    strides = [0] * like.dim()
    running = 1
    for d in reversed(order):
        strides[d] = running
        running *= sizes[d]
    return strides


def _empty_like_layout(like: torch.Tensor, sizes, dtype=None) -> torch.Tensor:
    return like.new_empty_strided(tuple(sizes), strides_like(like, sizes), dtype=dtype or like.dtype)


def _check(q, k, v, mod_tensors, bprop_tensors, cu_seqlens) -> None:
    """The checks of the C++ kernels (ops.cpp), so that a compiled model fails while tracing."""
    dims = 3 if cu_seqlens and q.dim() == 3 else 4  # packed sequences come as [total, H, D]
    for name, t in (("q", q), ("k", k), ("v", v)):
        torch._check_value(t.dim() == dims, lambda: f"cudnn_flex: {name} must be 4-D [B, H, S, D]"
                                                    + (" (packed: [total, H, D])" if cu_seqlens else ""))
    torch._check_value(q.dtype == k.dtype == v.dtype, lambda: "cudnn_flex: q, k and v must have one dtype")
    torch._check_value(q.device == k.device == v.device, lambda: "cudnn_flex: q, k and v must be on one device")
    torch._check_value(k.shape[1] > 0 and k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0,
                       lambda: "cudnn_flex: k and v need the same number of heads (> 0), and q's head "
                               "count a multiple of it")
    for role, tensors in (("score_mod tensor", mod_tensors), ("score_mod_bprop tensor", bprop_tensors)):
        for i, t in enumerate(tensors):
            host_scalar = t.device.type == "cpu" and t.numel() == 1
            torch._check_value(host_scalar or t.device == q.device,
                               lambda: f"cudnn_flex: {role} #{i} is on {t.device} but q is on {q.device}")
            torch._check_value(t.dim() <= 4, lambda: f"cudnn_flex: {role} #{i} has more than 4 dims")


@torch.library.register_fake("cudnn_flex::fwd")
def _fwd_fake(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic, seq_lens,
              cu_seqlens, max_seqlens, every_row_attends=False):
    _check(q, k, v, mod_tensors, bprop_tensors, cu_seqlens)
    out = _empty_like_layout(q, tuple(q.shape[:-1]) + (v.shape[-1],))
    # Packed sequences ([total, H, D]): lse per sequence and position, [n, H, max_q].
    rows = (cu_seqlens[0].shape[0] - 1, max_seqlens[0]) if cu_seqlens else (q.shape[0], q.shape[2])
    lse = q.new_empty((rows[0], q.shape[1], rows[1]), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("cudnn_flex::bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale,
              deterministic, seq_lens, cu_seqlens, max_seqlens):
    _check(q, k, v, mod_tensors, bprop_tensors, cu_seqlens)
    return (_empty_like_layout(q, q.shape), _empty_like_layout(k, k.shape), _empty_like_layout(v, v.shape))
