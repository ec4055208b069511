"""When a mod's program can be known without recording it again.

Recording runs the mod on every call, which costs host time (tens of microseconds). For a plain
function that can read nothing that changes behind its back, the program is a function of what
it closes over: its code, the numbers and strings in its defaults and closure cells, and the
functions there (guarded the same way, recursively). `key(fn)` is that, or None when fn reads
anything else (a module global, an object, a tensor): those are recorded on every call.
The shapes of the call go into the cache key beside it, since a mod may ask get_dim().

`snapshot(fn)` is what key(fn) read, as objects: a later call whose mod still holds the very same
objects (`unchanged`) has the same key, which a cached call checks without building the key.
"""

from __future__ import annotations

import dis
import functools
import operator
import types
import weakref
from typing import Any, Callable, Hashable, Optional

import torch

_PLAIN = (int, float, str, bool, type(None))
# Library modules whose functions a mod calls (torch.tanh, math.sqrt): read as constants. A
# user's own module (config.WINDOW) is not here, so a mod that reads one is recorded every call.
_LIBRARIES = ("torch", "math", "operator", "torch.nn.functional")


@functools.lru_cache(maxsize=4096)
def _names(code: types.CodeType) -> Optional[tuple]:
    """The names the code (and code nested in it) looks up, or None when it imports (a module
    imported inside the mod, then read, is state the guard cannot see)."""
    if any(ins.opname in ("IMPORT_NAME", "IMPORT_FROM") for ins in dis.get_instructions(code)):
        return None
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            nested = _names(const)
            if nested is None:
                return None
            names.extend(nested)
    return tuple(names)


def _reads_no_global(code: types.CodeType, globals_: dict) -> bool:
    """No name the code looks up is a module global other than a library module (attribute
    names that happen to be global names count too, which is only more careful), and it imports
    nothing."""
    names = _names(code)
    if names is None:
        return False
    for name in names:
        if name in globals_:
            value = globals_[name]
            if not (isinstance(value, types.ModuleType) and value.__name__ in _LIBRARIES):
                return False
    return True


def _value_key(value: Any, depth: int, leaves: Optional[list], reads: Optional[list] = None) -> Optional[Hashable]:
    if isinstance(value, _PLAIN):
        # -0.0 and 0.0 compare equal but compute differently: the type and the repr tell apart
        return (type(value), repr(value)) if isinstance(value, float) else (type(value), value)
    if isinstance(value, torch.Tensor) and leaves is not None:
        # Its metadata only: the caller proves the program reads no value of it (record_call).
        if value.layout != torch.strided:
            return None
        leaves.append(value)
        return (torch.Tensor,) + leaf_metadata(value)
    if isinstance(value, types.FunctionType):
        return key(value, depth + 1, leaves, reads)
    # compose(*mods): read as they are now. Plain tuples and lists only: a namedtuple or another
    # subclass may hold state or behaviour of its own.
    if type(value) in (tuple, list) and depth < 4:
        if reads is not None and type(value) is list:
            reads.append(_ListRead(value))  # a tuple's items cannot change; a list's can
        parts = tuple(_value_key(v, depth + 1, leaves, reads) for v in value)
        return None if None in parts else (type(value), parts)
    return None


def _closure_values(fn: types.FunctionType) -> Optional[list]:
    """fn's defaults, closure cell values and keyword defaults, in one fixed order (None when a
    cell is not assigned yet)."""
    try:
        cells = [c.cell_contents for c in fn.__closure__ or ()]
    except ValueError:
        return None
    return list(fn.__defaults__ or ()) + cells + [v for _, v in sorted((fn.__kwdefaults__ or {}).items())]


def key(fn: Callable, depth: int = 0, leaves: Optional[list] = None,
        reads: Optional[list] = None) -> Optional[Hashable]:
    """The guard of fn, or None when its program must be recorded on every call. With `leaves`
    (a list), tensors held in fn's closure are allowed: each is appended to it, in the order
    with_tensors_replaced() walks, and the key has its dtype, shape, strides, device and
    requires_grad. With `reads` (a list), what the key was made of is appended to it (snapshot)."""
    if depth > 4 or not isinstance(fn, types.FunctionType):
        return None
    if not _reads_no_global(fn.__code__, fn.__globals__):
        return None
    values = _closure_values(fn)
    if values is None:
        return None
    if reads is not None:
        reads.append(_FunctionRead(fn))
    parts = [fn.__code__, tuple(sorted(fn.__kwdefaults__ or {}))]
    for value in values:
        k = _value_key(value, depth, leaves, reads)
        if k is None:
            return None
        parts.append(k)
    return tuple(parts)


_MISSING = object()
_CELL_CONTENTS = operator.attrgetter("cell_contents")


