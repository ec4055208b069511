"""A call's mods -> the recorded program and the tensors of its input slots.

DSL mods are recorded by the registry (with the guard and the keyed-object promise); torch-style
mods and mask_mods are traced (torch_style.py), their captured tensors becoming strided views
passed on every call. Under torch.compile the DSL mod also runs on shadow values inside the
traced code (program/shadow.py) and the program is recorded once, while dynamo traces.
"""

from __future__ import annotations

import math
import re
import types
from typing import Optional

import torch

from . import _C, _registry, torch_style
from ._validation import check_tensor_dict
from .program import captures, guard, shadow
from .program.record import Recorder


def as_graph_input(t: torch.Tensor) -> torch.Tensor:
    """A score_mod tensor as cuDNN reads it: bool, uint8 and int64 as float32 copies, the dtype the
    program computes in (measured on the H200, cuDNN 9.19: BOOLEAN inputs crash with SIGFPE, a
    uint8 view of an odd-length row is read at a misaligned address, and a graph over an INT64
    input never finished; INT32 ids are read in place). The program compares bool with 0."""
    return t.to(torch.float32) if t.dtype in COPIED else t


COPIED = frozenset((torch.bool, torch.uint8, torch.int64))  # (a set: `dtype in` a tuple costs twice as much)


def record_call(score_mod, score_mod_bprop, mask_mod, score_mod_tensors, score_mod_bprop_tensors, q, s_kv):
    """(program, mod tensors, bprop tensors): the call's mods recorded into one program, and the
    tensors of its input slots in order. Under torch.compile the program is replaced by its
    (mod_id, bprop_id, whether it reads the head or key index), recorded once while dynamo traces."""
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
    bprop_names, bprop_tensors = check_tensor_dict(score_mod_bprop_tensors, "score_mod_bprop_tensors", q, s_kv)
    bprop_dtypes = tuple(t.dtype for t in bprop_tensors)
    bprop_tensors = [as_graph_input(t) for t in bprop_tensors]
    if torch_fn is not None:
        if score_mod_tensors:
            raise TypeError("cudnn_flex: a torch-style score_mod gets its tensors by capturing them "
                            "(closure, default argument or global), not through score_mod_tensors")
        program, views = _record_torch_style(torch_fn, (mask_mod, score_mod), score_mod_bprop, bprop_names,
                                             bprop_dtypes, q, shape)
        return program, views, bprop_tensors
    names, tensors = check_tensor_dict(score_mod_tensors, "score_mod_tensors", q, s_kv)
    dtypes = tuple(t.dtype for t in tensors)
    tensors = [as_graph_input(t) for t in tensors]
    if torch.compiler.is_compiling():
        # Traced inline: dynamo guards what the mods read, and the trail is a constant argument.
        trail = shadow.trail(score_mod, score_mod_bprop, names, bprop_names)
        ids = _registry.traced_ids(_registry.constant_form(score_mod), _registry.constant_form(score_mod_bprop),
                                   tuple(names), dtypes, tuple(bprop_names), bprop_dtypes, trail)
        return ids, tensors, bprop_tensors
    program = _registry.record(score_mod, score_mod_bprop, names, dtypes, bprop_names, bprop_dtypes, shape)
    return program, tensors, bprop_tensors


def _record_torch_style(torch_fn, user_fns, score_mod_bprop, bprop_names, bprop_dtypes, q, shape):
    """(program, views of the captured tensors) of a torch-style mod (with its mask_mod); under
    torch.compile ((mod_id, bprop_id, whether it reads the head or key index), views)."""
    if torch.compiler.is_compiling():
        return _traced_torch_style(torch_fn, user_fns, score_mod_bprop, bprop_names, bprop_dtypes, q, shape)
    bprop_slots = _registry.slot_signature(bprop_names, bprop_dtypes)
    fns = ("torch-style",) + tuple(user_fns) + (score_mod_bprop,)
    leaves = []  # the tensors the mods' closures hold, in the guard's order
    guarded = _registry.guarded_key(fns, ((), bprop_slots), shape, leaves)
    known = _registry.by_guard(guarded)
    recipe = _leaf_slots.get(guarded) if known is not None else None
    if recipe is not None:  # each input slot reads the closure tensor at the same place
        return known, captured_views([(leaves[i], axes) for i, axes in recipe], shape, q)
    recorder = Recorder(shape)
    fwd_out, found = torch_style.trace(torch_fn, recorder)
    views = captured_views(found, shape, q)
    program = _program_of_trace(recorder, fwd_out, found, score_mod_bprop, bprop_names, bprop_dtypes)
    if guarded is not None:
        recipe = _slots_in_leaves(found, leaves)
        if recipe is not None and (not leaves or _reads_no_tensor_value(fns, leaves, recipe, program, shape,
                                                                         bprop_names, bprop_dtypes)):
            _registry.remember_guarded(guarded, program)
            if len(_leaf_slots) >= _MAX_LEAF_SLOTS:
                _leaf_slots.pop(next(iter(_leaf_slots)))  # the oldest; a dropped one is traced again
            _leaf_slots[guarded] = recipe
    return program, views


