"""flex_attention, FlexAttention and validate_graphs: the public entry points and the choice of path."""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import torch

from . import _ops, _registry, fast_path, reference
from ._validation import (_CUDNN_DTYPES, _FROM_BHSD, _TO_BHSD, TensorDict, bhsd_views,
                          check_dense_last_dim, check_mods, check_scale, padded_lengths, use_cudnn)
from .padded_batch import cudnn_seq_lens
from .record_call import record_call

_warned: set = set()  # the reasons ReferencePathWarning was given for in this process


class ReferencePathWarning(UserWarning):
    """flex_attention ran the PyTorch reference path instead of cuDNN (silence with warnings.filterwarnings)."""


def warn_reference_once(reason: str, message: str, stacklevel: int) -> None:
    """ReferencePathWarning with `message`, once per process for each reason; stacklevel as
    warnings.warn's, counted from the caller of this function (1: that caller)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(message, ReferencePathWarning, stacklevel=stacklevel + 1)


def _warn_reference(q: torch.Tensor) -> None:
    """A dtype or device cuDNN does not take."""
    warn_reference_once("dtype", f"cudnn_flex: {q.dtype} tensors on {q.device} run the PyTorch reference "
                        "path (materialized scores, not cuDNN); CUDA float16/bfloat16 tensors take cuDNN", 3)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   score_mod: Optional[Callable] = None,
                   score_mod_bprop: Optional[Callable] = None,
                   score_mod_tensors: TensorDict = None,
                   score_mod_bprop_tensors: TensorDict = None,
                   *, scale: Optional[float] = None, layout: str = "bhsd",
                   return_lse: bool = False, deterministic: bool = False,
                   backend: str = "auto", mask_mod: Optional[Callable] = None,
                   seq_lens_q: Optional[torch.Tensor] = None, seq_lens_kv: Optional[torch.Tensor] = None,
                   ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention softmax(score_mod(scale * Q K^T)) V as one fused cuDNN kernel, forward and backward.

    Args:
        q: [B, H_q, Sq, D] in layout "bhsd" ([B, Sq, H_q, D] for "bshd", [Sq, B, H_q, D] for
            "sbhd"); CUDA float16/bfloat16 takes cuDNN, anything else the reference path.
        k: [B, H_kv, Skv, D] in the same layout; H_q a multiple of H_kv (GQA/MQA).
        v: [B, H_kv, Skv, D_v] in the same layout.
        score_mod: score_mod(score, b, h, q_idx, kv_idx) -> score (torch-style), or
            score_mod(graph, score, tensors) -> score in the cuDNN frontend's DSL.
        score_mod_bprop: DSL bprop(graph, dP, tensors) -> dP; derived from the score_mod's ops
            when not given (none is needed for biases and -inf masks).
        score_mod_tensors: DSL only: name -> tensor broadcastable to [B, H_q, Sq, Skv] (a
            one-element CPU tensor is passed by value). Their values never rebuild a graph.
            cuDNN reads float and int32 tensors in place; bool, uint8 and int64 ones as float32
            copies made on every call (pass int32 ids to avoid them). It computes in float32:
            integers are exact below 2**24.
        score_mod_bprop_tensors: the same, for score_mod_bprop.
        scale: default 1/sqrt(D).
        layout: "bhsd", "bshd" or "sbhd"; out comes back in it (views, no copies).
        return_lse: also return the float32 log-sum-exp [B, H_q, Sq].
        deterministic: deterministic backward.
        backend: "auto", "cudnn" (refuses what cuDNN cannot take) or "reference".
        mask_mod: mask_mod(b, h, q_idx, kv_idx) -> bool, as for torch's flex_attention (with a
            torch-style score_mod or none).
        seq_lens_q, seq_lens_kv: int32 [B] on q's device, the valid length of each batch
            element of a padded batch: keys at kv_idx >= seq_lens_kv[b] are masked, and rows at
            q_idx >= seq_lens_q[b] give out = 0, lse = -inf and no gradient. On cuDNN the tiles
            past the lengths are skipped; the padding must hold finite values: cuDNN reads the
            last partial tile, and NaN there reaches the valid rows through 0 * NaN (the
            reference path zeroes it).
    Returns:
        out [B, H_q, Sq, D_v] in `layout` (q's dtype), and with return_lse=True (out, lse).
    Raises:
        ValueError/TypeError naming the argument; cudnn_flex.UnsupportedConstruct for a
        torch-style construct that cannot become a kernel; BpropNotDerivable when a bprop
        cannot be derived (raised by the backward; the forward runs).
    """
    shortcut = None  # a repeat of a call that ran in full: fast_path.py says when it provably may skip the work
    if not torch.compiler.is_compiling():
        found = fast_path.key(q, k, v, score_mod, score_mod_bprop, mask_mod, layout, backend, score_mod_tensors,
                              score_mod_bprop_tensors)
        if found is not None:
            shortcut = found[0]
            result = fast_path.call(shortcut, found[1], q, k, v, scale, layout, return_lse, deterministic,
                                    seq_lens_q, seq_lens_kv)
            if result is not None:
                return result
    q, k, v = bhsd_views(q, k, v, layout)
    # No scale: the op applies 1/sqrt(head dim) itself, so that under torch.compile(dynamic=True)
    # the head dim can stay symbolic here.
    check_scale(scale)
    check_mods(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors)
    reads = None if shortcut is None else fast_path.reads_before(shortcut, score_mod, score_mod_bprop, mask_mod)
    program, mod_tensors, bprop_tensors = record_call(score_mod, score_mod_bprop, mask_mod, score_mod_tensors,
                                                      score_mod_bprop_tensors, q, k.shape[2])
    if use_cudnn(q, backend):
        check_dense_last_dim(q, k, v)
        seq_lens, every_row_attends = cudnn_seq_lens(seq_lens_q, seq_lens_kv, q, k)
        out, lse = cudnn_call(q, k, v, program, mod_tensors, bprop_tensors, scale, deterministic, seq_lens,
                              every_row_attends=every_row_attends)
        if shortcut is not None:
            fast_path.remember(shortcut, reads, program, score_mod, score_mod_bprop, mask_mod, q, k.shape[2])
    else:
        _warn_reference(q)
        out, lse = _reference_call(q, k, v, program, mod_tensors, scale, seq_lens_q, seq_lens_kv)
    if layout != "bhsd":
        out = out.permute(_FROM_BHSD[layout])
    return (out, lse) if return_lse else out


