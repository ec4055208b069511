"""Torch-style score_mods and mask_mods, as written for torch.nn.attention.flex_attention.

score_mod(score, b, h, q_idx, kv_idx) -> score and mask_mod(b, h, q_idx, kv_idx) -> bool run on
proxy values that emit the score_mod DSL into whatever graph they are given (cuDNN's through the
bridge, or the reference graph). Tensors the function captures (closure, defaults, globals) and
indexes by index variables (`slopes[h]`, `doc[q_idx]`, `bias[b, h, q_idx, kv_idx]`) become score_mod
tensors: strided views broadcast to [B, H, Sq, Skv], passed as runtime inputs on every call.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Hashable, Optional

import torch

_AXES = "bhqk"  # index variable -> score axis: b 0, h 1, q_idx 2, kv_idx 3
_CAPTURE_PREFIX = "__capture"


class UnsupportedConstruct(TypeError):
    """The torch-style score_mod used something that cannot become a cuDNN graph."""


# ---------------------------------------------------------------------------------------------
# Which functions are torch-style


def torch_score_mod(fn: Callable) -> Callable:
    """Marks fn as a torch-style score_mod(score, b, h, q_idx, kv_idx) (needed only when its
    signature does not show it, e.g. *args)."""
    try:
        fn._cudnn_flex_torch_style = True
    except AttributeError:
        fn = functools.wraps(fn)(lambda *a: fn(*a))
        fn._cudnn_flex_torch_style = True
    return fn


def _positional_count(fn: Callable) -> Optional[int]:
    """How many positional parameters fn takes (None with *args); read from the code object when
    there is one, since this runs on every call."""
    func, bound = (fn.__func__, 1) if isinstance(fn, types.MethodType) else (fn, 0)
    if isinstance(func, types.FunctionType):
        code = func.__code__
        return None if code.co_flags & inspect.CO_VARARGS else code.co_argcount - bound
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def is_torch_style(fn: Callable) -> bool:
    """score_mod(score, b, h, q_idx, kv_idx) rather than the DSL's (graph, score, tensors)."""
    return getattr(fn, "_cudnn_flex_torch_style", False) or _positional_count(fn) == 5


# ---------------------------------------------------------------------------------------------
# Captured tensors


def _walk(value: Any, key: list, tensors: list, seen: set, depth: int = 0) -> bool:
    """Appends the structure of value to key and its tensors to tensors; False if uncacheable."""
    if depth > 8:
        return False
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        key.append(("tensor", value.dtype, value.dim(), value.device.type))
        return True
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        key.append(value)
        return True
    if isinstance(value, types.ModuleType):
        key.append(("module", value.__name__))
        return True
    if id(value) in seen:
        key.append(("seen",))
        return True
    seen.add(id(value))
    if isinstance(value, (tuple, list)):
        key.append((type(value).__name__, len(value)))
        return all(_walk(v, key, tensors, seen, depth + 1) for v in value)
    if isinstance(value, dict):
        key.append(("dict", tuple(value.keys()) if all(isinstance(k, str) for k in value) else None))
        return all(_walk(v, key, tensors, seen, depth + 1) for v in value.values())
    if isinstance(value, types.FunctionType):
        return _walk_function(value, key, tensors, seen, depth)
    if isinstance(value, types.MethodType):
        key.append(("method", value.__func__.__code__))
        return _walk(value.__self__, key, tensors, seen, depth + 1)
    if isinstance(value, functools.partial):
        key.append(("partial",))
        return all(_walk(v, key, tensors, seen, depth + 1)
                   for v in (value.func, value.args, value.keywords))
    if isinstance(value, (types.BuiltinFunctionType, type)):
        key.append(value)  # builtins, classes: identified by themselves
        return True
    if callable(value) and hasattr(value, "__dict__"):
        key.append(("object", type(value)))
        return _walk(vars(value), key, tensors, seen, depth + 1)
    return False


def _walk_function(fn: types.FunctionType, key: list, tensors: list, seen: set, depth: int) -> bool:
    code = fn.__code__
    key.append(("function", code))
    parts = [fn.__defaults__ or (), fn.__kwdefaults__ or {}]
    parts += [cell.cell_contents for cell in fn.__closure__ or ()]
    # Globals the code names (module-level tensors, helper functions, constants).
    parts += [fn.__globals__[n] for n in code.co_names if n in fn.__globals__
              and not isinstance(fn.__globals__[n], types.ModuleType)]
    return all(_walk(p, key, tensors, seen, depth + 1) for p in parts)


