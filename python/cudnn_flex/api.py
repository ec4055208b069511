"""flex_attention: argument checking, layouts as BHSD views, and the choice of path."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Optional, Union

import torch

from . import _ops  # noqa: F401  (registers the fake kernels)
from . import _registry, reference, torch_style
from .program import shadow
from .program.record import Recorder

# Permutation that turns a tensor in the user's layout into a BHSD view.
_TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}
_FROM_BHSD = {name: tuple(sorted(range(4), key=lambda i: perm[i])) for name, perm in _TO_BHSD.items()}
_CUDNN_DTYPES = (torch.float16, torch.bfloat16)
_MOD_TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32,
                      torch.int64, torch.bool, torch.uint8)
_reference_warned = False


class ReferencePathWarning(UserWarning):
    """flex_attention ran the PyTorch reference path instead of cuDNN (silence with warnings.filterwarnings)."""

TensorDict = Optional[Mapping[str, torch.Tensor]]


def _check_qkv(q, k, v, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cudnn_flex: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"cudnn_flex: {name} must be 4-D in layout '{layout}' "
                             f"({layout.upper()}), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"cudnn_flex: q is on {q.device} but {name} is on {t.device}; put q, k "
                             "and v on one device")
        if t.dtype != q.dtype:
            raise ValueError(f"cudnn_flex: q is {q.dtype} but {name} is {t.dtype}; q, k and v must "
                             "have one dtype")


def _check_shapes(q, k, v, layout: str) -> None:
    (b, h_q, s_q, d), (bk, h_k, s_k, d_k), (bv, h_v, s_v, _) = q.shape, k.shape, v.shape
    where = f" (shapes as BHSD from layout '{layout}': q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)})"
    if not b == bk == bv:
        raise ValueError("cudnn_flex: q, k and v must have the same batch size" + where)
    if h_k != h_v:
        raise ValueError("cudnn_flex: k and v must have the same number of heads" + where)
    if h_k == 0 or h_q % h_k:
        raise ValueError(f"cudnn_flex: the number of query heads ({h_q}) must be a multiple of the "
                         f"number of key/value heads ({h_k}) for GQA/MQA" + where)
    if s_k != s_v:
        raise ValueError("cudnn_flex: k and v must have the same sequence length" + where)
    if d != d_k:
        raise ValueError("cudnn_flex: q and k must have the same head dim" + where)
    if d == 0:
        raise ValueError("cudnn_flex: q and k have head dim 0; attention needs at least one "
                         "feature per head" + where)


def _check_dense_last_dim(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(3) != 1 and t.shape[3] > 1:
            raise ValueError(f"cudnn_flex: {name}'s head dim is not contiguous (stride {t.stride(3)}); "
                             f"cuDNN needs a dense last dim: pass {name}.contiguous()")
        if not torch.compiler.is_compiling() and t.data_ptr() % 16:
            raise ValueError(f"cudnn_flex: {name}'s data is not 16-byte aligned (a slice at an odd "
                             f"offset?); cuDNN needs aligned inputs: pass {name}.clone()")


def _check_tensor_dict(tensors: TensorDict, arg: str, q: torch.Tensor, s_kv: int):
    """(names, tensors) for the op; each tensor broadcastable to [B, H, Sq, Skv] or a host scalar."""
    if tensors is None:
        return [], []
    if not isinstance(tensors, Mapping):
        raise TypeError(f"cudnn_flex: {arg} must be a dict of name -> torch.Tensor, got "
                        f"{type(tensors).__name__}")
    b, h, s_q = q.shape[0], q.shape[1], q.shape[2]
    full = (b, h, s_q, s_kv)
    names, values = [], []
    for name, t in tensors.items():
        label = f"{arg}[{name!r}]"
        if not isinstance(name, str):
            raise TypeError(f"cudnn_flex: the keys of {arg} must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cudnn_flex: {label} must be a torch.Tensor, got {type(t).__name__}; "
                            "wrap numbers as torch.tensor(x) (a CPU scalar is passed by value)")
        if t.requires_grad:
            raise ValueError(f"cudnn_flex: {label} requires grad, but cuDNN computes no gradient "
                             f"for score_mod tensors; pass {name}.detach()")
        if t.dtype not in _MOD_TENSOR_DTYPES:
            raise ValueError(f"cudnn_flex: {label} has dtype {t.dtype}; use one of "
                             f"{', '.join(str(d) for d in _MOD_TENSOR_DTYPES)}")
        host_scalar = t.device.type == "cpu" and t.numel() == 1
        if not host_scalar:
            if t.device != q.device:
                raise ValueError(f"cudnn_flex: {label} is on {t.device} but q is on {q.device}; "
                                 "move it to q's device (only one-element CPU tensors are passed by value)")
            if t.dim() > 4 or any(n not in (1, f) for n, f in zip(reversed(t.shape), reversed(full))):
                raise ValueError(f"cudnn_flex: {label} has shape {tuple(t.shape)}, which does not "
                                 f"broadcast against the scores [B, H, Sq, Skv] = {list(full)}; each "
                                 "dim must be 1 or match")
            if t.is_cuda and not torch.compiler.is_compiling() and t.data_ptr() % 16:
                raise ValueError(f"cudnn_flex: {label} is not 16-byte aligned; pass a .clone()")
        names.append(name)
        values.append(t)
    return names, values


def _bhsd_views(q, k, v, layout: str):
    """Checked q, k, v as BHSD views of the user's layout (strides only, no copies)."""
    if layout not in _TO_BHSD:
        raise ValueError(f"cudnn_flex: layout must be one of 'bhsd', 'bshd', 'sbhd', got {layout!r}")
    _check_qkv(q, k, v, layout)
    if layout != "bhsd":
        perm = _TO_BHSD[layout]
        q, k, v = q.permute(perm), k.permute(perm), v.permute(perm)
    _check_shapes(q, k, v, layout)
    return q, k, v


