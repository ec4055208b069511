"""Argument checks shared by every entry point (flex_attention, validate_graphs, compat, the
call recording): each error names the argument and the fix."""

from __future__ import annotations

import math
import weakref
from typing import Callable, Hashable, Mapping, NamedTuple, Optional

import torch

TensorDict = Optional[Mapping[str, torch.Tensor]]
# Permutation that turns a tensor in the user's layout into a BHSD view.
_TO_BHSD = {"bhsd": (0, 1, 2, 3), "bshd": (0, 2, 1, 3), "sbhd": (1, 2, 0, 3)}
_FROM_BHSD = {name: tuple(sorted(range(4), key=lambda i: perm[i])) for name, perm in _TO_BHSD.items()}
_CUDNN_DTYPES = (torch.float16, torch.bfloat16)
_MOD_TENSOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32,
                      torch.int64, torch.bool, torch.uint8)
def check_qkv(q, k, v, layout: str) -> None:
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


def check_shapes(q, k, v, layout: str) -> None:
    (b, h_q, s_q, d), (bk, h_k, s_k, d_k), (bv, h_v, s_v, _) = q.shape, k.shape, v.shape
    problem = None
    if not b == bk == bv:
        problem = "q, k and v must have the same batch size"
    elif h_k != h_v:
        problem = "k and v must have the same number of heads"
    elif h_k == 0 or h_q % h_k:
        problem = (f"the number of query heads ({h_q}) must be a multiple of the number of key/value heads "
                   f"({h_k}) for GQA/MQA")
    elif s_k != s_v:
        problem = "k and v must have the same sequence length"
    elif d != d_k:
        problem = "q and k must have the same head dim"
    elif d == 0:
        problem = "q and k have head dim 0; attention needs at least one feature per head"
    if problem is not None:
        # Formatted only here: the shapes' text cost 8 us of every call's host time.
        raise ValueError(f"cudnn_flex: {problem} (shapes as BHSD from layout '{layout}': q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)})")


def check_scale(scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"cudnn_flex: scale must be a finite number, got {scale!r}")


def check_dense_last_dim(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):  # [B, H, S, D], or packed [total, H, D]
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"cudnn_flex: {name}'s head dim is not contiguous (stride {t.stride(-1)}); "
                             f"cuDNN needs a dense last dim: pass {name}.contiguous()")
        if not torch.compiler.is_compiling() and t.data_ptr() % 16:
            raise ValueError(f"cudnn_flex: {name}'s data is not 16-byte aligned (a slice at an odd "
                             f"offset?); cuDNN needs aligned inputs: pass {name}.clone()")


def check_mods(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors) -> None:
    """The mods and their tensors fit together (flex_attention and flex_attention_varlen)."""
    for role, fn in (("score_mod", score_mod), ("score_mod_bprop", score_mod_bprop)):
        if isinstance(fn, type):
            raise TypeError(f"cudnn_flex: {role} is the class {fn.__name__}; pass an instance of it, "
                            f"{fn.__name__}(...) (dsl_mods.relative_bias(), softcap(cap) and sliding_window(w) "
                            "make one each)")
        if fn is not None and not callable(fn):
            raise TypeError(f"cudnn_flex: {role} must be a callable (graph, tensor, tensors) -> tensor, "
                            f"got {type(fn).__name__} (score_mod_tensors is the positional argument after "
                            "score_mod_bprop; pass it by keyword)")
    if score_mod_bprop is not None and score_mod is None:
        raise ValueError("cudnn_flex: score_mod_bprop was given without score_mod")
    if score_mod_tensors is not None and score_mod is None:
        raise ValueError("cudnn_flex: score_mod_tensors were given without score_mod")
    if score_mod_bprop_tensors is not None and score_mod_bprop is None:
        raise ValueError("cudnn_flex: score_mod_bprop_tensors were given without score_mod_bprop; "
                         "they are inputs of score_mod_bprop only")