def captures(fn: Callable) -> tuple[Optional[Hashable], list[torch.Tensor]]:
    """(structural key or None if uncacheable, captured tensors in a fixed order)."""
    key: list = []
    tensors: list = []
    ok = _walk(fn, key, tensors, set())
    if ok:
        try:
            frozen = tuple(key)
            hash(frozen)
        except TypeError:
            ok = False
    return (("torch-style", frozen) if ok else None), tensors


# ---------------------------------------------------------------------------------------------
# The proxy values


class _Trace:
    """State of one run of a torch-style function on a graph."""

    def __init__(self, graph, score, tensors, captured: list[torch.Tensor]):
        self.graph = graph
        self.score = score
        self.tensors = tensors  # name -> graph tensor
        self.captured = {id(t): i for i, t in enumerate(captured)}
        self.views: dict[str, tuple[int, tuple[int, ...]]] = {}  # name -> (capture, axes)
        self._index_cache: dict[int, Any] = {}

    def index(self, axis: int):
        if axis not in self._index_cache:
            self._index_cache[axis] = self.graph.gen_index(self.score, axis)
        return self._index_cache[axis]

    def capture(self, t: torch.Tensor, axes: tuple[int, ...], what: str) -> "Proxy":
        i = self.captured.get(id(t))
        if i is None:
            raise UnsupportedConstruct(
                f"cudnn_flex: {what} uses a tensor the score_mod does not capture in a closure, "
                "default or global (one made or computed inside it, e.g. slopes[0]): its values "
                "would be frozen into a cached graph. Use a Python number, or capture the tensor "
                "and index it by index variables")
        name = f"{_CAPTURE_PREFIX}{i}_" + "".join(_AXES[a] for a in axes)
        self.views[name] = (i, axes)
        return Proxy(self, node=self.tensors[name], is_input=True)


def _unsupported(what: str) -> UnsupportedConstruct:
    return UnsupportedConstruct(f"cudnn_flex: a torch-style score_mod cannot use {what}")


class Proxy:
    """A value of the score_mod: an index variable (axis) or a graph tensor (node)."""

    __slots__ = ("trace", "axis", "_node", "is_bool", "is_input")

    def __init__(self, trace: _Trace, node=None, axis: Optional[int] = None, is_bool: bool = False,
                 is_input: bool = False):
        self.trace, self._node, self.axis, self.is_bool = trace, node, axis, is_bool
        self.is_input = is_input  # a captured tensor as it enters the graph

    @property
    def node(self):
        if self._node is None:
            self._node = self.trace.index(self.axis)
        return self._node

    # Python control flow on a traced value has no single answer over the score matrix.
    def __bool__(self):
        raise _unsupported("Python control flow on a traced value (if/while/and/or/not on a score "
                           "or index); use torch.where(cond, a, b), & and | instead")

    def __int__(self):
        raise _unsupported("int() of a traced value")

    def __float__(self):
        raise _unsupported("float() of a traced value")

    def __index__(self):
        raise _unsupported("a traced value as a Python index (use it to index a captured tensor)")

    def __iter__(self):
        raise _unsupported("iteration over a traced value")

    def __len__(self):
        raise _unsupported("len() of a traced value")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        trace = next(a.trace for a in _flat(args, kwargs) if isinstance(a, Proxy))
        handler = _TORCH_FUNCTIONS.get(func)
        if handler is None:
            name = getattr(func, "__name__", None) or repr(func)
            raise _unsupported(f"torch function {name}")
        return handler(trace, *args, **kwargs)

    def to(self, *args, **kwargs):
        return _to(self.trace, self, *args, **kwargs)

    def float(self):
        return self.to(torch.float32)

    def bool(self):
        return self.to(torch.bool)

    def __getitem__(self, item):
        raise _unsupported("indexing a traced value (index captured tensors with index variables instead)")


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _operand(trace: _Trace, x, what: str):
    """A graph operand for x: a graph tensor, or a Python number as a constant."""
    if isinstance(x, Proxy):
        return x.node
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, torch.Tensor):
        if x.numel() == 1 and x.dim() <= 1:
            return trace.capture(x, (), what).node
        raise _unsupported(f"a captured tensor of shape {tuple(x.shape)} without indexing it by "
                           "index variables (b, h, q_idx, kv_idx) in " + what)
    raise _unsupported(f"a {type(x).__name__} in {what}")


