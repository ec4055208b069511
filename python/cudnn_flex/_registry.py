"""From the mods of a call to the recorded program the C++ op runs, and back while it builds.

Every call records its score_mod (and score_mod_bprop) into a program (cudnn_flex.program): the
program's digests are the ids the C++ op keys its graphs by, so a cached graph is reused exactly
for calls whose mods compute the same program, whatever their names. Programs hold no tensors
(only input slots); they live in a bounded table cleared by clear_cache(), and a forward's
program is also kept by its autograd node until its backward has run.

An object's score_mod_graph_cache_key() is the user's promise that the object computes one
program per key: calls with a known key skip the recording.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import types
import weakref
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from .program import autodiff, guard
from .program.record import D_P, SCORE, Program, Recorder, bprop_slot, checked_result, mod_slot
from .masks.lower import lower_forward
from .program.replay import Replay

_lock = threading.Lock()
_CAPACITY = 4096
# structural key of what a call recorded -> its finished program (with the derived bprop)
_by_recording: "collections.OrderedDict[Hashable, Program]" = collections.OrderedDict()
# an explicit score_mod_graph_cache_key() promise -> the program recorded under it
_by_promise: "collections.OrderedDict[Hashable, Program]" = collections.OrderedDict()
# the guard of mods that read nothing that can change (program/guard.py) -> their program
_by_guard: "collections.OrderedDict[Hashable, Program]" = collections.OrderedDict()
# ids -> programs that anyone still holds (the tables above, an autograd node, a compiled graph)
_live: "weakref.WeakValueDictionary[int, Program]" = weakref.WeakValueDictionary()
# programs a compiled graph has baked in as constants: kept while the process runs
_pinned: dict[int, Program] = {}
_dispatch_calls = 0


def describe(fn: Callable) -> str:
    """A name for fn that a user recognises in an error message."""
    if isinstance(fn, types.MethodType):
        return f"{type(fn.__self__).__qualname__}.{fn.__func__.__name__}"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "__main__" else name


def _remember(table: collections.OrderedDict, key: Hashable, program: Program) -> None:
    with _lock:
        table[key] = program
        table.move_to_end(key)
        while len(table) > _CAPACITY:
            table.popitem(last=False)
        _live[program.mod_id] = program
        if program.bprop_id:
            _live[program.bprop_id] = program


def clear() -> None:
    """Forgets every program (clear_cache())."""
    with _lock:
        _by_recording.clear()
        _by_promise.clear()
        _by_guard.clear()


# ---------------------------------------------------------------------------------------------
# Explicit keys


_PLAIN_KEY_TYPES = frozenset((int, float, str, bool, type(None)))


def _plain_key(key: Any) -> bool:
    """A number or string, or a flat tuple of them: hashable and free of tensors. Most keys are;
    this is asked on every call."""
    if type(key) is tuple:
        for item in key:
            if type(item) not in _PLAIN_KEY_TYPES:
                return False
        return True
    return type(key) in _PLAIN_KEY_TYPES


def _reject_tensors(value: Any, owner: str) -> None:
    if isinstance(value, torch.Tensor):
        raise TypeError(
            f"cudnn_flex: {owner}.score_mod_graph_cache_key() contains a torch.Tensor. A tensor's "
            "values are runtime data, not graph structure: pass the tensor in score_mod_tensors "
            "and keep only numbers, strings and tuples in the key.")
    if isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            _reject_tensors(item, owner)
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_tensors(k, owner)
            _reject_tensors(v, owner)


def explicit_key(fn: Optional[Callable]) -> Optional[Hashable]:
    """(type, method, key) when fn's owner promises a key with score_mod_graph_cache_key()."""
    if fn is None:
        return ()
    method_name = fn.__func__.__name__ if isinstance(fn, types.MethodType) else None
    owner = fn.__self__ if method_name else fn
    getter = getattr(owner, "score_mod_graph_cache_key", None)
    if getter is None or isinstance(owner, types.FunctionType):
        return None
    key = getter()
    if key is None:
        return None
    if not _plain_key(key):
        name = type(owner).__qualname__
        _reject_tensors(key, name)
        try:
            hash(key)
        except TypeError as e:
            raise TypeError(
                f"cudnn_flex: {name}.score_mod_graph_cache_key() returned an unhashable "
                f"{type(key).__name__}; return a tuple of numbers and strings") from e
    return (type(owner), method_name, key)


def sibling_key(owner_key: tuple, method: types.MethodType) -> Optional[tuple]:
    """explicit_key(method), given owner_key = explicit_key() of another method of the same object
    (a score_mod and its bprop, `softcap.forward` and `softcap.backward`): the object's promise,
    read once for both (a promise is one program per key, whichever of its methods asks); None
    where explicit_key would not read the object's promise (a function without a name): ask it."""
    name = getattr(method.__func__, "__name__", None)
    return (owner_key[0], name, owner_key[2]) if name else None