def captured_slots(score_mod, score_mod_bprop, mask_mod, q, s_kv, program) -> Optional[tuple]:
    """(the tensors in the mods' closures, in the guard's order; (leaf index, axes) per input
    slot) of a torch-style call without score_mod_bprop_tensors whose program is known by its
    guard, as a call that takes the full path now would find them; None when it would trace
    the mods (a slot's tensor is made inside them, or they read a tensor's value) or find
    another program. fast_path.py remembers them for the shortcut."""
    if mask_mod is None and not torch_style.is_torch_style(score_mod):
        return None
    leaves: list = []
    guarded = _registry.guarded_key(("torch-style", mask_mod, score_mod, score_mod_bprop),
                                    ((), _registry.slot_signature([], [])), (q.shape[0], q.shape[1], q.shape[2], s_kv),
                                    leaves)
    recipe = _leaf_slots.get(guarded) if guarded is not None else None
    if recipe is None or _registry.by_guard(guarded) is not program:
        return None
    return tuple(leaves), recipe


# guarded key -> ((leaf index, axes) per input slot) of torch-style programs known without tracing:
# a later call with an equal key finds its captured tensors at the same places of its closures.
_leaf_slots: dict = {}
_MAX_LEAF_SLOTS = 4096


def captured_views(found, shape, q, once: Optional[list] = None) -> list:
    """The input slots' tensors of a torch-style call: each captured tensor as view_for makes it,
    checked to be on q's device. A tensor that view_for copies (int64 ids, a bool mask) and that
    several slots read (`doc[q_idx] == doc[kv_idx]`) is copied once, its slots views of that
    copy: one launch and one allocation fewer per call, unless the tensor is larger than what its
    slots read.
    once: copied_once(found, shape), when the caller keeps it (the shortcut)."""
    copies = {id(t): t.to(torch.float32) for t in (copied_once(found, shape) if once is None else once)}
    views = [torch_style.view_for(copies.get(id(t), t), axes, shape, _capture_name(i))
             for i, (t, axes) in enumerate(found)]
    for i, t in enumerate(views):
        if not (t.device == q.device or (t.device.type == "cpu" and t.numel() == 1)):
            raise ValueError(f"cudnn_flex: the score_mod indexes a tensor on {t.device} ({_capture_name(i)}) but q "
                             f"is on {q.device}; move the captured tensor to q's device")
    return views


def copied_once(found, shape) -> list:
    """The tensors that view_for would copy for two or more slots and that have no more elements
    than those slots read together: captured_views copies each of them to float32 once. It depends
    on the tensors' dtypes and sizes and the scores' shape only. (Eager only: under torch.compile
    the views are made by _traced_torch_style.)"""
    read: dict = {}  # id(tensor) -> (tensor, slots that read it, elements they read)
    for t, axes in found:
        if axes and t.dtype in torch_style.COPIED_DTYPES:
            _, slots, elements = read.get(id(t), (t, 0, 0))
            read[id(t)] = (t, slots + 1, elements + math.prod(shape[axis] for axis in axes))
    return [t for t, slots, elements in read.values() if slots > 1 and t.numel() <= elements]