# Ops whose operands may be swapped (to the mirrored op): cuDNN refuses an op whose first input
# is a constant or a score_mod tensor (the bridge then lifts it with an extra add), so a computed
# value goes first where it can.
_SWAPPED = {"add": "add", "mul": "mul", "max": "max", "min": "min", "logical_and": "logical_and",
            "logical_or": "logical_or", "cmp_eq": "cmp_eq", "cmp_neq": "cmp_neq",
            "cmp_gt": "cmp_lt", "cmp_lt": "cmp_gt", "cmp_ge": "cmp_le", "cmp_le": "cmp_ge"}


def _computed(x) -> bool:
    return isinstance(x, Proxy) and not x.is_input


def _binary(op: str, is_bool: bool = False):
    def handler(trace, a, b, **kwargs):
        if kwargs:
            raise _unsupported(f"keyword arguments {sorted(kwargs)} of {op}")
        name = op
        if op in _SWAPPED and not _computed(a) and _computed(b):
            a, b, name = b, a, _SWAPPED[op]
        graph_op = getattr(trace.graph, name)
        return Proxy(trace, graph_op(_operand(trace, a, op), _operand(trace, b, op)), is_bool=is_bool)
    return handler


def _reversed(handler):
    return lambda trace, a, b, **kw: handler(trace, b, a, **kw)


def _unary(op: str):
    def handler(trace, x, **kwargs):
        if kwargs:
            raise _unsupported(f"keyword arguments {sorted(kwargs)} of {op}")
        return Proxy(trace, getattr(trace.graph, op)(_operand(trace, x, op)))
    return handler


def _where(trace, cond, a, b):
    mask = _operand(trace, cond, "torch.where")
    return Proxy(trace, trace.graph.binary_select(_operand(trace, a, "torch.where"),
                                                  _operand(trace, b, "torch.where"), mask))


def _logical_not(trace, x):
    return Proxy(trace, trace.graph.logical_not(_operand(trace, x, "~")), is_bool=True)


def _clamp(trace, x, min=None, max=None):
    out = _operand(trace, x, "clamp")
    if min is not None:
        out = trace.graph.max(out, _operand(trace, min, "clamp"))
    if max is not None:
        out = trace.graph.min(out, _operand(trace, max, "clamp"))
    return Proxy(trace, out)


def _to(trace, x, *args, **kwargs):
    dtype = kwargs.pop("dtype", None)
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None:
        return x  # a device move: the value stays where it is
    node = _operand(trace, x, ".to")
    if dtype == torch.bool:
        return Proxy(trace, trace.graph.cmp_neq(node, 0.0), is_bool=True)
    if dtype.is_floating_point:
        # Arithmetic in the graph is float32; casting to a float type keeps the value.
        if isinstance(x, Proxy) and not x.is_bool and x.axis is None:
            return x
        return Proxy(trace, trace.graph.identity(node))
    if dtype in (torch.int32, torch.int64):
        if isinstance(x, Proxy) and x.axis is not None:
            return x
        raise _unsupported(f".to({dtype}) of a computed value (rounding is not part of the DSL)")
    raise _unsupported(f".to({dtype})")


def _getitem(trace, t, index):
    """captured_tensor[index variables...] -> a broadcast score_mod tensor."""
    if not isinstance(t, torch.Tensor):
        raise _unsupported("indexing a traced value")
    index = index if isinstance(index, tuple) else (index,)
    axes = []
    for i in index:
        if not (isinstance(i, Proxy) and i.axis is not None):
            raise _unsupported("a captured tensor indexed by something other than the index "
                               "variables b, h, q_idx, kv_idx themselves (a gather by a computed "
                               "index, a slice or a number)")
        axes.append(i.axis)
    if len(axes) != t.dim():
        raise _unsupported(f"a captured tensor of {t.dim()} dims indexed by {len(axes)} index "
                           "variables; index every dim")
    if len(set(axes)) != len(axes):
        raise _unsupported("a captured tensor indexed twice by the same index variable")
    return trace.capture(t, tuple(axes), "indexing")


