"""score_mod callables -> integer ids for the C++ op, and whether their graphs may be cached.

Cache rules (DESIGN.md):
- module-level named functions are keyed by module + qualname; lambdas and nested functions
  without closure variables by their code object;
- callables and bound methods whose owner defines ``score_mod_graph_cache_key()`` are keyed by
  type + that key (hashable, no tensors inside);
- anything else (closures, unkeyed bound methods and objects) is never keyed by object id, since
  ids are reused: its graph is rebuilt on every call, with a one-time warning.
"""

from __future__ import annotations

import collections
import itertools
import threading
import types
import warnings
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

_lock = threading.Lock()
_next_id = itertools.count(1)
_id_by_key: dict[Hashable, int] = {}
# id -> (callable, names of its tensors in order). The names are part of what an id stands for:
# C++ passes the tensors by position and the callable sees them as a dict.
_callable_by_id: dict[int, tuple[Callable, tuple[str, ...]]] = {}
# Uncached callables must live until their backward graph is built; the oldest are dropped.
_UNCACHED_LIMIT = 4096
_uncached_by_id: "collections.OrderedDict[int, tuple[Callable, tuple[str, ...]]]" = collections.OrderedDict()
_warned: set[str] = set()
_dispatch_calls = 0


def describe(fn: Callable) -> str:
    """A name for fn that a user recognises in an error message."""
    if isinstance(fn, types.MethodType):
        return f"{type(fn.__self__).__qualname__}.{fn.__func__.__name__}"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "__main__" else name


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


def _explicit_key(owner: Any) -> Optional[Hashable]:
    getter = getattr(owner, "score_mod_graph_cache_key", None)
    if getter is None:
        return None
    name = type(owner).__qualname__
    key = getter()
    _reject_tensors(key, name)
    try:
        hash(key)
    except TypeError as e:
        raise TypeError(
            f"cudnn_flex: {name}.score_mod_graph_cache_key() returned an unhashable "
            f"{type(key).__name__}; return a tuple of numbers and strings") from e
    return key


def structural_key(fn: Callable) -> Optional[Hashable]:
    """The graph-cache key of fn, or None when its graph must be rebuilt on every call."""
    if isinstance(fn, types.MethodType):
        key = _explicit_key(fn.__self__)
        if key is None:
            return None
        owner = type(fn.__self__)
        return ("method", owner.__module__, owner.__qualname__, fn.__func__.__name__, key)
    if isinstance(fn, types.FunctionType):
        if fn.__closure__:
            return None  # the closed-over values are not part of the code
        if fn.__name__ == "<lambda>" or "<locals>" in fn.__qualname__:
            # The key holds the code object itself, so its identity cannot be reused while cached.
            return ("code", fn.__code__)
        return ("function", fn.__module__, fn.__qualname__)
    key = _explicit_key(fn)
    if key is None:
        return None
    return ("object", type(fn).__module__, type(fn).__qualname__, key)


def _warn_uncached(fn: Callable, role: str) -> None:
    name = describe(fn)
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"cudnn_flex: {role} {name} is a closure, or a bound method or object without "
        "score_mod_graph_cache_key(), so its cuDNN graph cannot be cached and is rebuilt on every "
        "call (slow). Define it at module level, or give its object a "
        "score_mod_graph_cache_key() method that returns a hashable tuple of everything that "
        "changes the graph.", stacklevel=4)


def resolve(fn: Optional[Callable], role: str, names: Sequence[str] = ()) -> tuple[int, bool]:
    """(id, cacheable) for fn called with tensors named `names`; id 0 means no callable."""
    if fn is None:
        return 0, True
    if not callable(fn):
        raise TypeError(f"cudnn_flex: {role} must be a callable (graph, score, tensors) -> score, "
                        f"got {type(fn).__name__}")
    key = structural_key(fn)
    names = tuple(names)
    with _lock:
        if key is None:
            _warn_uncached(fn, role)
            new_id = next(_next_id)
            _uncached_by_id[new_id] = (fn, names)
            while len(_uncached_by_id) > _UNCACHED_LIMIT:
                _uncached_by_id.popitem(last=False)
            return new_id, False
        key = (key, names)
        fid = _id_by_key.get(key)
        if fid is None:
            fid = _id_by_key[key] = next(_next_id)
        # The latest object with this key is the one called on the next build (a stateful
        # score_mod and its bprop must be bound to the same object to share state).
        _callable_by_id[fid] = (fn, names)
        return fid, True


def dispatch(callable_id: int, graph: Any, tensor: Any, tensors: Sequence[Any]) -> Any:
    """Called from C++ while a graph is built: runs the user's callable and checks its result."""
    global _dispatch_calls
    from . import _C

    entry = _callable_by_id.get(callable_id) or _uncached_by_id.get(callable_id)
    if entry is None:
        raise RuntimeError(
            f"cudnn_flex: the score_mod registered as #{callable_id} is no longer known (more than "
            f"{_UNCACHED_LIMIT} uncached score_mods were used since its forward); give it a "
            "score_mod_graph_cache_key() so that it is cached")
    fn, names = entry
    _dispatch_calls += 1
    result = fn(graph, tensor, dict(zip(names, tensors)))
    if not isinstance(result, _C.Tensor):
        raise TypeError(
            f"cudnn_flex: {describe(fn)} returned {type(result).__name__}; a score_mod must return "
            "the graph tensor it computed from its input (for example "
            "`return graph.mul(score, 0.5)` or `return score * 0.5`)")
    return result


def dispatch_calls() -> int:
    """How many times C++ has called into a Python score_mod or bprop (tests use it)."""
    return _dispatch_calls