class CopiedViews:
    """captured_views again, for the same captured tensors at the same metadata (dtype, shape,
    strides, device: the shortcut checks guard.leaf_metadata first) and scores `shape`, when
    every slot's view is a float32 copy (bool, int8, int16, int64, uint8 or float64 tensors): what
    view_for and captured_views checked then holds again, and each call makes only what they
    make (the copies and their views, from the tensors' storage offsets now), without their
    checks. The tensors are copied on every call (a write that the version counter does not see
    is read).

    plan(found, shape, once) is None when a slot's view is anything else (an alias of a float or
    int32 tensor, a tensor indexed by nothing) or a tensor of a subclass (its __torch_function__
    sees the copies captured_views makes): captured_views makes those. The copies are made by the
    extension (csrc/copied_views.cpp): from Python, the copy and its views were single torch calls
    of several us each. `tensors` holds the tensors."""

    __slots__ = ("recipe", "tensors")

    def __init__(self, slots: tuple, tensors: tuple):
        # per slot: (its tensor's position in `tensors`, sizes, axes, whether a view of the one copy)
        self.recipe, self.tensors = _C.CopiedViews(len(tensors), list(slots)), tensors

    def make(self) -> list:
        """The slots' tensors, as captured_views makes them now."""
        return self.recipe.make(self.tensors)

    @staticmethod
    def plan(found, shape, once: list) -> Optional["CopiedViews"]:
        tensors, slots = [], []
        for t, axes in found:
            if not axes or t.dtype not in torch_style.COPIED_DTYPES or type(t) is not torch.Tensor:
                return None
            sizes = [1, 1, 1, 1]
            for axis in axes:
                sizes[axis] = shape[axis]
            at = next((i for i, u in enumerate(tensors) if u is t), len(tensors))
            if at == len(tensors):
                tensors.append(t)
            slots.append((at, sizes, list(axes), any(u is t for u in once)))
        return CopiedViews(tuple(slots), tuple(tensors))


def _slots_in_leaves(found, leaves) -> Optional[tuple]:
    """(leaf index, axes) of each input slot, or None when a slot's tensor is not exactly one of
    the closure's tensors (made inside the mod, a gather's result, or held twice: a later call
    could hold two different tensors there)."""
    recipe = []
    for t, axes in found:
        at = [i for i, leaf in enumerate(leaves) if leaf is t]
        if len(at) != 1:
            return None
        recipe.append((at[0], axes))
    return tuple(recipe)


def _reads_no_tensor_value(fns, leaves, recipe, program, shape, bprop_names, bprop_dtypes) -> bool:
    """Whether the mods record the same program over meta tensors in place of their closure's
    tensors (same dtype and shape, no values): then the program depends on the tensors' metadata
    only, which the guard key holds. A mod that reads a value on the host (`float(t)`, `if
    t.any()`) fails on meta tensors or records another program: it is traced on every call."""
    twins = {}

    def twin(t):
        meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
        twins[id(t)] = meta.requires_grad_() if t.requires_grad else meta
        return twins[id(t)]

    recorder = Recorder(shape)
    try:
        _, mask_mod, score_mod, bprop = (guard.with_tensors_replaced(f, twin) for f in fns)
        fwd_out, found = torch_style.trace(_as_one_score_mod(mask_mod, score_mod), recorder)
        again = _program_of_trace(recorder, fwd_out, found, bprop, bprop_names, bprop_dtypes)
    except Exception:  # noqa: BLE001  (whatever a value read on a meta tensor, or the rebuild, raises)
        return False
    meta_leaves = [twins[id(t)] for t in leaves]
    return ((again.mod_id, again.bprop_id) == (program.mod_id, program.bprop_id)
            and _slots_in_leaves(found, meta_leaves) == recipe)


def _as_one_score_mod(mask_mod, score_mod):
    """The torch-style score_mod that a mask_mod (if any) and a score_mod (if any) make together."""
    return torch_style.mask_to_score_mod(mask_mod, score_mod) if mask_mod is not None else score_mod


def _capture_name(i: int) -> str:
    return f"capture {i}"


def _program_of_trace(recorder, fwd_out, found, score_mod_bprop, bprop_names, bprop_dtypes):
    """The program of a traced torch-style mod, its captured tensors as input slots in order."""
    slots = (_registry.slot_signature([_capture_name(i) for i in range(len(found))], [t.dtype for t, _ in found]),
             _registry.slot_signature(bprop_names, bprop_dtypes))
    return _registry.finish(recorder, fwd_out, score_mod_bprop, bprop_names, bprop_dtypes, slots)