def _as_graph_input(t: torch.Tensor) -> torch.Tensor:
    """A score_mod tensor as cuDNN reads it: bool as a float32 copy (cuDNN 9.19 crashes on
    BOOLEAN inputs with SIGFPE, and reads a uint8 view of an odd-length mask at a misaligned
    address); the program compares it with 0."""
    return t.to(torch.float32) if t.dtype == torch.bool else t


def _record(score_mod, score_mod_bprop, mask_mod, score_mod_tensors, score_mod_bprop_tensors, q, s_kv):
    """(program, mod tensors, bprop tensors): the call's mods recorded into one program, and the
    tensors of its input slots in order. Under torch.compile the program is replaced by the
    arguments of _registry.traced_ids, which records it once while dynamo traces."""
    shape = (q.shape[0], q.shape[1], q.shape[2], s_kv)
    torch_fn = None
    if mask_mod is not None:
        torch_style.check_mask_mod(mask_mod, score_mod)
        torch_fn = torch_style.mask_to_score_mod(mask_mod, score_mod)
    elif score_mod is not None and torch_style.is_torch_style(score_mod):
        torch_fn = score_mod
    elif score_mod is not None and torch_style.positional_count(score_mod) == 4:
        raise TypeError("cudnn_flex: score_mod takes 4 arguments, like a mask_mod(b, h, q_idx, "
                        "kv_idx); pass it as mask_mod=, or write score_mod(score, b, h, q_idx, kv_idx)")
    bprop_names, bprop_tensors = _check_tensor_dict(score_mod_bprop_tensors, "score_mod_bprop_tensors", q, s_kv)
    bprop_dtypes = tuple(t.dtype for t in bprop_tensors)
    bprop_tensors = [_as_graph_input(t) for t in bprop_tensors]
    compiling = torch.compiler.is_compiling()
    if torch_fn is not None:
        if score_mod_tensors:
            raise TypeError("cudnn_flex: a torch-style score_mod gets its tensors by capturing them "
                            "(closure, default argument or global), not through score_mod_tensors")
        if compiling:
            raise NotImplementedError(
                "cudnn_flex: torch-style score_mods and mask_mods do not run under torch.compile yet; "
                "write the score_mod in the graph DSL (graph, score, tensors) for compiled models")
        bprop_slots = tuple(zip(bprop_names, (str(d) for d in bprop_dtypes)))
        guarded = _registry.guarded_key(("torch-style", mask_mod, score_mod, score_mod_bprop),
                                        ((), bprop_slots), shape)
        known = _registry.by_guard(guarded)
        if known is not None:
            return known, [], bprop_tensors
        recorder = Recorder(shape)
        fwd_out, captures = torch_style.trace(torch_fn, recorder)
        names = [f"capture {i}" for i in range(len(captures))]
        views = [torch_style.view_for(t, axes, shape, name) for name, (t, axes) in zip(names, captures)]
        for name, t in zip(names, views):
            if not (t.device == q.device or (t.device.type == "cpu" and t.numel() == 1)):
                raise ValueError(f"cudnn_flex: the score_mod indexes a tensor on {t.device} ({name}) but q "
                                 f"is on {q.device}; move the captured tensor to q's device")
        slots = (tuple((n, str(t.dtype)) for n, (t, _) in zip(names, captures)),
                 tuple(zip(bprop_names, (str(d) for d in bprop_dtypes))))
        program = _registry.finish(recorder, fwd_out, score_mod_bprop, bprop_names, bprop_dtypes, slots)
        if guarded is not None and not captures:  # with captures, each call must find its tensors
            _registry.remember_guarded(guarded, program)
        return program, views, bprop_tensors
    names, tensors = _check_tensor_dict(score_mod_tensors, "score_mod_tensors", q, s_kv)
    dtypes = tuple(t.dtype for t in tensors)
    tensors = [_as_graph_input(t) for t in tensors]
    if compiling:
        # Traced inline: dynamo guards what the mods read, and the trail is a constant argument.
        trail = shadow.trail(score_mod, score_mod_bprop, names, bprop_names)
        forms = (_registry.constant_form(score_mod), _registry.constant_form(score_mod_bprop), tuple(names),
                 dtypes, tuple(bprop_names), bprop_dtypes, trail)
        return forms, tensors, bprop_tensors
    program = _registry.record(score_mod, score_mod_bprop, names, dtypes, bprop_names, bprop_dtypes, shape)
    return program, tensors, bprop_tensors


