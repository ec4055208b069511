"""When a mod's program can be known without recording it again.

Recording runs the mod on every call, which costs host time (tens of microseconds). For a plain
function that can read nothing that changes behind its back, the program is a function of what
it closes over: its code, the numbers and strings in its defaults and closure cells, and the
functions there (guarded the same way, recursively). `key(fn)` is that, or None when fn reads
anything else (a module global, an object, a tensor): those are recorded on every call.
The shapes of the call go into the cache key beside it, since a mod may ask get_dim().
"""

from __future__ import annotations

import dis
import functools
import types
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


def _value_key(value: Any, depth: int, leaves: Optional[list]) -> Optional[Hashable]:
    if isinstance(value, _PLAIN):
        # -0.0 and 0.0 compare equal but compute differently: the type and the repr tell apart
        return (type(value), repr(value)) if isinstance(value, float) else (type(value), value)
    if isinstance(value, torch.Tensor) and leaves is not None:
        # Its metadata only: the caller proves the program reads no value of it (record_call).
        if value.layout != torch.strided:
            return None
        leaves.append(value)
        return (torch.Tensor, value.dtype, tuple(value.shape), value.stride(), str(value.device),
                value.requires_grad)
    if isinstance(value, types.FunctionType):
        return key(value, depth + 1, leaves)
    # compose(*mods): read as they are now. Plain tuples and lists only: a namedtuple or another
    # subclass may hold state or behaviour of its own.
    if type(value) in (tuple, list) and depth < 4:
        parts = tuple(_value_key(v, depth + 1, leaves) for v in value)
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


def key(fn: Callable, depth: int = 0, leaves: Optional[list] = None) -> Optional[Hashable]:
    """The guard of fn, or None when its program must be recorded on every call. With `leaves`
    (a list), tensors held in fn's closure are allowed: each is appended to it, in the order
    with_tensors_replaced() walks, and the key has its dtype, shape, strides, device and
    requires_grad."""
    if depth > 4 or not isinstance(fn, types.FunctionType):
        return None
    if not _reads_no_global(fn.__code__, fn.__globals__):
        return None
    values = _closure_values(fn)
    if values is None:
        return None
    parts = [fn.__code__, tuple(sorted(fn.__kwdefaults__ or {}))]
    for value in values:
        k = _value_key(value, depth, leaves)
        if k is None:
            return None
        parts.append(k)
    return tuple(parts)


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