# ---------------------------------------------------------------------------------------------
# Recording


def slot_signature(names: Sequence[str], dtypes: Sequence) -> tuple:
    """The input slots of a program as (name, dtype) pairs: part of what the program computes."""
    return tuple(zip(names, (str(d) for d in dtypes)))


def _input_kind(dtype: Optional[torch.dtype]) -> str:
    if dtype is None or dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def _inputs(recorder: Recorder, slot, names: Sequence[str], dtypes: Sequence) -> dict:
    tensors = {}
    for i, (name, dtype) in enumerate(zip(names, dtypes)):
        value = recorder.input(slot(i), _input_kind(dtype))
        if dtype == torch.bool:
            # Bool tensors reach cuDNN as float32 (BOOLEAN inputs crash cuDNN 9.19): the mod
            # sees the comparison with 0, a proper boolean.
            value = recorder.cmp_neq(value, 0.0)
        tensors[name] = value
    return tensors


def _call(fn: Callable, recorder: Recorder, first, tensors: dict, role: str) -> int:
    result = fn(recorder, first, tensors)
    return checked_result(result, recorder, role, describe(fn))


def record(score_mod: Optional[Callable], score_mod_bprop: Optional[Callable], mod_names: Sequence[str],
           mod_dtypes: Sequence, bprop_names: Sequence[str] = (), bprop_dtypes: Sequence = (),
           shape: Sequence[int] = (1, 1, 1, 1)) -> Optional[Program]:
    """The program of a call's DSL score_mod and score_mod_bprop (None without a score_mod).
    Without a bprop one is derived from the score_mod's ops, or none when dP passes through."""
    if score_mod is None:
        return None
    slots = (slot_signature(mod_names, mod_dtypes), slot_signature(bprop_names, bprop_dtypes))
    promise = None
    mod_key = explicit_key(score_mod)
    bprop_key = explicit_key(score_mod_bprop)
    if mod_key is not None and bprop_key is not None:
        promise = (mod_key, bprop_key, slots)
        program = _by_promise.get(promise)
        if program is not None:
            return program
    guarded = guarded_key(("dsl", score_mod, score_mod_bprop), slots, shape)
    program = by_guard(guarded)
    if program is not None:
        return program
    recorder = Recorder(shape)
    fwd_out = _call(score_mod, recorder, recorder.input(SCORE), _inputs(recorder, mod_slot, mod_names, mod_dtypes),
                    "score_mod")
    program = finish(recorder, fwd_out, score_mod_bprop, bprop_names, bprop_dtypes, slots)
    if promise is not None:
        _remember(_by_promise, promise, program)
    if guarded is not None:
        _remember(_by_guard, guarded, program)
    return program


def by_guard(guarded: Optional[Hashable]) -> Optional[Program]:
    return None if guarded is None else _by_guard.get(guarded)


def remember_guarded(guarded: Hashable, program: Program) -> None:
    _remember(_by_guard, guarded, program)


def guarded_key(fns: tuple, slots: tuple, shape, leaves: Optional[list] = None) -> Optional[Hashable]:
    """The cache key of a call whose mods can read nothing that changes behind their back
    (program/guard.py), so that its program is known without recording; None otherwise. With
    `leaves`, tensors in the mods' closures are allowed and collected there (guard.key)."""
    keys = []
    for fn in fns:
        if isinstance(fn, str) or fn is None:
            keys.append(fn)
            continue
        k = guard.key(fn, leaves=leaves)
        if k is None:
            return None
        keys.append(k)
    return (tuple(keys), slots, tuple(shape))


def finish(recorder: Recorder, fwd_out: int, score_mod_bprop: Optional[Callable], bprop_names=(),
           bprop_dtypes=(), slots: tuple = ((), ())) -> Program:
    """The program of a recorded forward, with the user's bprop recorded after it or one derived."""
    bwd_out = None
    if score_mod_bprop is not None:
        d_p = recorder.input(D_P)
        bwd_out = _call(score_mod_bprop, recorder, d_p,
                        _inputs(recorder, bprop_slot, bprop_names, bprop_dtypes), "score_mod_bprop")
    key = (tuple(n.key() for n in recorder.nodes), fwd_out, bwd_out, slots, score_mod_bprop is None)
    program = _by_recording.get(key)
    if program is not None:
        with _lock:
            if key in _by_recording:
                _by_recording.move_to_end(key)
        return program
    error = None
    if score_mod_bprop is None:
        length = len(recorder.nodes)
        try:
            bwd_out = autodiff.append_bprop(recorder, fwd_out)
        except autodiff.BpropNotDerivable as e:
            # Raised when a backward graph is built, not now: a forward-only use is fine.
            del recorder.nodes[length:]
            bwd_out, error = None, e
    program = Program(recorder.nodes, fwd_out, bwd_out, slots[0], slots[1], bprop_error=error)
    _remember(_by_recording, key, program)
    return program