def _use_cudnn(q: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "cudnn", "reference"):
        raise ValueError(f"cudnn_flex: backend must be 'auto', 'cudnn' or 'reference', got {backend!r}")
    eligible = q.is_cuda and q.dtype in _CUDNN_DTYPES
    if backend == "cudnn" and not eligible:
        raise ValueError(f"cudnn_flex: backend='cudnn' needs CUDA float16/bfloat16 tensors, got "
                         f"{q.dtype} on {q.device}")
    return eligible and backend != "reference"


def _warn_reference(q: torch.Tensor) -> None:
    global _reference_warned
    if _reference_warned:
        return
    _reference_warned = True
    warnings.warn(f"cudnn_flex: {q.dtype} tensors on {q.device} run the PyTorch reference path "
                  "(materialized scores, not cuDNN); CUDA float16/bfloat16 tensors take cuDNN",
                  ReferencePathWarning, stacklevel=3)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   score_mod: Optional[Callable] = None,
                   score_mod_bprop: Optional[Callable] = None,
                   score_mod_tensors: TensorDict = None,
                   score_mod_bprop_tensors: TensorDict = None,
                   *, scale: Optional[float] = None, layout: str = "bhsd",
                   return_lse: bool = False, deterministic: bool = False,
                   backend: str = "auto", mask_mod: Optional[Callable] = None,
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
        score_mod_bprop_tensors: the same, for score_mod_bprop.
        scale: default 1/sqrt(D).
        layout: "bhsd", "bshd" or "sbhd"; out comes back in it (views, no copies).
        return_lse: also return the float32 log-sum-exp [B, H_q, Sq].
        deterministic: deterministic backward.
        backend: "auto", "cudnn" (refuses what cuDNN cannot take) or "reference".
        mask_mod: mask_mod(b, h, q_idx, kv_idx) -> bool, as for torch's flex_attention (with a
            torch-style score_mod or none).
    Returns:
        out [B, H_q, Sq, D_v] in `layout` (q's dtype), and with return_lse=True (out, lse).
    Raises:
        ValueError/TypeError naming the argument; cudnn_flex.UnsupportedConstruct for a
        torch-style construct that cannot become a kernel; BpropNotDerivable or
        BackwardNotSupported when a backward cannot be built right (the forward runs).
    """
    q, k, v = _bhsd_views(q, k, v, layout)
    # No scale: the op applies 1/sqrt(head dim) itself, so that under torch.compile(dynamic=True)
    # the head dim can stay symbolic here.
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"cudnn_flex: scale must be a finite number, got {scale!r}")
    for role, fn in (("score_mod", score_mod), ("score_mod_bprop", score_mod_bprop)):
        if fn is not None and not callable(fn):
            raise TypeError(f"cudnn_flex: {role} must be a callable (graph, tensor, tensors) -> tensor, "
                            f"got {type(fn).__name__} (score_mod_tensors is the 6th positional argument; "
                            "pass it by keyword)")
    if score_mod_bprop is not None and score_mod is None:
        raise ValueError("cudnn_flex: score_mod_bprop was given without score_mod")
    if score_mod_tensors is not None and score_mod is None:
        raise ValueError("cudnn_flex: score_mod_tensors were given without score_mod")
    if score_mod_bprop_tensors is not None and score_mod_bprop is None:
        raise ValueError("cudnn_flex: score_mod_bprop_tensors were given without score_mod_bprop; "
                         "they are inputs of score_mod_bprop only")
    program, mod_tensors, bprop_tensors = _record(score_mod, score_mod_bprop, mask_mod, score_mod_tensors,
                                                  score_mod_bprop_tensors, q, k.shape[2])
    if _use_cudnn(q, backend):
        _check_dense_last_dim(q, k, v)
        for i, t in enumerate(mod_tensors + bprop_tensors):
            if t.dtype == torch.float64:
                raise ValueError(f"cudnn_flex: score_mod tensor #{i} is float64, which cuDNN's fused "
                                 "attention does not read; pass it as float32")
        if torch.compiler.is_compiling():
            mod_id, bprop_id = _registry.traced_ids(*program)
        else:
            mod_id, bprop_id = (program.mod_id, program.bprop_id) if program is not None else (0, 0)
        out, lse = torch.ops.cudnn_flex.fwd(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id,
                                            True, None if scale is None else float(scale),
                                            bool(deterministic))
        if not torch.compiler.is_compiling() and program is not None and out.grad_fn is not None:
            # The backward graph may be built long after: its program lives as long as the node.
            out.grad_fn.metadata["cudnn_flex_program"] = program
    else:
        _warn_reference(q)
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        out, lse = reference.attention_program(
            q, k, v, program, mod_tensors, scale, torch.float64 if q.dtype == torch.float64 else torch.float32)
        out = out.to(q.dtype)
    if layout != "bhsd":
        out = out.permute(_FROM_BHSD[layout])
    return (out, lse) if return_lse else out


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
                    sm_version: int = 90, mask_mod: Optional[Callable] = None) -> str:
    """Builds the forward and backward cuDNN graphs for these arguments up to cuDNN's operation
    graph, for `sm_version`, without a GPU (q, k, v may be CPU or meta tensors of any float dtype:
    they are described as float16 unless bfloat16). Runs the score_mods through the bridge.
    Returns the graphs' printed form; raises what flex_attention would raise for a refused graph."""
    q, k, v = _bhsd_views(q, k, v, layout)
    if q.dtype not in _CUDNN_DTYPES:
        q, k, v = (t.to(torch.float16) for t in (q, k, v))
    program, mod_tensors, bprop_tensors = _record(score_mod, score_mod_bprop, mask_mod, score_mod_tensors,
                                                  score_mod_bprop_tensors, q, k.shape[2])
    mod_id, bprop_id = (program.mod_id, program.bprop_id) if program is not None else (0, 0)
    return torch.ops.cudnn_flex.validate(q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id,
                                         None if scale is None else float(scale), bool(deterministic),
                                         sm_version)