# Dynamo follows a function's __closure__ (what captures.describe and captures.fetch read) from
# torch 2.14 on; torch 2.11-2.13 fail inside the trace with an error that names no fix.
# (major, minor) only: "2.14.0a0+git..." (NGC, nightly) is a 2.14 whose string compares below "2.14".
_DYNAMO_READS_CLOSURES = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups()) >= (2, 14)


@torch._dynamo.assume_constant_result
def _refuse_closure(name: str, free: tuple) -> None:
    """Raised in plain Python while dynamo traces: an error raised in the traced code reaches the
    user as dynamo's "Observed exception", without this message."""
    raise torch_style.UnsupportedConstruct(
        f"cudnn_flex: under torch.compile, the torch-style mod {name!r} reads variables of the function that "
        f"made it ({', '.join(free)}), and the dynamo of torch {torch.__version__} cannot read a closure "
        "(torch >= 2.14 can); upgrade torch, call it outside torch.compile, or write it as a module-level "
        "function that reads module globals")


def _traced_torch_style(torch_fn, user_fns, score_mod_bprop, bprop_names, bprop_dtypes, q, shape):
    """A torch-style call inside the code dynamo traces. The mods run once on one-element tensors,
    inline, so that dynamo guards every value they read (a changed global, closure value or
    attribute recompiles; their result is unused and dropped from the graph); the program is
    recorded once outside dynamo (_recorded_for_compile), and the captured tensors are fetched
    where the user keeps them, so they are inputs of the compiled graph (new values never
    recompile)."""
    if not _DYNAMO_READS_CLOSURES:
        for fn in user_fns:
            if isinstance(fn, types.FunctionType) and fn.__code__.co_freevars:
                _refuse_closure(fn.__name__, fn.__code__.co_freevars)
    # One-element index tensors (0-dim ones would make `table[q_idx]` a data-dependent item()).
    index = torch.zeros(1, dtype=torch.int64, device=q.device)
    torch_fn(torch.zeros(1, dtype=torch.float32, device=q.device), index, index, index, index)
    mod_id, bprop_id, reads_head_or_key, recipe = _recorded_for_compile(
        tuple(captures.describe(f, _registry.constant_form) for f in user_fns),
        _registry.constant_form(score_mod_bprop), tuple(bprop_names), tuple(bprop_dtypes))
    views = [torch_style.view_for(captures.fetch(user_fns, path), axes, shape, _capture_name(i))
             for i, (path, axes) in enumerate(recipe)]
    return (mod_id, bprop_id, reads_head_or_key), views


@torch._dynamo.assume_constant_result
def _recorded_for_compile(forms: tuple, bprop_form, bprop_names: tuple, bprop_dtypes: tuple) -> tuple:
    """Runs in plain Python while dynamo traces: records the torch-style call's program, pins it,
    and returns (mod_id, bprop_id, whether it reads the head or key index, ((path, axes), ...)):
    where each captured tensor lives."""
    return _record_for_compile(forms, bprop_form, bprop_names, bprop_dtypes)


# Disabled for dynamo: after a graph break (torch.compile without fullgraph, the reference path),
# dynamo may run the frame above as Python with its frame hook on, and would then try to compile
# the recording itself (it failed inside the tracer with an internal TypeError).
@torch.compiler.disable
def _record_for_compile(forms: tuple, bprop_form, bprop_names: tuple, bprop_dtypes: tuple) -> tuple:
    """_recorded_for_compile's work. The scores' shape is no part of a program (and may be
    symbolic here): the recording gets none."""
    user_fns = tuple(captures.rebuild(f, _registry.from_constant_form) for f in forms)
    torch_fn = _as_one_score_mod(*user_fns)
    recorder = Recorder()
    fwd_out, found = torch_style.trace(torch_fn, recorder, gathers=False)
    recipe = []
    for i, (t, axes) in enumerate(found):
        path = captures.path_to(user_fns, t)
        if path is None:
            raise torch_style.UnsupportedConstruct(
                f"cudnn_flex: under torch.compile, the tensor of capture {i} was not found where the mod keeps "
                "its values (closure, default, module global, attribute, list or dict item); capture it "
                "in one of those")
        recipe.append((path, axes))
    program = _program_of_trace(recorder, fwd_out, found, _registry.from_constant_form(bprop_form), bprop_names,
                                bprop_dtypes)
    _registry.pin(program)
    return program.mod_id, program.bprop_id, program.reads_head_or_key, tuple(recipe)