class _FunctionRead:
    """What key() read of one function: its code, defaults, closure cell values and keyword
    defaults (the objects themselves), and the module globals under every name its code looks
    up (absent ones as absent). The function itself is held weakly: a snapshot of a mod that
    holds tensors must not keep it (and them) alive (fast_path.py forgets its entries when the
    mod goes); a function nested in its closure is held by the cells read here."""

    __slots__ = ("fn", "code", "defaults", "cells", "contents", "kwdefaults", "kwvalues", "globals", "present",
                 "absent", "global_names")

    def __init__(self, fn: types.FunctionType):
        self.fn, self.code, self.defaults = weakref.ref(fn), fn.__code__, fn.__defaults__
        self.cells = fn.__closure__ or ()  # read-only: the same cell objects for fn's lifetime
        self.contents = tuple(_CELL_CONTENTS(c) for c in self.cells)
        self.kwdefaults = fn.__kwdefaults__
        self.kwvalues = dict(self.kwdefaults) if self.kwdefaults else None
        # The names its code looks up: those that were module globals, with their objects, and those
        # that were not (most: the attribute names of a DSL mod, graph.mul), checked in one C call
        # against the globals' live key view (a loop of dict lookups took ~0.09 us a name).
        self.globals = fn.__globals__
        # Only for a plain dict: a dict subclass (FunctionType takes one) may override keys(), and
        # CPython reads its globals through __getitem__; there each name is looked up as before.
        found = [(name, self.globals.get(name, _MISSING)) for name in dict.fromkeys(_names(fn.__code__))]
        plain = type(self.globals) is dict
        self.present = tuple((name, value) for name, value in found if value is not _MISSING or not plain)
        self.absent = tuple(name for name, value in found if value is _MISSING and plain)
        self.global_names = self.globals.keys() if plain else None

    def unchanged(self) -> bool:
        # Plain loops: a mod has a handful of cells and names, too few for map() to pay off.
        fn = self.fn()
        if fn is None or fn.__code__ is not self.code or fn.__defaults__ is not self.defaults or fn.__kwdefaults__ is not self.kwdefaults:
            return False
        if self.cells:
            try:
                for cell, value in zip(self.cells, self.contents):
                    if cell.cell_contents is not value:
                        return False
            except ValueError:  # a cell emptied since (`del` of a nonlocal)
                return False
        if self.kwvalues is not None and (len(self.kwdefaults) != len(self.kwvalues) or any(
                self.kwdefaults.get(k, _MISSING) is not v for k, v in self.kwvalues.items())):
            return False
        if self.absent and not self.global_names.isdisjoint(self.absent):
            return False
        if self.present:
            get = self.globals.get
            for name, value in self.present:
                if get(name, _MISSING) is not value:
                    return False
        return True


class _ListRead:
    """A list key() read: its items, the objects themselves."""

    __slots__ = ("items", "seen")

    def __init__(self, items: list):
        self.items, self.seen = items, tuple(items)

    def unchanged(self) -> bool:
        return len(self.items) == len(self.seen) and all(map(operator.is_, self.items, self.seen))


def snapshot(fn: Callable, leaves: Optional[list] = None) -> Optional[tuple]:
    """What key(fn) reads, or None when key(fn) is None. While unchanged(snapshot) holds, key(fn)
    is what it was: the objects read are the same ones, and the values among them (numbers,
    strings, code) are immutable; functions and lists in the closure are read again, each with
    its own entry. Tensors are allowed only with `leaves` (a list; key()'s leaves): their metadata
    can change in place, so while unchanged() holds the key is what it was only if each leaf's
    metadata (leaf_metadata) is too."""
    reads: list = []
    return tuple(reads) if key(fn, leaves=leaves, reads=reads) is not None else None


def leaf_metadata(t: torch.Tensor) -> tuple:
    """What key() reads of a tensor in a closure, also as a later call compares it (metadata can
    change in place: resize_, set_, transpose_, requires_grad_, `.data = u`, and its class:
    `t.__class__ = Sub`, whose __torch_function__ the shortcut would then have to call)."""
    return type(t), t.dtype, t.shape, t.stride(), t.device, t.requires_grad, t.layout


def unchanged(reads: tuple) -> bool:
    """Whether everything a snapshot read is still the same object."""
    for read in reads:
        if not read.unchanged():
            return False
    return True


def with_tensors_replaced(value: Any, replace: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """value (a guarded function, or what its closure holds) rebuilt with every tensor that key()
    counted as a leaf replaced by replace(tensor): the same code over other tensors."""
    if isinstance(value, torch.Tensor):
        return replace(value)
    if type(value) in (tuple, list):
        return type(value)(with_tensors_replaced(v, replace) for v in value)
    if not isinstance(value, types.FunctionType):
        return value
    twin = lambda v: with_tensors_replaced(v, replace)  # noqa: E731
    fn = types.FunctionType(value.__code__, value.__globals__, value.__name__,
                            tuple(twin(v) for v in value.__defaults__) if value.__defaults__ else None,
                            tuple(types.CellType(twin(c.cell_contents)) for c in value.__closure__)
                            if value.__closure__ else None)
    fn.__kwdefaults__ = {k: twin(v) for k, v in value.__kwdefaults__.items()} if value.__kwdefaults__ else None
    return fn
