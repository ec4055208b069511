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
import ctypes
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


def _checked_key(key: Any, owner_type: type) -> Hashable:
    name = owner_type.__qualname__
    _reject_tensors(key, name)
    try:
        hash(key)
    except TypeError as e:
        raise TypeError(
            f"cudnn_flex: {name}.score_mod_graph_cache_key() returned an unhashable "
            f"{type(key).__name__}; return a tuple of numbers and strings") from e
    return key


def _explicit_key(owner: Any) -> Optional[Hashable]:
    getter = getattr(owner, "score_mod_graph_cache_key", None)
    if getter is None:
        return None
    key = getter()
    return None if key is None else _checked_key(key, type(owner))


def _owner_key(owner_type: type, method_name: Optional[str], key: Hashable) -> Hashable:
    """Key of a bound method (method_name) or a callable object (None) whose owner has `key`."""
    if method_name is None:
        return ("object", owner_type.__module__, owner_type.__qualname__, key)
    return ("method", owner_type.__module__, owner_type.__qualname__, method_name, key)


def _function_key(fn: types.FunctionType) -> Optional[Hashable]:
    if fn.__closure__:
        return None  # the closed-over values are not part of the code
    if fn.__name__ == "<lambda>" or "<locals>" in fn.__qualname__:
        # The key holds the code object itself, so its identity cannot be reused while cached.
        return ("code", fn.__code__)
    return ("function", fn.__module__, fn.__qualname__)


def structural_key(fn: Callable) -> Optional[Hashable]:
    """The graph-cache key of fn, or None when its graph must be rebuilt on every call."""
    if isinstance(fn, types.FunctionType):
        return _function_key(fn)
    method_name = fn.__func__.__name__ if isinstance(fn, types.MethodType) else None
    owner = fn.__self__ if method_name else fn
    key = _explicit_key(owner)
    return None if key is None else _owner_key(type(owner), method_name, key)


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


_KEY_NOT_COMPUTED = object()


def resolve(fn: Optional[Callable], role: str, names: Sequence[str] = (),
            key: Any = _KEY_NOT_COMPUTED) -> tuple[int, bool]:
    """(id, cacheable) for fn called with tensors named `names`; id 0 means no callable. `key` is
    structural_key(fn) when the caller has already computed it (it runs on every call)."""
    if fn is None:
        return 0, True
    if not callable(fn):
        raise TypeError(f"cudnn_flex: {role} must be a callable (graph, score, tensors) -> score, "
                        f"got {type(fn).__name__}")
    if key is _KEY_NOT_COMPUTED:
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


def resolve_pair(score_mod: Optional[Callable], score_mod_bprop: Optional[Callable],
                 mod_names: tuple, bprop_names: tuple, mod_dtypes: tuple = ()) -> tuple[int, int, bool]:
    """(score_mod id, bprop id, cacheable) for one call. Without a bprop, one is derived from the
    score_mod's ops (auto_bprop), or none is used when the derivative is dP itself.

    Under torch.compile this runs once, while dynamo traces, and its result is a constant of the
    graph: the callables reach it in a form dynamo can pass as constants (see _constant_form)."""
    if torch.compiler.is_compiling():
        return _traced_pair(_constant_form(score_mod, "score_mod"),
                            _constant_form(score_mod_bprop, "score_mod_bprop"),
                            mod_names, bprop_names, mod_dtypes)
    return _resolve_pair_eager(score_mod, score_mod_bprop, mod_names, bprop_names, mod_dtypes)


def _resolve_pair_eager(score_mod, score_mod_bprop, mod_names, bprop_names, mod_dtypes):
    mod_key = _KEY_NOT_COMPUTED
    if score_mod is not None and score_mod_bprop is None:
        score_mod, score_mod_bprop, mod_key = _with_derived_bprop(score_mod, mod_names, mod_dtypes)
    mod_id, mod_cacheable = resolve(score_mod, "score_mod", mod_names, mod_key)
    bprop_id, bprop_cacheable = resolve(score_mod_bprop, "score_mod_bprop", bprop_names)
    return mod_id, bprop_id, mod_cacheable and bprop_cacheable


# structural key of a score_mod (+ its tensors) -> whether its derivative is dP itself
_passes_through: dict[Hashable, bool] = {}


def _with_derived_bprop(score_mod: Callable, names: tuple, dtypes: tuple):
    """(score_mod, bprop, key of the returned score_mod): the bprop derived from score_mod's ops,
    or (score_mod, None, its structural key) when none is needed."""
    from . import auto_bprop
    from .reference import ReferenceGraph, RefTensor

    key = structural_key(score_mod)
    analysis_key = None if key is None else (key, names, dtypes)
    through = _passes_through.get(analysis_key) if analysis_key is not None else None
    if through is None:
        graph = ReferenceGraph((1, 1, 1, 1), torch.device("cpu"))
        tensors = {n: RefTensor(torch.ones(1, 1, 1, 1, dtype=d or torch.float32), graph)
                   for n, d in zip(names, dtypes or (None,) * len(names))}
        through = auto_bprop.passes_through(score_mod, graph, RefTensor(torch.ones(1, 1, 1, 1), graph), tensors)
        if through is None:
            return score_mod, None, key  # the score_mod fails: its build will say how
        if analysis_key is not None:
            with _lock:
                _passes_through[analysis_key] = through
    if through:
        return score_mod, None, key
    auto = auto_bprop.AutoBprop(score_mod, None if key is None else ("auto", key))
    return auto.forward, auto.backward, _KEY_NOT_COMPUTED


def _uncacheable_under_compile(name: str, role: str) -> TypeError:
    return TypeError(
        f"cudnn_flex: under torch.compile the {role} must have a cacheable graph, but {name} is a "
        "closure, or a bound method or object without score_mod_graph_cache_key(). Define it at "
        "module level, or give its object a score_mod_graph_cache_key() method.")


def _constant_form(fn: Optional[Callable], role: str):
    """fn as values dynamo can pass as constants: a plain function as itself; a bound method or
    callable object as (class, method name, id(owner)); dynamo guards the owner's identity."""
    if fn is None or isinstance(fn, types.FunctionType):
        return fn
    is_method = isinstance(fn, types.MethodType)
    owner = fn.__self__ if is_method else fn
    if not hasattr(owner, "score_mod_graph_cache_key"):
        raise _uncacheable_under_compile(type(owner).__name__, role)
    return (type(owner), fn.__func__.__name__ if is_method else None, id(owner))


def _from_constant_form(form, role: str) -> Optional[Callable]:
    if form is None or isinstance(form, types.FunctionType):
        if form is not None and _function_key(form) is None:
            raise _uncacheable_under_compile(describe(form), role)
        return form
    owner_type, method_name, owner_id = form
    # The owner is alive: the frame dynamo is tracing holds it.
    owner = ctypes.cast(owner_id, ctypes.py_object).value
    assert type(owner) is owner_type
    if _explicit_key(owner) is None:
        raise _uncacheable_under_compile(owner_type.__name__, role)
    return getattr(owner, method_name) if method_name else owner


@torch._dynamo.assume_constant_result
def _traced_pair(mod_form, bprop_form, mod_names: tuple, bprop_names: tuple, mod_dtypes: tuple):
    """Runs in plain Python while dynamo traces. Keys are read here rather than traced, because
    dynamo would turn a key's floats into symbolic values (dynamic=True, or after a change)."""
    return _resolve_pair_eager(_from_constant_form(mod_form, "score_mod"),
                               _from_constant_form(bprop_form, "score_mod_bprop"),
                               mod_names, bprop_names, mod_dtypes)


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