def cudnn_call(q, k, v, program, mod_tensors, bprop_tensors, scale, deterministic, seq_lens=(), cu_seqlens=(),
               max_seqlens=(), every_row_attends: bool = False):
    """torch.ops.cudnn_flex.fwd for a recorded call (flex_attention's and flex_attention_varlen's
    cuDNN path): (out, lse). every_row_attends: as padded_batch.cudnn_seq_lens found it."""
    compiling = torch.compiler.is_compiling()
    for i, t in enumerate(mod_tensors + bprop_tensors):
        if t.dtype == torch.float64:
            raise ValueError(f"cudnn_flex: score_mod tensor #{i} is float64, which cuDNN's fused "
                             "attention does not read; pass it as float32")
        if t.requires_grad and torch.is_grad_enabled():
            # A torch-style mod's captured tensor (score_mod_tensors that require grad are refused
            # by name before): torch's flex_attention would train it; the op returns no gradient.
            # Also while dynamo traces: a compiled model's parameter would silently stop learning.
            raise ValueError(f"cudnn_flex: the mod captures a tensor that requires grad (capture {i}: shape "
                             f"{tuple(t.shape)} as indexed), but cuDNN computes no gradient for the tensors a mod "
                             "captures, so it would never learn; capture t.detach() (or a buffer), call under "
                             "torch.no_grad(), or use backend='reference'")
    if compiling:  # recorded while dynamo traced (record_call)
        (mod_id, bprop_id, reads_head_or_key), program = program, None
    else:
        mod_id, bprop_id = (program.mod_id, program.bprop_id) if program is not None else (0, 0)
        reads_head_or_key = None  # (_ops.fwd reads the program's own)
    return _ops.fwd(q, k, v, program, mod_id, bprop_id, mod_tensors, bprop_tensors,
                    None if scale is None else float(scale), bool(deterministic), seq_lens, cu_seqlens, max_seqlens,
                    compiling, every_row_attends, reads_head_or_key=reads_head_or_key)


