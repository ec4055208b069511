"""Torch-style score_mods and mask_mods, as written for torch.nn.attention.flex_attention.

score_mod(score, b, h, q_idx, kv_idx) -> score and mask_mod(b, h, q_idx, kv_idx) -> bool run once
per call on proxy values that record the score_mod DSL into a program (cudnn_flex.program), with
torch's meaning of every operator: integer index arithmetic stays integer, `//` floors, `%` takes
the divisor's sign, `&`, `|`, `^`, `~`, `<<`, `>>` are bitwise on integers and logical on bools.
Tensors the function indexes by index variables (`slopes[h]`, `doc[q_idx]`, `bias[b, h, q_idx,
kv_idx]`) become input slots, found as the function touches them (no closure walking): each call
passes strided views of whatever tensors it touched, so new values never rebuild a graph and two
different tensors are never confused with one.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, Optional

import torch

from . import gather
from .program.record import SCORE, Recorder, Value, mod_slot

_AXES = "bhqk"  # index variable -> score axis: b 0, h 1, q_idx 2, kv_idx 3
# Integers are exact in the float32 arithmetic of the score_mod below this.
_EXACT_INT = 1 << 24


class UnsupportedConstruct(TypeError):
    """The torch-style score_mod used something that cannot become a cuDNN graph."""


def _unsupported(what: str) -> UnsupportedConstruct:
    return UnsupportedConstruct(f"cudnn_flex: a torch-style score_mod cannot use {what}")


# ---------------------------------------------------------------------------------------------
# Which functions are torch-style


def torch_score_mod(fn: Callable) -> Callable:
    """Marks fn as a torch-style score_mod(score, b, h, q_idx, kv_idx) (needed only when its
    signature does not show it, e.g. *args)."""
    try:
        fn._cudnn_flex_torch_style = True
        return fn
    except AttributeError:  # a bound method or builtin: mark a wrapper instead
        def wrapper(*args):
            return fn(*args)
        wrapper = functools.wraps(fn)(wrapper)
        wrapper._cudnn_flex_torch_style = True
        return wrapper


def positional_count(fn: Callable) -> Optional[int]:
    """How many positional arguments fn is called with (None with *args): its required positional
    parameters, or all of them when fewer than 3 are required (`lambda g, s, t, c=c:` is a DSL
    mod of 3; `def mod(score, b, h, q, kv, cap=cap)` a torch-style one of 5). Read from the code
    object when there is one, since this runs on every call."""
    func, bound = (fn.__func__, 1) if isinstance(fn, types.MethodType) else (fn, 0)
    if isinstance(func, types.FunctionType):
        code = func.__code__
        if code.co_flags & inspect.CO_VARARGS:
            return None
        required = code.co_argcount - len(func.__defaults__ or ()) - bound
        return required if required >= 3 else code.co_argcount - bound
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def is_torch_style(fn: Callable) -> bool:
    """score_mod(score, b, h, q_idx, kv_idx) rather than the DSL's (graph, score, tensors)."""
    return getattr(fn, "_cudnn_flex_torch_style", False) or positional_count(fn) == 5


# ---------------------------------------------------------------------------------------------
# The proxy values


class _Trace:
    """One recording of a torch-style function: the recorder and the tensors it touched."""

    def __init__(self, recorder: Recorder, gathers: bool = True):
        self.rec = recorder
        self.gathers = gathers  # False under torch.compile: a gather runs per call, outside the graph
        self.score = recorder.input(SCORE)
        self._index: dict[int, Value] = {}
        # (id(tensor), axes) -> slot; the tensors are held by `captures` for this call only
        self._slots: dict[tuple, int] = {}
        self.captures: list[tuple[torch.Tensor, tuple[int, ...]]] = []

    def index(self, axis: int) -> Value:
        if axis not in self._index:
            self._index[axis] = self.rec.gen_index(self.score, axis)
        return self._index[axis]

    def capture(self, t: torch.Tensor, axes: tuple[int, ...]) -> "Proxy":
        key = (id(t), axes)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = len(self.captures)
            self.captures.append((t, axes))
        kind = _kind_of_dtype(t.dtype)
        value = self.rec.input(mod_slot(slot), kind)
        if t.dtype == torch.bool:
            value = self.rec.cmp_neq(value, 0.0)  # passed as float32 (see view_for)
        return Proxy(self, value, kind=kind, is_input=True)