# ---------------------------------------------------------------------------------------------
# torch.compile: the program is recorded while dynamo traces and its ids are graph constants


def constant_form(fn: Optional[Callable]):
    """fn as values dynamo can pass as constants: a plain function as itself; a bound method or
    callable object as (class, method name, id(owner)); dynamo guards the owner's identity."""
    if fn is None or isinstance(fn, types.FunctionType):
        return fn
    is_method = isinstance(fn, types.MethodType)
    owner = fn.__self__ if is_method else fn
    return (type(owner), fn.__func__.__name__ if is_method else None, id(owner))


def from_constant_form(form) -> Optional[Callable]:
    if form is None or isinstance(form, types.FunctionType):
        return form
    owner_type, method_name, owner_id = form
    # The owner is alive: the frame dynamo is tracing holds it.
    owner = ctypes.cast(owner_id, ctypes.py_object).value
    assert type(owner) is owner_type
    return getattr(owner, method_name) if method_name else owner


@torch._dynamo.assume_constant_result
def traced_ids(mod_form, bprop_form, mod_names: tuple, mod_dtypes: tuple, bprop_names: tuple,
               bprop_dtypes: tuple, trail: tuple = ()) -> tuple[int, int, bool]:
    """Runs in plain Python while dynamo traces: records the program once and pins it (the
    compiled graph holds its ids). Returns (mod_id, bprop_id, whether it reads the head or key
    index: _ops.needs_two_rows). `trail` (program/shadow.py) is not read here: it is an argument
    so that dynamo specialises on what the mods read, and recompiles when it changes."""
    program = record(from_constant_form(mod_form), from_constant_form(bprop_form), mod_names, mod_dtypes,
                     bprop_names, bprop_dtypes)
    if program is None:
        return 0, 0, False
    pin(program)
    return program.mod_id, program.bprop_id, program.reads_head_or_key


def pin(program: Program) -> None:
    """Keeps a program recorded while dynamo traced: the compiled graph holds its ids."""
    with _lock:
        _pinned[program.mod_id] = program
        if program.bprop_id:
            _pinned[program.bprop_id] = program


# ---------------------------------------------------------------------------------------------
# Called from C++ while a graph is built


_build = threading.local()


def lookup(callable_id: int) -> Program:
    program = _live.get(callable_id) or _pinned.get(callable_id)
    if program is None:
        raise RuntimeError(
            f"cudnn_flex: no recorded score_mod program #{callable_id} is known in this process (an "
            "id from another process, or clear_cache() ran between a forward and its backward); "
            "call flex_attention again to record it")
    return program


# Roles of a callback (csrc/score_mod_bridge.h): a forward graph's score_mod, a backward
# graph's score_mod (its bprop follows, in the same build on the same thread), the bprop.
SCORE_MOD, BACKWARD_SCORE_MOD, BPROP = 0, 1, 2


def dispatch(callable_id: int, graph: Any, tensor: Any, tensors: Sequence[Any], role: int = SCORE_MOD) -> Any:
    """Lowers the part `role` of the program with this id onto the graph being built. cuDNN
    lowers a backward graph's score_mod before its bprop, on one thread (builds are serialised):
    the bprop continues the score_mod's replay and may read its values."""
    global _dispatch_calls
    _dispatch_calls += 1
    program = lookup(callable_id)
    if role == BPROP:
        if program.bprop_error is not None:
            raise program.bprop_error
        replay = getattr(_build, "replay", None)
        if replay is None or replay.program is not program:
            raise RuntimeError("cudnn_flex: a bprop was lowered without its score_mod in the same build")
        _build.replay = None
        replay.graph = graph
        replay.slots[D_P] = tensor
        replay.slots.update((bprop_slot(i), t) for i, t in enumerate(tensors))
        return replay.value(program.bwd_out)
    slots = {SCORE: tensor}
    slots.update((mod_slot(i), t) for i, t in enumerate(tensors))
    replay = Replay(program, graph, slots, for_cudnn=True)
    result = lower_forward(replay)
    if role == BACKWARD_SCORE_MOD:
        if program.bprop_error is not None:
            raise program.bprop_error
        if program.bwd_out is not None:  # the bprop callback follows and continues this replay
            _build.replay = replay
    return result


def dispatch_calls() -> int:
    """How many times C++ has called into Python to lower a program (tests use it)."""
    return _dispatch_calls