@torch.compiler.disable  # reads lengths on the host and evaluates the program in Python: eager under compile
def _reference_call(q, k, v, program, mod_tensors, scale, seq_lens_q, seq_lens_kv):
    """flex_attention's reference path: (out in q's dtype, lse)."""
    if isinstance(program, tuple):  # (mod_id, bprop_id, ...), recorded while dynamo traced (record_call)
        program = _registry.lookup(program[0]) if program[0] else None
    kv_lengths, q_lengths, _ = padded_lengths(seq_lens_q, seq_lens_kv, q, k) or (None, None, False)
    out, lse = reference.attention_program(q, k, v, program, mod_tensors, scale, kv_lengths=kv_lengths,
                                           q_lengths=q_lengths)
    return out.to(q.dtype), lse


class FlexAttention(torch.nn.Module):
    """flex_attention as a module: the score_mod and options are fixed at construction."""

    def __init__(self, score_mod: Optional[Callable] = None, score_mod_bprop: Optional[Callable] = None,
                 *, scale: Optional[float] = None, layout: str = "bhsd", deterministic: bool = False,
                 backend: str = "auto", mask_mod: Optional[Callable] = None):
        super().__init__()
        if layout not in _TO_BHSD:
            raise ValueError(f"cudnn_flex: layout must be one of 'bhsd', 'bshd', 'sbhd', got {layout!r}")
        self.score_mod = score_mod
        self.score_mod_bprop = score_mod_bprop
        self.mask_mod = mask_mod
        self.scale = scale
        self.layout = layout
        self.deterministic = deterministic
        self.backend = backend

    def forward(self, q, k, v, score_mod_tensors: TensorDict = None,
                score_mod_bprop_tensors: TensorDict = None, return_lse: bool = False):
        return flex_attention(q, k, v, self.score_mod, self.score_mod_bprop, score_mod_tensors,
                              score_mod_bprop_tensors, scale=self.scale, layout=self.layout,
                              return_lse=return_lse, deterministic=self.deterministic,
                              backend=self.backend, mask_mod=self.mask_mod)

    def extra_repr(self) -> str:
        name = _registry.describe(self.score_mod) if self.score_mod is not None else None
        return f"score_mod={name}, layout={self.layout!r}, scale={self.scale}"


def validate_graphs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    score_mod: Optional[Callable] = None, score_mod_bprop: Optional[Callable] = None,
                    score_mod_tensors: TensorDict = None, score_mod_bprop_tensors: TensorDict = None,
                    *, scale: Optional[float] = None, layout: str = "bhsd", deterministic: bool = False,
                    sm_version: int = 90, mask_mod: Optional[Callable] = None,
                    seq_lens_q: Optional[torch.Tensor] = None, seq_lens_kv: Optional[torch.Tensor] = None) -> str:
    """Builds the forward and backward cuDNN graphs for these arguments up to cuDNN's operation
    graph, for `sm_version`, without a GPU (q, k, v may be CPU or meta tensors of any float dtype:
    they are described as float16 unless bfloat16). Runs the score_mods through the bridge.
    Returns the graphs' printed form; raises what flex_attention would raise for a refused graph.
    seq_lens_q/seq_lens_kv (int32 [B], any device; their values are not read) build the padded
    batch's graphs."""
    q, k, v = bhsd_views(q, k, v, layout)
    if q.dtype not in _CUDNN_DTYPES:
        q, k, v = (t.to(torch.float16) for t in (q, k, v))
    program, mod_tensors, bprop_tensors = record_call(score_mod, score_mod_bprop, mask_mod, score_mod_tensors,
                                                      score_mod_bprop_tensors, q, k.shape[2])
    mod_id, bprop_id = (program.mod_id, program.bprop_id) if program is not None else (0, 0)
    seq_lens = []
    if seq_lens_q is not None or seq_lens_kv is not None:
        batch = lambda t: torch.zeros(q.shape[0], dtype=torch.int32) if t is None else t  # noqa: E731
        seq_lens = [batch(seq_lens_q), batch(seq_lens_kv)]
    return torch.ops.cudnn_flex.validate(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id,
                                         None if scale is None else float(scale), bool(deterministic),
                                         sm_version, seq_lens, [], [])