def check_tensor_dict(tensors: TensorDict, arg: str, q: torch.Tensor, s_kv: int):
    """(names, tensors) for the op; each tensor broadcastable to [B, H, Sq, Skv] or a host scalar.
    (Runs on every call of the full path: messages are built only for a refusal.)"""
    if tensors is None:
        return [], []
    if type(tensors) is not dict and not isinstance(tensors, Mapping):  # (an ABC check costs 0.4 us)
        raise TypeError(f"cudnn_flex: {arg} must be a dict of name -> torch.Tensor, got "
                        f"{type(tensors).__name__}")
    full = None
    names, values = [], []
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"cudnn_flex: the keys of {arg} must be str, got {type(name).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cudnn_flex: {arg}[{name!r}] must be a torch.Tensor, got {type(t).__name__}; "
                            "wrap numbers as torch.tensor(x) (a CPU scalar is passed by value)")
        if t.requires_grad:
            raise ValueError(f"cudnn_flex: {arg}[{name!r}] requires grad, but cuDNN computes no gradient "
                             f"for score_mod tensors; pass {name}.detach()")
        if t.dtype not in _MOD_TENSOR_DTYPES:
            raise ValueError(f"cudnn_flex: {arg}[{name!r}] has dtype {t.dtype}; use one of "
                             f"{', '.join(str(d) for d in _MOD_TENSOR_DTYPES)}")
        if not (t.is_cpu and t.numel() == 1):  # a host scalar is passed by value
            full = full or tuple(q.shape[:3]) + (s_kv,)
            _check_graph_tensor(t, (arg, name), q, full)
        names.append(name)
        values.append(t)
    return names, values


def _broadcasts(shape, full: tuple) -> bool:
    """Each trailing dim of shape is 1 or full's (len(shape) <= 4)."""
    for n, f in zip(reversed(shape), reversed(full)):
        if n != 1 and n != f:
            return False
    return True


def graph_tensor_fits(t: torch.Tensor, q: torch.Tensor, full: tuple, compiling: Optional[bool] = None) -> bool:
    """Whether a score_mod tensor that cuDNN reads from memory is on q's device, broadcastable to
    the scores `full` and aligned (what _check_graph_tensor requires; the shortcut asks it
    without the messages, and says it is not compiling: the alignment of a traced tensor is not
    known)."""
    shape = t.shape
    if len(shape) > 4 or not _broadcasts(shape, full):
        return False
    if not t.is_cuda:
        return t.device == q.device
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    # Two CUDA tensors: the same device index is the same device (an int, not a torch.device).
    return q.is_cuda and t.get_device() == q.get_device() and (compiling or t.data_ptr() % 16 == 0)


def _check_graph_tensor(t: torch.Tensor, label: tuple, q: torch.Tensor, full: tuple) -> None:
    """A score_mod tensor that cuDNN reads from memory: on q's device, broadcastable to the scores
    `full`, aligned. label: (argument, name), for the messages."""
    if graph_tensor_fits(t, q, full):
        return
    if t.device != q.device:
        raise ValueError(f"cudnn_flex: {label[0]}[{label[1]!r}] is on {t.device} but q is on {q.device}; "
                         "move it to q's device (only one-element CPU tensors are passed by value)")
    shape = t.shape
    if len(shape) > 4 or not _broadcasts(shape, full):
        raise ValueError(f"cudnn_flex: {label[0]}[{label[1]!r}] has shape {tuple(shape)}, which does not "
                         f"broadcast against the scores [B, H, Sq, Skv] = {list(full)}; each "
                         "dim must be 1 or match")
    if t.is_cuda and not torch.compiler.is_compiling() and t.data_ptr() % 16:
        raise ValueError(f"cudnn_flex: {label[0]}[{label[1]!r}] is not 16-byte aligned; pass a .clone()")


def bhsd_views(q, k, v, layout: str):
    """Checked q, k, v as BHSD views of the user's layout (strides only, no copies)."""
    if layout not in _TO_BHSD:
        raise ValueError(f"cudnn_flex: layout must be one of 'bhsd', 'bshd', 'sbhd', got {layout!r}")
    check_qkv(q, k, v, layout)
    if layout != "bhsd":
        perm = _TO_BHSD[layout]
        q, k, v = q.permute(perm), k.permute(perm), v.permute(perm)
    check_shapes(q, k, v, layout)
    return q, k, v


def cudnn_takes(q: torch.Tensor) -> bool:
    """Whether cuDNN runs attention on q's dtype and device."""
    return q.is_cuda and q.dtype in _CUDNN_DTYPES


