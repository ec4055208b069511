"""Where a torch-style mod's captured tensors live, so that a compiled call can fetch them.

Under torch.compile a torch-style mod is recorded once, outside dynamo (its program ids are
constants of the compiled graph). The tensors it indexes must still be inputs of the compiled
graph, so that new values never recompile and never go stale: the recording answers, for each
captured tensor, a path from the user's callables to it (a closure cell, a default, a module
global, an attribute, an item), and inside the traced code `fetch` follows that path, so dynamo
sees the tensor where the user keeps it and makes it a graph input.

The recording needs the mods themselves, but a mod made inside the compiled code (Hugging Face
builds its mask functions in forward) exists for dynamo only, and one whose closure holds a
tensor is no Python constant. `describe` (in the traced code) turns a mod into a constant of
code, module and closure values, tensors replaced by their dtype and rank; `rebuild` (outside)
makes the same function over placeholder tensors, which is all a recording reads of them.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional, Sequence

import torch

_DEPTH = 5
_MAX_ITEMS = 64


def _children(obj: Any):
    """(step, child) pairs a captured tensor can be reached through."""
    if isinstance(obj, types.FunctionType):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                yield ("cell", i), cell.cell_contents
            except ValueError:  # an empty cell (a name assigned later in the enclosing function)
                continue
        for i, value in enumerate(obj.__defaults__ or ()):
            yield ("default", i), value
        for name, value in (obj.__kwdefaults__ or {}).items():
            yield ("kwdefault", name), value
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                yield ("global", name), obj.__globals__[name]
    elif isinstance(obj, types.MethodType):
        yield ("self",), obj.__self__
        yield ("func",), obj.__func__
    elif isinstance(obj, (list, tuple)) and len(obj) <= _MAX_ITEMS:
        for i, value in enumerate(obj):
            yield ("item", i), value
    elif isinstance(obj, dict) and len(obj) <= _MAX_ITEMS:
        for key, value in obj.items():
            if isinstance(key, (str, int)):
                yield ("item", key), value
    elif isinstance(obj, types.ModuleType) or isinstance(obj, torch.Tensor) or obj is None:
        return  # modules are reached attribute by attribute through a function's globals only
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for name, value in vars(obj).items():
            yield ("attr", name), value
        call = getattr(type(obj), "__call__", None)
        if isinstance(call, types.FunctionType):
            yield ("call",), call


def path_to(roots: Sequence[Any], tensor: torch.Tensor) -> Optional[tuple]:
    """The shortest path from roots[i] to `tensor` (by identity): (i, step, step, ...), or None."""
    seen = set()
    frontier = [((i,), root) for i, root in enumerate(roots)]
    for _ in range(_DEPTH + 1):
        following = []
        for path, obj in frontier:
            if obj is tensor:
                return path
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            following.extend((path + (step,), child) for step, child in _children(obj))
        frontier = following
    return None


def fetch(roots: Sequence[Any], path: tuple) -> Any:
    """The object at `path` (path_to's answer). Plain attribute and item reads, so that dynamo can
    follow them in traced code."""
    obj = roots[path[0]]
    for step in path[1:]:
        kind = step[0]
        if kind == "cell":
            obj = obj.__closure__[step[1]].cell_contents
        elif kind == "default":
            obj = obj.__defaults__[step[1]]
        elif kind == "kwdefault":
            obj = obj.__kwdefaults__[step[1]]
        elif kind == "global":
            obj = obj.__globals__[step[1]]
        elif kind == "attr":
            obj = getattr(obj, step[1])
        elif kind == "item":
            obj = obj[step[1]]
        elif kind == "self":
            obj = obj.__self__
        elif kind == "func":
            obj = obj.__func__
        else:  # "call"
            obj = type(obj).__call__
    return obj


def describe(value: Any, as_constant: Callable) -> tuple:
    """A constant that rebuild() turns back into value, tensors as placeholders. Runs in the code
    dynamo traces. `as_constant` gives other objects' constant form (the registry's: the object
    by identity)."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return ("value", value)
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.dim())
    if isinstance(value, types.FunctionType):
        cells = tuple(describe(c.cell_contents, as_constant) for c in (value.__closure__ or ()))
        defaults = tuple(describe(d, as_constant) for d in (value.__defaults__ or ()))
        kwdefaults = tuple((k, describe(d, as_constant)) for k, d in (value.__kwdefaults__ or {}).items())
        return ("function", value.__code__, value.__module__, value.__name__, cells, defaults, kwdefaults)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(describe(x, as_constant) for x in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, describe(x, as_constant)) for k, x in value.items()))
    return ("object", as_constant(value))


def rebuild(desc: tuple, from_constant: Callable) -> Any:
    """describe()'s value again, outside dynamo; tensors are meta placeholders of the same dtype
    and rank."""
    kind = desc[0]
    if kind == "value":
        return desc[1]
    if kind == "tensor":
        # Two entries per dim: a tensor of rank >= 1 is no scalar to the recording, as in eager.
        return torch.empty((2,) * desc[2], dtype=desc[1], device="meta")
    if kind == "function":
        _, code, module, name, cells, defaults, kwdefaults = desc
        module_globals = vars(sys.modules[module]) if module in sys.modules else {"__builtins__": __builtins__}
        fn = types.FunctionType(code, module_globals, name,
                                tuple(rebuild(d, from_constant) for d in defaults) or None,
                                tuple(types.CellType(rebuild(c, from_constant)) for c in cells) or None)
        fn.__kwdefaults__ = {k: rebuild(d, from_constant) for k, d in kwdefaults} or None
        return fn
    if kind in ("list", "tuple"):
        items = [rebuild(x, from_constant) for x in desc[1]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {k: rebuild(x, from_constant) for k, x in desc[1]}
    return from_constant(desc[1])