def _build_table():
    T = torch.Tensor
    add, sub, mul, div = _binary("add"), _binary("sub"), _binary("mul"), _binary("div")
    table = {
        # Commutative ops keep the traced value first: cuDNN refuses a constant as first input.
        T.__add__: add, T.__radd__: add, torch.add: add,
        T.__sub__: sub, T.__rsub__: _reversed(sub), torch.sub: sub,
        T.__mul__: mul, T.__rmul__: mul, torch.mul: mul,
        T.__truediv__: div, T.__rtruediv__: _reversed(div), torch.div: div, torch.true_divide: div,
        T.__pow__: _binary("pow"), T.__rpow__: _reversed(_binary("pow")), torch.pow: _binary("pow"),
        T.__mod__: _binary("mod"), torch.fmod: _binary("mod"), torch.remainder: _binary("mod"),
        torch.maximum: _binary("max"), torch.minimum: _binary("min"),
        T.__neg__: _unary("neg"), torch.neg: _unary("neg"), T.__abs__: _unary("abs"), torch.abs: _unary("abs"),
        torch.where: _where, torch.clamp: _clamp, T.clamp: _clamp,
        T.__getitem__: _getitem, T.to: _to, T.float: lambda tr, x: _to(tr, x, torch.float32),
        T.__and__: _binary("logical_and", True), T.__rand__: _binary("logical_and", True),
        torch.logical_and: _binary("logical_and", True),
        T.__or__: _binary("logical_or", True), T.__ror__: _binary("logical_or", True),
        torch.logical_or: _binary("logical_or", True),
        T.__invert__: _logical_not, torch.logical_not: _logical_not,
    }
    for name, op in (("__eq__", "cmp_eq"), ("__ne__", "cmp_neq"), ("__gt__", "cmp_gt"),
                     ("__ge__", "cmp_ge"), ("__lt__", "cmp_lt"), ("__le__", "cmp_le")):
        table[getattr(T, name)] = _binary(op, True)
    for name, op in (("eq", "cmp_eq"), ("ne", "cmp_neq"), ("gt", "cmp_gt"), ("ge", "cmp_ge"),
                     ("lt", "cmp_lt"), ("le", "cmp_le")):
        table[getattr(torch, name)] = _binary(op, True)
    for name, op in (("tanh", "tanh"), ("exp", "exp"), ("log", "log"), ("sigmoid", "sigmoid"),
                     ("sqrt", "sqrt"), ("rsqrt", "rsqrt"), ("sin", "sin"), ("cos", "cos"),
                     ("tan", "tan"), ("erf", "erf"), ("floor", "floor"), ("ceil", "ceil"),
                     ("reciprocal", "reciprocal")):
        table[getattr(torch, name)] = _unary(op)
        table[getattr(T, name)] = _unary(op)
    return table


# Python operators on proxies go through the same table as torch functions.
for _dunder in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "pow", "rpow",
                "mod", "eq", "ne", "gt", "ge", "lt", "le", "and", "rand", "or", "ror", "neg",
                "abs", "invert"):
    def _method(self, *args, _f=getattr(torch.Tensor, f"__{_dunder}__")):
        return Proxy.__torch_function__(_f, (Proxy,), (self, *args))
    setattr(Proxy, f"__{_dunder}__", _method)
Proxy.__hash__ = object.__hash__

_TORCH_FUNCTIONS = _build_table()


# ---------------------------------------------------------------------------------------------
# From a torch-style function to a DSL score_mod


class TorchStyleScoreMod:
    """A torch-style score_mod (and/or mask_mod) as a DSL score_mod for the registry.

    Keyed by the function's structure (its code and the non-tensor values it captures, plus the
    dtype and rank of captured tensors): the captured tensors' values are runtime inputs."""

    def __init__(self, fn: Callable, key: Optional[Hashable], captured: list[torch.Tensor]):
        self.fn = fn
        self.key = key
        self.captured = captured
        self.views: dict[str, tuple] = {}

    def score_mod_graph_cache_key(self):
        return self.key

    def __call__(self, graph, score, tensors):
        trace = _Trace(graph, score, tensors, self.captured)
        args = [Proxy(trace, node=score)] + [Proxy(trace, axis=a) for a in range(4)]
        result = self.fn(*args)
        if not isinstance(result, Proxy):
            if isinstance(result, (int, float, torch.Tensor)):
                return graph.add(graph.mul(score, 0.0), _operand(trace, result, "the result"))
            raise TypeError(f"cudnn_flex: the torch-style score_mod returned {type(result).__name__}; "
                            "it must return the modified score")
        self.views = trace.views
        return result.node


class _LazyCaptureTensors(dict):
    """Tensors dict for the planning run: any capture view gets a small stand-in graph tensor."""

    def __init__(self, graph, base):
        super().__init__(base)
        self._graph = graph

    def __missing__(self, name):
        from .reference import RefTensor
        value = RefTensor(torch.zeros(1, 1, 1, 1), self._graph)
        self[name] = value
        return value