def _kind_of_dtype(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


class Proxy:
    """A value of the score_mod: an index variable (axis) or a recorded value, with the kind of
    torch value it stands for ('int', 'bool' or 'float'), which decides what operators mean."""

    __slots__ = ("trace", "axis", "_value", "kind", "is_input", "const")

    def __init__(self, trace: _Trace, value: Optional[Value] = None, axis: Optional[int] = None,
                 kind: str = "float", is_input: bool = False, const=None):
        self.trace, self._value, self.axis, self.kind = trace, value, axis, kind
        self.is_input = is_input  # a captured tensor as it enters the program
        self.const = const  # a scalar made inside the mod (x.new_ones(())): a Python number

    @property
    def value(self) -> Value:
        if self._value is None:
            if self.const is not None:  # a constant where a graph value is needed: 0 * score + c
                rec = self.trace.rec
                self._value = rec.add(rec.mul(self.trace.score, 0.0), float(self.const))
            else:
                self._value = self.trace.index(self.axis)
        return self._value

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

    def item(self):
        raise _unsupported(".item() of a traced value (its value differs at every score)")

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        trace = next(a.trace for a in _flat(args, kwargs) if isinstance(a, Proxy))
        handler = _TORCH_FUNCTIONS.get(func)
        if handler is None:
            name = getattr(func, "__name__", None) or repr(func)
            raise _unsupported(f"torch function {name}")
        return handler(trace, *args, **kwargs)

    def __getattr__(self, name: str):
        # Tensor methods (x.abs(), x.clamp(min=0), x.exp(), x.to(...)) as their torch functions.
        method = getattr(torch.Tensor, name, None)
        handler = _TORCH_FUNCTIONS.get(method) if method is not None else None
        if handler is None:
            raise _unsupported(f"the tensor method or attribute .{name}")
        return lambda *args, **kwargs: handler(self.trace, self, *args, **kwargs)

    def __getitem__(self, item):
        raise _unsupported("indexing a traced value (index captured tensors with index variables instead)")

    @property
    def dtype(self) -> torch.dtype:
        return {"bool": torch.bool, "int": torch.int32}.get(self.kind, torch.float32)

    @property
    def device(self) -> torch.device:
        return torch.device("meta")  # read only to make tensors inside the mod (new_ones(device=))

    # x.new_ones(()) and friends: the constants torch's and_masks / or_masks / noop_mask start from.
    def new_ones(self, size=(), dtype=None, **kwargs):
        return _new_constant(size, 1, dtype, self)

    def new_zeros(self, size=(), dtype=None, **kwargs):
        return _new_constant(size, 0, dtype, self)

    def new_full(self, size, fill_value, dtype=None, **kwargs):
        return _new_constant(size, fill_value, dtype, self)


def _new_constant(size, value, dtype, like: "Proxy") -> "Proxy":
    """A scalar made inside the mod: a constant proxy, folded where it is used."""
    if tuple(size) not in ((), (1,)):
        raise _unsupported(f"a tensor of shape {tuple(size)} made inside the mod; capture it instead")
    kind = _kind_of_dtype(dtype) if dtype is not None else ("int" if like.kind != "float" else "float")
    const = bool(value) if kind == "bool" else (int(value) if kind == "int" else float(value))
    return Proxy(like.trace, kind=kind, const=const)


def _constant(x):
    """The Python value of x if it is a constant (a number or a constant proxy), else None."""
    if isinstance(x, Proxy):
        return x.const
    return x if isinstance(x, (bool, int, float)) else None


def _flat(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _kind(x) -> str:
    if isinstance(x, Proxy):
        return x.kind
    if isinstance(x, bool):
        return "bool"
    if isinstance(x, int):
        return "int"
    if isinstance(x, torch.Tensor):
        return _kind_of_dtype(x.dtype)
    return "float"


def _promote(*xs) -> str:
    kinds = [_kind(x) for x in xs]
    if "float" in kinds:
        return "float"
    return "int" if "int" in kinds else "bool"


def _operand(trace: _Trace, x, what: str):
    """A graph operand for x: a recorded value, or a Python number as a constant."""
    if isinstance(x, Proxy):
        return x.value if x.const is None else float(x.const)
    if isinstance(x, (bool, int, float)):
        return float(x)
    if isinstance(x, torch.Tensor):
        if x.numel() == 1 and x.dim() <= 1:
            return trace.capture(x, ()).value
        raise _unsupported(f"a captured tensor of shape {tuple(x.shape)} without indexing it by "
                           "index variables (b, h, q_idx, kv_idx) in " + what)
    raise _unsupported(f"a {type(x).__name__} in {what}")


def _mask(trace: _Trace, x, what: str):
    """x as a boolean graph value (torch.where's condition: nonzero is true)."""
    node = _operand(trace, x, what)
    if _kind(x) == "bool" or not isinstance(node, Value):
        return node
    return trace.rec.cmp_neq(node, 0.0)


def _p(trace: _Trace, value: Value, kind: str) -> Proxy:
    return Proxy(trace, value, kind=kind)


# Ops whose operands may be swapped (to the mirrored op): cuDNN refuses an op whose first input
# is a constant or a score_mod tensor (the bridge then lifts it with an extra add), so a computed
# value goes first where it can.
_SWAPPED = {"add": "add", "mul": "mul", "max": "max", "min": "min", "cmp_eq": "cmp_eq",
            "cmp_neq": "cmp_neq", "cmp_gt": "cmp_lt", "cmp_lt": "cmp_gt", "cmp_ge": "cmp_le",
            "cmp_le": "cmp_ge"}


def _computed(x) -> bool:
    return isinstance(x, Proxy) and not x.is_input and x.const is None


def _emit(trace: _Trace, op: str, a, b) -> Value:
    if op in _SWAPPED and not _computed(a) and _computed(b):
        a, b, op = b, a, _SWAPPED[op]
    return getattr(trace.rec, op)(_operand(trace, a, op), _operand(trace, b, op))


def _no_kwargs(op: str, kwargs: dict) -> None:
    if kwargs:
        raise _unsupported(f"keyword arguments {sorted(kwargs)} of {op}")


def _arith(op: str):
    def handler(trace, a, b, **kwargs):
        _no_kwargs(op, kwargs)
        return _p(trace, _emit(trace, op, a, b), _promote(a, b) if op != "div" else "float")
    return handler


def _compare(op: str):
    def handler(trace, a, b, **kwargs):
        _no_kwargs(op, kwargs)
        return _p(trace, _emit(trace, op, a, b), "bool")
    return handler


def _reversed(handler):
    return lambda trace, a, b, **kw: handler(trace, b, a, **kw)


def _float_unary(op: str):
    def handler(trace, x, **kwargs):
        _no_kwargs(op, kwargs)
        return _p(trace, getattr(trace.rec, op)(_operand(trace, x, op)), "float")
    return handler


def _same_kind_unary(op: str):
    def handler(trace, x, **kwargs):
        _no_kwargs(op, kwargs)
        return _p(trace, getattr(trace.rec, op)(_operand(trace, x, op)), _kind(x))
    return handler


def _remainder(trace, a, b, **kwargs):
    """torch's `%` / torch.remainder: the sign of the divisor (Python's modulo). cuDNN's MOD is
    C fmod (the sign of the dividend); fmod(fmod(a, b) + b, b) is exact and has b's sign."""
    _no_kwargs("%", kwargs)
    rec = trace.rec
    r = rec.mod(rec.add(_emit(trace, "mod", a, b), _operand(trace, b, "%")), _operand(trace, b, "%"))
    return _p(trace, r, _promote(a, b))


def _fmod(trace, a, b, **kwargs):
    _no_kwargs("fmod", kwargs)
    return _p(trace, _emit(trace, "mod", a, b), _promote(a, b))


def _floor_divide(trace, a, b, **kwargs):
    """torch's `//`: floor(a / b). For integers (a - a % b) / b is an exact integer up to the
    division's rounding, and rounding it (floor(x + 0.5)) gives it exactly."""
    _no_kwargs("//", kwargs)
    rec = trace.rec
    kind = _promote(a, b)
    if kind == "float":
        return _p(trace, rec.floor(_emit(trace, "div", a, b)), "float")
    rem = _remainder(trace, a, b).value
    exact = rec.div(rec.sub(_operand(trace, a, "//"), rem), _operand(trace, b, "//"))
    return _p(trace, rec.floor(rec.add(exact, 0.5)), "int")


def _pow(trace, a, b, **kwargs):
    _no_kwargs("pow", kwargs)
    return _p(trace, _emit(trace, "pow", a, b), _promote(a, b))


def _true_divide(trace, a, b, **kwargs):
    _no_kwargs("/", kwargs)
    return _p(trace, _emit(trace, "div", a, b), "float")


# -- bitwise and logical --------------------------------------------------------------------------

def _int_constant(x) -> Optional[int]:
    if isinstance(x, bool) or not isinstance(x, int):
        return None
    return x


def _bits_and(trace, x, c: int) -> Value:
    """x & c for an integer value x and a constant c >= 0, in float arithmetic: c = 2^k - 1 is
    x mod 2^k (Python modulo, right for negative x in two's complement); otherwise the sum over
    c's set bits i of 2^i * (floor(x / 2^i) mod 2)."""
    rec = trace.rec
    xv = _operand(trace, x, "&")

    def floor_mod(v, m):
        return rec.mod(rec.add(rec.mod(v, float(m)), float(m)), float(m))
    if c == 0:
        return rec.mul(xv, 0.0)
    if c & (c + 1) == 0:
        return floor_mod(xv, c + 1)
    total = None
    for i in range(c.bit_length()):
        if c >> i & 1:
            shifted = rec.floor(rec.mul(xv, 1.0 / (1 << i))) if i else xv
            bit = floor_mod(shifted, 2)
            term = rec.mul(bit, float(1 << i)) if i else bit
            total = term if total is None else rec.add(total, term)
    return total


def _bitwise(op: str):
    """&, |, ^ with torch's meaning: logical on bools, bitwise on integers."""
    def handler(trace, a, b, **kwargs):
        _no_kwargs(op, kwargs)
        kinds = {_kind(a), _kind(b)}
        rec = trace.rec
        if "float" in kinds:
            raise _unsupported(f"{op} on a floating-point value (torch refuses it too)")
        if kinds == {"bool"}:
            ca, cb = _constant(a), _constant(b)
            if ca is not None or cb is not None:  # torch's and_masks start from new_ones(())
                const, other = (ca, b) if ca is not None else (cb, a)
                if _constant(other) is not None:
                    folded = {"&": const and _constant(other), "|": const or _constant(other),
                              "^": const != _constant(other)}[op]
                    return Proxy(trace, kind="bool", const=bool(folded))
                if op == "&":
                    return other if const else Proxy(trace, kind="bool", const=False)
                if op == "|":
                    return Proxy(trace, kind="bool", const=True) if const else other
                return _invert(trace, other) if const else other
            ma, mb = _mask(trace, a, op), _mask(trace, b, op)
            if op == "&":
                return _p(trace, rec.logical_and(ma, mb), "bool")
            if op == "|":
                return _p(trace, rec.logical_or(ma, mb), "bool")
            return _p(trace, rec.cmp_neq(rec.binary_select(1.0, 0.0, ma), rec.binary_select(1.0, 0.0, mb)), "bool")
        # Integers: one side must be a constant (cuDNN has no bitwise ops; a constant's bits
        # unroll into a few float ops).
        c, x = _int_constant(b), a
        if c is None:
            c, x = _int_constant(a), b
        if c is None or not isinstance(x, Proxy):
            raise _unsupported(f"{op} between two computed integer values (only with a constant, "
                               "e.g. (kv_idx & 3) or (q_idx | 1))")
        if abs(c) >= _EXACT_INT:
            raise _unsupported(f"{op} with a constant beyond 2^24 (float32 arithmetic is exact below it)")
        xv = _operand(trace, x, op)
        if c < 0:  # x & c = x - (x & ~c), ~c >= 0
            both = rec.sub(xv, _bits_and(trace, x, ~c))
        else:
            both = _bits_and(trace, x, c)
        if op == "&":
            return _p(trace, both, "int")
        if op == "|":  # x | c = x + c - (x & c)
            return _p(trace, rec.sub(rec.add(xv, float(c)), both), "int")
        return _p(trace, rec.sub(rec.add(xv, float(c)), rec.mul(both, 2.0)), "int")  # x ^ c
    return handler


def _invert(trace, x, **kwargs):
    """~: logical not of a bool, -x - 1 of an integer (two's complement)."""
    if _kind(x) == "bool":
        return _p(trace, trace.rec.logical_not(_mask(trace, x, "~")), "bool")
    if _kind(x) == "float":
        raise _unsupported("~ on a floating-point value (torch refuses it too)")
    return _p(trace, trace.rec.sub(trace.rec.neg(_operand(trace, x, "~")), 1.0), "int")


def _shift(left: bool):
    op = "<<" if left else ">>"

    def handler(trace, x, n, **kwargs):
        _no_kwargs(op, kwargs)
        c = _int_constant(n)
        if c is None or c < 0 or _kind(x) != "int":
            raise _unsupported(f"{op} other than an integer value shifted by a constant >= 0")
        xv = _operand(trace, x, op)
        if left:
            return _p(trace, trace.rec.mul(xv, float(1 << c)), "int")
        return _p(trace, trace.rec.floor(trace.rec.mul(xv, 1.0 / (1 << c))), "int")
    return handler


def _logical(op: str):
    def handler(trace, a, b, **kwargs):
        _no_kwargs(op, kwargs)
        return _p(trace, getattr(trace.rec, op)(_mask(trace, a, op), _mask(trace, b, op)), "bool")
    return handler


def _logical_not(trace, x, **kwargs):
    return _p(trace, trace.rec.logical_not(_mask(trace, x, "logical_not")), "bool")


def _where(trace, cond, a, b):
    if _constant(cond) is not None:
        return a if _constant(cond) else b
    mask = _mask(trace, cond, "torch.where")
    return _p(trace, trace.rec.binary_select(_operand(trace, a, "torch.where"),
                                             _operand(trace, b, "torch.where"), mask), _promote(a, b))


def _clamp(trace, x, min=None, max=None):
    out = _operand(trace, x, "clamp")
    if min is not None:
        out = trace.rec.max(out, _operand(trace, min, "clamp"))
    if max is not None:
        out = trace.rec.min(out, _operand(trace, max, "clamp"))
    if not isinstance(out, Value):
        raise _unsupported("clamp of a constant")
    return _p(trace, out, _promote(*(v for v in (x, min, max) if v is not None)))


def _minmax(op: str):
    def handler(trace, a, b, **kwargs):
        _no_kwargs(op, kwargs)
        return _p(trace, _emit(trace, op, a, b), _promote(a, b))
    return handler


def _to(trace, x, *args, **kwargs):
    dtype = kwargs.pop("dtype", None)
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None:
        return x  # a device move: the value stays where it is
    rec = trace.rec
    node = _operand(trace, x, ".to")
    if dtype == torch.bool:
        return _p(trace, rec.cmp_neq(node, 0.0), "bool")
    if dtype.is_floating_point:
        # Arithmetic in the graph is float32; casting to a float type keeps the value.
        if isinstance(x, Proxy) and x.kind == "float":
            return x
        if isinstance(x, Proxy) and x.kind == "int" and x.axis is None:
            return _p(trace, node, "float")  # computed integers are float32 values already
        return _p(trace, rec.binary_select(1.0, 0.0, node) if _kind(x) == "bool" else rec.identity(node), "float")
    if dtype in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        if _kind(x) == "int":
            return x
        if _kind(x) == "bool":
            return _p(trace, rec.binary_select(1.0, 0.0, node), "int")
        # torch truncates toward zero
        return _p(trace, rec.binary_select(rec.floor(node), rec.ceil(node), rec.cmp_ge(node, 0.0)), "int")
    raise _unsupported(f".to({dtype})")


def _getitem(trace, t, index):
    """captured_tensor[index variables...] -> an input slot (a strided view of t); indexed by
    values computed from the index variables and captured tensors, a gather done ahead of the
    kernel (gather.py)."""
    if not isinstance(t, torch.Tensor):
        raise _unsupported("indexing a traced value")
    index = index if isinstance(index, tuple) else (index,)
    if len(index) != t.dim():
        raise _unsupported(f"a captured tensor of {t.dim()} dims indexed by {len(index)} values; "
                           "index every dim")
    if all(isinstance(i, Proxy) and i.axis is not None for i in index):
        axes = tuple(i.axis for i in index)
        if len(set(axes)) != len(axes):
            raise _unsupported("a captured tensor indexed twice by the same index variable")
        return trace.capture(t, axes)
    entries = []
    for i in index:
        if isinstance(i, Proxy) and i.axis is not None:
            entries.append(("axis", i.axis))
        elif isinstance(i, Proxy):
            if i.kind == "float" or gather.reads_score(trace.rec.nodes, i.value.index):
                raise _unsupported("a captured tensor indexed by a value computed from the score or "
                                   "by a float; index by integers computed from b, h, q_idx, kv_idx "
                                   "and captured tensors")
            entries.append(("node", i.value.index))
        elif isinstance(i, int) and not isinstance(i, bool):
            entries.append(("int", i))
        else:
            raise _unsupported(f"a captured tensor indexed by a {type(i).__name__} (a slice?)")
    if not trace.gathers:
        raise _unsupported("a gather by a computed index under torch.compile (it would run outside the "
                           "compiled graph); gather ahead of the call, e.g. rel = table[q_ids[:, None] - "
                           "kv_ids[None, :]], and index the result by q_idx, kv_idx")
    gathered = gather.gather(t, entries, trace.rec.nodes, trace.captures, trace.rec.shape, view_for)
    return trace.capture(gathered, None)


def _build_table():
    T = torch.Tensor
    F = torch.nn.functional
    add, sub, mul = _arith("add"), _arith("sub"), _arith("mul")
    table = {
        # Commutative ops keep the traced value first: cuDNN refuses a constant as first input.
        T.__add__: add, T.__radd__: add, torch.add: add, T.add: add,
        T.__sub__: sub, T.__rsub__: _reversed(sub), torch.sub: sub, T.sub: sub,
        T.__mul__: mul, T.__rmul__: mul, torch.mul: mul, T.mul: mul,
        T.__truediv__: _true_divide, T.__rtruediv__: _reversed(_true_divide), torch.div: _true_divide,
        torch.true_divide: _true_divide, T.div: _true_divide,
        T.__floordiv__: _floor_divide, T.__rfloordiv__: _reversed(_floor_divide),
        torch.floor_divide: _floor_divide,
        T.__pow__: _pow, T.__rpow__: _reversed(_pow), torch.pow: _pow, T.pow: _pow,
        T.__mod__: _remainder, T.__rmod__: _reversed(_remainder), torch.remainder: _remainder,
        torch.fmod: _fmod, T.fmod: _fmod, T.remainder: _remainder,
        torch.maximum: _minmax("max"), torch.minimum: _minmax("min"),
        T.maximum: _minmax("max"), T.minimum: _minmax("min"),
        T.__neg__: _same_kind_unary("neg"), torch.neg: _same_kind_unary("neg"), T.neg: _same_kind_unary("neg"),
        T.__abs__: _same_kind_unary("abs"), torch.abs: _same_kind_unary("abs"), T.abs: _same_kind_unary("abs"),
        torch.where: _where, torch.clamp: _clamp, T.clamp: _clamp,
        T.__getitem__: _getitem, T.to: _to, T.float: lambda tr, x: _to(tr, x, torch.float32),
        T.int: lambda tr, x: _to(tr, x, torch.int32), T.long: lambda tr, x: _to(tr, x, torch.int64),
        T.bool: lambda tr, x: _to(tr, x, torch.bool),
        T.__and__: _bitwise("&"), T.__rand__: _bitwise("&"), torch.bitwise_and: _bitwise("&"),
        T.__or__: _bitwise("|"), T.__ror__: _bitwise("|"), torch.bitwise_or: _bitwise("|"),
        T.__xor__: _bitwise("^"), T.__rxor__: _bitwise("^"), torch.bitwise_xor: _bitwise("^"),
        T.__invert__: _invert, torch.bitwise_not: _invert,
        T.__lshift__: _shift(True), T.__rshift__: _shift(False),
        torch.logical_and: _logical("logical_and"), torch.logical_or: _logical("logical_or"),
        torch.logical_not: _logical_not, T.logical_not: _logical_not,
        torch.exp2: lambda tr, x: _p(tr, tr.rec.pow(2.0, _operand(tr, x, "exp2")), "float"),
        F.relu: _float_unary("relu"), torch.relu: _float_unary("relu"), F.gelu: _float_unary("gelu"),
        F.silu: _float_unary("swish"), F.softplus: _float_unary("softplus"), F.elu: _float_unary("elu"),
    }
    for name, op in (("__eq__", "cmp_eq"), ("__ne__", "cmp_neq"), ("__gt__", "cmp_gt"),
                     ("__ge__", "cmp_ge"), ("__lt__", "cmp_lt"), ("__le__", "cmp_le")):
        table[getattr(T, name)] = _compare(op)
    for name, op in (("eq", "cmp_eq"), ("ne", "cmp_neq"), ("gt", "cmp_gt"), ("ge", "cmp_ge"),
                     ("lt", "cmp_lt"), ("le", "cmp_le")):
        table[getattr(torch, name)] = _compare(op)
        table[getattr(T, name)] = _compare(op)
    for name in ("tanh", "exp", "log", "sigmoid", "sqrt", "rsqrt", "sin", "cos", "tan", "erf", "reciprocal"):
        table[getattr(torch, name)] = _float_unary(name)
        table[getattr(T, name)] = _float_unary(name)
    for name in ("floor", "ceil"):
        table[getattr(torch, name)] = _same_kind_unary(name)
        table[getattr(T, name)] = _same_kind_unary(name)
    return table


# Python operators on proxies go through the same table as torch functions.
for _dunder in ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "floordiv",
                "rfloordiv", "pow", "rpow", "mod", "rmod", "eq", "ne", "gt", "ge", "lt", "le", "and",
                "rand", "or", "ror", "xor", "rxor", "lshift", "rshift", "neg", "abs", "invert"):
    def _method(self, *args, _f=getattr(torch.Tensor, f"__{_dunder}__")):
        return Proxy.__torch_function__(_f, (Proxy,), (self, *args))
    setattr(Proxy, f"__{_dunder}__", _method)
Proxy.__hash__ = object.__hash__

_TORCH_FUNCTIONS = _build_table()


# ---------------------------------------------------------------------------------------------
# From a torch-style function to a program


def mask_to_score_mod(mask_mod: Callable, score_mod: Optional[Callable]) -> Callable:
    """One torch-style score_mod: score_mod's result where mask_mod holds, -inf elsewhere."""
    def masked(score, b, h, q_idx, kv_idx):
        value = score if score_mod is None else score_mod(score, b, h, q_idx, kv_idx)
        keep = mask_mod(b, h, q_idx, kv_idx)
        const = _constant(keep)
        if const is not None:  # a constant mask (torch's noop_mask, and_masks of nothing)
            return value if const else value * 0.0 + float("-inf")
        return torch.where(keep, value, float("-inf"))
    return masked


def trace(fn: Callable, recorder: Recorder, gathers: bool = True) -> tuple[int, list[tuple[torch.Tensor, tuple[int, ...]]]]:
    """Records torch-style fn; returns (its result node, the (tensor, axes) of each input slot).
    gathers=False refuses computed-index gathers (under torch.compile)."""
    tr = _Trace(recorder, gathers)
    args = [Proxy(tr, tr.score)] + [Proxy(tr, axis=a, kind="int") for a in range(4)]
    result = fn(*args)
    if isinstance(result, Proxy) and result.const is not None:
        result = result.const
    if isinstance(result, Proxy):
        value = result.value
        if result.kind == "bool":  # a mask_mod passed as score_mod: keep the bool as 0/1
            value = recorder.binary_select(1.0, 0.0, value)
    elif isinstance(result, (bool, int, float)) or isinstance(result, torch.Tensor):
        # A constant score: constant + 0 * score keeps the program on the score's shape.
        value = recorder.add(recorder.mul(tr.score, 0.0), _operand(tr, result, "the result"))
    else:
        raise TypeError(f"cudnn_flex: the torch-style score_mod returned {type(result).__name__}; "
                        "it must return the modified score")
    return value.index, tr.captures


# The dtypes of captured tensors that view_for copies to float32. int32 tensors indexed by the
# index variables are read in place (no copy per call for document ids): cuDNN converts them to
# float32 as the copy did (ids 2**31 - 1000 and 2**31 - 999 compared equal on the H200, cuDNN
# 9.19); an int32 scalar (passed by value) or gather result is still copied, as before (not
# measured as INT32). int64 ones are copied: a view of their low words would wrap values beyond
# int32's range (an int64 max as "no limit" would become -1), where float32 keeps their order,
# and cuDNN 9.19 never finished a graph over an INT64 input.
COPIED_DTYPES = (torch.bool, torch.int64, torch.int16, torch.int8, torch.uint8, torch.float64)


def view_for(t: torch.Tensor, axes: tuple[int, ...], full: tuple[int, int, int, int], name: str) -> torch.Tensor:
    """t indexed by the index variables `axes` as a tensor broadcastable to `full`: a view of t,
    except that bool, int8, int16, int64, uint8 and float64 tensors (and int32 ones indexed by
    no index variable) become float32 copies of the view (the score_mod's arithmetic; small,
    since broadcast dims stay size 1)."""
    if axes is None:  # already broadcastable to full (a gather's result)
        view = t
    elif not axes:
        view = t.reshape(())
    else:
        sizes, strides = [1, 1, 1, 1], [0, 0, 0, 0]
        for dim, axis in enumerate(axes):
            n = t.shape[dim]
            if n < full[axis]:
                raise ValueError(f"cudnn_flex: the captured tensor indexed as {name} has {n} entries "
                                 f"along the {'batch head query key'.split()[axis]} axis, but the scores "
                                 f"have {full[axis]}")
            sizes[axis], strides[axis] = full[axis], t.stride(dim)
        if torch.compiler.is_compiling():
            view = _view_by_axes(t, axes, full)  # dynamo traces no storage_offset()
        else:
            view = t.as_strided(sizes, strides, t.storage_offset())
    if view.dtype in COPIED_DTYPES or (view.dtype == torch.int32 and not axes):
        # cuDNN 9.19 crashes on BOOLEAN inputs (SIGFPE) and reads uint8 rows of odd length at
        # misaligned addresses: float32, as the score_mod computes anyway.
        view = view.to(torch.float32)
    if view.is_cuda and not torch.compiler.is_compiling() and view.data_ptr() % 16:
        view = view.clone()
    return view


def _view_by_axes(t: torch.Tensor, axes: tuple[int, ...], full: tuple) -> torch.Tensor:
    """view_for's view built from narrow, permute and unsqueeze (the same elements and strides on
    the indexed axes), for traced code."""
    for dim, axis in enumerate(axes):
        t = t.narrow(dim, 0, full[axis])
    t = t.permute(sorted(range(len(axes)), key=lambda d: axes[d]))
    for axis in range(4):
        if axis not in axes:
            t = t.unsqueeze(axis)
    return t


def check_mask_mod(mask_mod: Callable, score_mod: Optional[Callable]) -> None:
    if not callable(mask_mod):
        raise TypeError(f"cudnn_flex: mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool, "
                        f"got {type(mask_mod).__name__}")
    if positional_count(mask_mod) not in (None, 4):
        raise TypeError("cudnn_flex: mask_mod must take (b, h, q_idx, kv_idx) as in "
                        "torch.nn.attention.flex_attention")
    if score_mod is not None and not is_torch_style(score_mod):
        raise TypeError("cudnn_flex: mask_mod combines with a torch-style score_mod(score, b, h, "
                        "q_idx, kv_idx) only; with a DSL score_mod, mask inside it with "
                        "graph.binary_select(score, float('-inf'), mask)")