def use_cudnn(q: torch.Tensor, backend: str) -> bool:
    if backend not in ("auto", "cudnn", "reference"):
        raise ValueError(f"cudnn_flex: backend must be 'auto', 'cudnn' or 'reference', got {backend!r}")
    eligible = cudnn_takes(q)
    if backend == "cudnn" and not eligible:
        raise ValueError(f"cudnn_flex: backend='cudnn' needs CUDA float16/bfloat16 tensors, got "
                         f"{q.dtype} on {q.device}")
    return eligible and backend != "reference"


# (id, what) -> (weak reference, version, value) of what was derived from a tensor's values. A
# model passes one lengths tensor to every layer of a step: what is read from it on the host (a
# device sync) is read once, and again after an in-place change (a new version). Keyed by id, not
# by the tensor: a tensor's == is elementwise.
_per_version: dict = {}


def once_per_version(t: torch.Tensor, what: Hashable, compute: Callable[[], object]) -> object:
    """compute(), remembered for this tensor object while its version and data pointer stay the
    same (`t.data = u` swaps the storage without a version bump; a write through `.data`, DLPack,
    numpy or a CUDA graph replay bumps neither and goes unseen). An inference tensor (made under
    torch.inference_mode()) has no version counter, so an in-place change would go unseen: it is
    computed on every call. What is remembered is made outside inference mode, so that a later
    call with autograd may save it for its backward."""
    if t.is_inference():
        return compute()
    key = (id(t), what)
    state = (t._version, t.data_ptr())
    seen = _per_version.get(key)
    if seen is not None and seen[0]() is t and seen[1] == state:
        return seen[2]
    with torch.inference_mode(False):
        value = compute()
    # The entry goes with the tensor (what it holds, e.g. a row index on the device, with it).
    _per_version[key] = (weakref.ref(t, lambda _: _per_version.pop(key, None)), state, value)
    return value


def check_values_once(t: torch.Tensor, against: Hashable, check: Callable[[list], object]) -> object:
    """check(t.tolist()) unless this tensor, unchanged, passed it against the same bounds; what it
    returned."""
    return once_per_version(t, ("checked against", against), lambda: check(t.tolist()))


def _shortest_checked(lengths, name: str, batch: int, longest: int, q: torch.Tensor) -> Optional[int]:
    """The shortest of the lengths, checked (or `longest` for an empty batch); None under
    torch.compile, which checks their metadata only."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"cudnn_flex: {name} must be a torch.Tensor of int32, got {type(lengths).__name__}")
    if lengths.dtype != torch.int32 or lengths.shape != (batch,):
        raise ValueError(f"cudnn_flex: {name} must be int32 [B] = [{batch}] (one length per batch element), "
                         f"got {lengths.dtype} {tuple(lengths.shape)}")
    if lengths.device != q.device:
        raise ValueError(f"cudnn_flex: {name} is on {lengths.device} but q is on {q.device}; put it on q's device")
    if torch.compiler.is_compiling():
        return None  # no host read inside a compiled graph; eager calls check the values
    def check(values):
        if any(n < 0 or n > longest for n in values):
            raise ValueError(f"cudnn_flex: {name} must lie in [0, {longest}] (the padded length), got {values}")
        return min(values, default=longest)
    return check_values_once(lengths, longest, check)


class PaddedLengths(NamedTuple):
    """A padded batch's lengths, checked: the tensors given (None for a side not given, which is
    the full length), and whether every query row lies inside its sequence and has a key, by their
    values as read on the host (False where unread: under torch.compile). Then cuDNN writes every
    row of out and lse, and the op need not clear them first."""
    kv: Optional[torch.Tensor]
    q: Optional[torch.Tensor]
    every_row_attends: bool


def padded_lengths(seq_lens_q, seq_lens_kv, q, k) -> Optional[PaddedLengths]:
    """The lengths of a padded batch, checked (on the host), or None without them."""
    if seq_lens_q is None and seq_lens_kv is None:
        return None
    shortest_kv = k.shape[2] if seq_lens_kv is None else _shortest_checked(
        seq_lens_kv, "seq_lens_kv", q.shape[0], k.shape[2], q)
    shortest_q = q.shape[2] if seq_lens_q is None else _shortest_checked(
        seq_lens_q, "seq_lens_q", q.shape[0], q.shape[2], q)
    every_row_attends = shortest_kv is not None and shortest_q is not None and shortest_kv > 0 and \
        shortest_q == q.shape[2]
    return PaddedLengths(seq_lens_kv, seq_lens_q, every_row_attends)