def plan_views(mod: TorchStyleScoreMod) -> dict[str, tuple]:
    """Runs mod once on a 1x1x1x1 reference graph to learn which captured tensors it indexes, and
    how (cheap; cached per structural key by the caller)."""
    from .reference import ReferenceGraph, RefTensor
    graph = ReferenceGraph((1, 1, 1, 1), torch.device("cpu"))
    mod(graph, RefTensor(torch.zeros(1, 1, 1, 1), graph), _LazyCaptureTensors(graph, {}))
    return mod.views


def view_for(t: torch.Tensor, axes: tuple[int, ...], full: tuple[int, int, int, int], name: str) -> torch.Tensor:
    """t indexed by the index variables `axes` as a tensor broadcastable to `full`: a view of t,
    except that integer and float64 tensors become float32 copies (the score_mod's arithmetic)."""
    if not axes:
        return t.reshape(())
    sizes, strides = [1, 1, 1, 1], [0, 0, 0, 0]
    for dim, axis in enumerate(axes):
        n = t.shape[dim]
        if n < full[axis]:
            raise ValueError(f"cudnn_flex: the captured tensor indexed as {name} has {n} entries "
                             f"along the {'batch head query key'.split()[axis]} axis, but the scores "
                             f"have {full[axis]}")
        sizes[axis], strides[axis] = full[axis], t.stride(dim)
    view = t.as_strided(sizes, strides, t.storage_offset())
    if view.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.float64):
        # The score_mod's arithmetic is float32 (integers are exact up to 2^24): a small copy.
        view = view.to(torch.float32)
    if view.is_cuda and view.data_ptr() % 16:
        view = view.clone()
    return view


def mask_to_score_mod(mask_mod: Callable, score_mod: Optional[Callable]) -> Callable:
    """One torch-style score_mod: score_mod's result where mask_mod holds, -inf elsewhere."""
    def masked(score, b, h, q_idx, kv_idx):
        value = score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)
        return torch.where(mask_mod(b, h, q_idx, kv_idx), value, float("-inf"))
    return masked


# structural key -> the capture views its function makes (learned once by plan_views)
_plans: dict[Hashable, dict[str, tuple]] = {}


def prepare(score_mod: Optional[Callable], mask_mod: Optional[Callable], score_mod_tensors,
            scores_shape: tuple[int, int, int, int]):
    """(DSL score_mod, score_mod_tensors) for what the user passed: torch-style score_mods and
    mask_mods become a TorchStyleScoreMod whose captured tensors are passed as views."""
    if mask_mod is not None:
        if not callable(mask_mod):
            raise TypeError(f"cudnn_flex: mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, "
                            f"got {type(mask_mod).__name__}")
        if _positional_count(mask_mod) not in (None, 4):
            raise TypeError("cudnn_flex: mask_mod must take (b, h, q_idx, kv_idx) as in "
                            "torch.nn.attention.flex_attention")
        if score_mod is not None and not is_torch_style(score_mod):
            raise TypeError("cudnn_flex: mask_mod combines with a torch-style score_mod(score, b, h, "
                            "q_idx, kv_idx) only; with a DSL score_mod, mask inside it with "
                            "graph.binary_select(score, float('-inf'), mask)")
        score_mod = mask_to_score_mod(mask_mod, score_mod)
    elif score_mod is None or not is_torch_style(score_mod):
        if score_mod is not None and _positional_count(score_mod) == 4:
            raise TypeError("cudnn_flex: score_mod takes 4 arguments, like a mask_mod(b, h, q_idx, "
                            "kv_idx); pass it as mask_mod=, or write score_mod(score, b, h, q_idx, kv_idx)")
        return score_mod, score_mod_tensors
    if score_mod_tensors:
        raise TypeError("cudnn_flex: a torch-style score_mod gets its tensors by capturing them "
                        "(closure, default argument or global), not through score_mod_tensors")
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            "cudnn_flex: torch-style score_mods and mask_mods do not run under torch.compile yet; "
            "write the score_mod in the graph DSL (graph, score, tensors) for compiled models")
    key, captured = captures(score_mod)
    mod = TorchStyleScoreMod(score_mod, key, captured)
    views = _plans.get(key) if key is not None else None
    if views is None:
        views = plan_views(mod)
        if key is not None:
            _plans[key] = views
    tensors = {name: view_for(captured[i], axes, scores_shape, name) for name, (i, axes) in views.items()}
    return mod, tensors
