"""The one table of score_mod DSL ops: names, inputs, attributes, value on torch, and derivative.

Everything that reads a recorded program reads this table: the recorder (which methods a graph
has and how their arguments are named), the reference evaluator (what each op computes), the
derivative (how a gradient flows back through each op) and the cuDNN lowering (the C++ bridge
binds a method of the same name and signature for every entry; a test checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# What an op produces, which decides its default output data type (as the bridge does).
ARITH, INDEX, COMPARE, LOGICAL, SELECT = "arith", "index", "compare", "logical", "select"


@dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]          # positional graph inputs, in order
    kind: str = ARITH
    attrs: tuple[str, ...] = ()      # optional keyword numbers (relu slope, swish beta, axis)
    value: Optional[Callable] = None  # torch implementation: value(*inputs, **attrs)
    # derivative: rule(emit, g, inputs, out, attrs) -> one thunk (or None) per input; see autodiff
    grad: Optional[Callable] = None
    # True when the output carries no gradient (masks, indices, piecewise constants)
    constant_output: bool = False


def _gelu(x):
    return torch.nn.functional.gelu(x)


def _gelu_grad(x):
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_tanh_grad(x):
    k = math.sqrt(2.0 / math.pi)
    t = torch.tanh(k * (x + 0.044715 * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)


def _relu(x, negative_slope=None, lower_clip=None, upper_clip=None):
    lo = 0.0 if lower_clip is None else lower_clip
    slope = 0.0 if negative_slope is None else negative_slope
    y = torch.where(x > lo, x, lo + slope * (x - lo))
    return y if upper_clip is None else torch.clamp(y, max=upper_clip)


def _relu_grad(x, negative_slope=None, lower_clip=None, upper_clip=None):
    lo = 0.0 if lower_clip is None else lower_clip
    slope = 0.0 if negative_slope is None else negative_slope
    g = torch.where(x > lo, torch.ones_like(x), torch.full_like(x, slope))
    return g if upper_clip is None else torch.where(x < upper_clip, g, torch.zeros_like(x))


def _swish(x, swish_beta=None):
    b = 1.0 if swish_beta is None else swish_beta
    return x * torch.sigmoid(b * x)


def _swish_grad(x, swish_beta=None):
    b = 1.0 if swish_beta is None else swish_beta
    s = torch.sigmoid(b * x)
    return s + b * x * s * (1 - s)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# -- derivative rules ---------------------------------------------------------------------------
# Each returns one thunk per input giving that input's gradient from g (the output's gradient).
# Thunks, so that only the gradients of inputs that depend on the score are emitted (cuDNN gets
# wrong dV when a graph holds unused ops). `a`, `b` are the op's inputs (graph values or numbers),
# `out` its output.

def _g(emit, g, ins, out, attrs):
    return tuple((lambda: g) for _ in ins)


def _sub(emit, g, ins, out, attrs):
    return (lambda: g, lambda: emit.neg(g))


def _mul(emit, g, ins, out, attrs):
    a, b = ins
    return (lambda: emit.mul(g, b), lambda: emit.mul(g, a))


def _div(emit, g, ins, out, attrs):
    a, b = ins
    return (lambda: emit.div(g, b), lambda: emit.neg(emit.div(emit.mul(g, out), b)))


def _add_square(emit, g, ins, out, attrs):
    return (lambda: g, lambda: emit.mul(emit.mul(g, ins[1]), 2.0))


def _max(emit, g, ins, out, attrs):
    a, b = ins
    # Ties send the gradient to the first input, as torch.maximum's subgradient choice does not
    # matter for attention (a measure-zero set); both inputs never get it twice.
    return (lambda: emit.binary_select(g, 0.0, emit.cmp_ge(a, b)),
            lambda: emit.binary_select(0.0, g, emit.cmp_ge(a, b)))


def _min(emit, g, ins, out, attrs):
    a, b = ins
    return (lambda: emit.binary_select(g, 0.0, emit.cmp_le(a, b)),
            lambda: emit.binary_select(0.0, g, emit.cmp_le(a, b)))


def _mod(emit, g, ins, out, attrs):
    return (lambda: g, None)  # d fmod(a, b)/da = 1; no rule for a score-dependent divisor


def _pow(emit, g, ins, out, attrs):
    a, b = ins
    b_minus_1 = b - 1.0 if _is_number(b) else emit.sub(b, 1.0)
    return (lambda: emit.mul(emit.mul(g, b), emit.pow(a, b_minus_1)),
            lambda: emit.mul(emit.mul(g, out), emit.log(a)))


def _unary(fn):
    def rule(emit, g, ins, out, attrs):
        return (lambda: fn(emit, g, ins[0], out, attrs),)
    return rule


def _select(emit, g, ins, out, attrs):
    x0, x1, mask = ins

    def branch(other, keep_first):
        if _is_number(other) and other == float("-inf"):
            # Where the other side is -inf the probability is exactly 0 (also in a fully masked
            # row, which cuDNN and the reference both give out = 0), so dP passes as is. A finite
            # fill (torch.finfo(dtype).min) is no such mask: its rows can be uniform, and the
            # gradient at masked positions is 0, so it gets the select below.
            return lambda: g
        return (lambda: emit.binary_select(g, 0.0, mask)) if keep_first else \
            (lambda: emit.binary_select(0.0, g, mask))
    return (branch(x1, True), branch(x0, False), None)


def _backward_op(name):
    """Rule of an activation whose derivative is the matching *_backward op (with its attrs)."""
    return _unary(lambda emit, g, a, out, attrs: getattr(emit, name)(g, a, **attrs))


_ERF_K = 2.0 / math.sqrt(math.pi)

OPS: dict[str, OpSpec] = {}


def _op(name, inputs, kind=ARITH, attrs=(), value=None, grad=None, constant_output=False):
    OPS[name] = OpSpec(name, tuple(inputs), kind, tuple(attrs), value, grad, constant_output)


for _name, _fn, _rule in (("add", torch.add, _g), ("sub", torch.sub, _sub), ("mul", torch.mul, _mul),
                          ("div", torch.div, _div),
                          ("add_square", lambda a, b: a + b * b, _add_square)):
    _op(_name, ("a", "b"), value=_fn, grad=_rule)
_op("bias", ("input", "bias"), value=torch.add, grad=_g)
_op("scale", ("input", "scale"), value=torch.mul, grad=_mul)
_op("max", ("input0", "input1"), value=torch.maximum, grad=_max)
_op("min", ("input0", "input1"), value=torch.minimum, grad=_min)
# cuDNN's MOD is C fmod (the sign of the dividend); torch's `%` is lowered with two of them.
_op("mod", ("input0", "input1"), value=torch.fmod, grad=_mod)
_op("pow", ("input0", "input1"), value=torch.pow, grad=_pow)

_UNARY = {
    "sqrt": (torch.sqrt, lambda e, g, a, out, at: e.div(e.mul(g, 0.5), out)),
    "tanh": (torch.tanh, lambda e, g, a, out, at: e.tanh_backward(g, a)),
    "elu": (torch.nn.functional.elu, lambda e, g, a, out, at: e.elu_backward(g, a)),
    "gelu": (_gelu, lambda e, g, a, out, at: e.gelu_backward(g, a)),
    "sigmoid": (torch.sigmoid, lambda e, g, a, out, at: e.sigmoid_backward(g, a)),
    "softplus": (torch.nn.functional.softplus, lambda e, g, a, out, at: e.softplus_backward(g, a)),
    "gelu_approx_tanh": (_gelu_tanh, lambda e, g, a, out, at: e.gelu_approx_tanh_backward(g, a)),
    "erf": (torch.erf, lambda e, g, a, out, at: e.mul(g, e.mul(e.exp(e.neg(e.mul(a, a))), _ERF_K))),
    "identity": (lambda x: x, lambda e, g, a, out, at: g),
    "exp": (torch.exp, lambda e, g, a, out, at: e.mul(g, out)),
    "log": (torch.log, lambda e, g, a, out, at: e.div(g, a)),
    "neg": (torch.neg, lambda e, g, a, out, at: e.neg(g)),
    "abs": (torch.abs, lambda e, g, a, out, at: e.binary_select(g, e.neg(g), e.cmp_ge(a, 0.0))),
    "rsqrt": (torch.rsqrt, lambda e, g, a, out, at: e.mul(e.div(e.mul(g, out), a), -0.5)),
    "reciprocal": (torch.reciprocal, lambda e, g, a, out, at: e.neg(e.mul(g, e.mul(out, out)))),
    "sin": (torch.sin, lambda e, g, a, out, at: e.mul(g, e.cos(a))),
    "cos": (torch.cos, lambda e, g, a, out, at: e.neg(e.mul(g, e.sin(a)))),
    "tan": (torch.tan, lambda e, g, a, out, at: e.mul(g, e.add(e.mul(out, out), 1.0))),
}
for _name, (_fn, _d) in _UNARY.items():
    _op(_name, ("input",), value=_fn, grad=_unary(_d))
for _name in ("ceil", "floor"):
    _op(_name, ("input",), value=getattr(torch, _name), constant_output=True)

_op("relu", ("input",), attrs=("negative_slope", "lower_clip", "upper_clip"), value=_relu,
    grad=_backward_op("relu_backward"))
_op("leaky_relu", ("input",), attrs=("negative_slope",), value=_relu, grad=_backward_op("leaky_relu_backward"))
_op("swish", ("input",), attrs=("swish_beta",), value=_swish, grad=_backward_op("swish_backward"))

# loss * f'(input), as cuDNN's *_BWD pointwise modes compute. No derivative of their own.
for _name, _d, _attrs in (
        ("tanh_backward", lambda x: 1 - torch.tanh(x) ** 2, ()),
        ("sigmoid_backward", lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)), ()),
        ("elu_backward", lambda x: torch.where(x > 0, torch.ones_like(x), torch.exp(x)), ()),
        ("gelu_backward", _gelu_grad, ()),
        ("softplus_backward", torch.sigmoid, ()),
        ("gelu_approx_tanh_backward", _gelu_tanh_grad, ()),
        ("relu_backward", _relu_grad, ("negative_slope", "lower_clip", "upper_clip")),
        ("leaky_relu_backward", _relu_grad, ("negative_slope",)),
        ("swish_backward", _swish_grad, ("swish_beta",))):
    _op(_name, ("loss", "input"), attrs=_attrs,
        value=(lambda d: lambda loss, x, **at: loss * d(x, **at))(_d))

for _name, _fn in (("cmp_eq", torch.eq), ("cmp_neq", torch.ne), ("cmp_gt", torch.gt),
                   ("cmp_ge", torch.ge), ("cmp_lt", torch.lt), ("cmp_le", torch.le)):
    _op(_name, ("input", "comparison"), kind=COMPARE, value=_fn, constant_output=True)
_op("logical_and", ("a", "b"), kind=LOGICAL, value=torch.logical_and, constant_output=True)
_op("logical_or", ("a", "b"), kind=LOGICAL, value=torch.logical_or, constant_output=True)
_op("logical_not", ("input",), kind=LOGICAL, value=torch.logical_not, constant_output=True)
_op("binary_select", ("input0", "input1", "mask"), kind=SELECT, grad=_select)
_op("gen_index", ("input",), kind=INDEX, attrs=("axis",), constant_output=True)


def bind(op: str, args: tuple, kwargs: dict) -> tuple[list, dict, object]:
    """(inputs, attrs, compute_data_type) of a call graph.<op>(*args, **kwargs), named as the
    table names them: positional arguments past the inputs are the attributes in order."""
    spec = OPS[op]
    n_in = len(spec.inputs)
    if len(args) > n_in + len(spec.attrs):
        raise TypeError(f"cudnn_flex: {op}() takes {n_in + len(spec.attrs)} positional arguments "
                        f"({', '.join(spec.inputs + spec.attrs)}), got {len(args)}")
    kwargs = dict(kwargs)
    inputs = list(args[:n_in])
    for name in spec.inputs[len(inputs):]:
        if name not in kwargs:
            raise TypeError(f"cudnn_flex: {op}() missing argument '{name}'")
        inputs.append(kwargs.pop(name))
    attrs = dict(zip(spec.attrs, args[n_in:]))
    compute = kwargs.pop("compute_data_type", None)
    kwargs.pop("name", None)
    for name, value in kwargs.items():
        if name not in spec.attrs:
            raise TypeError(f"cudnn_flex: {op}() got an unexpected keyword argument '{name}'")
        attrs[name] = value
    if op == "gen_index":
        axis = attrs.get("axis")
        if isinstance(axis, bool) or not isinstance(axis, int) or not 0 <= axis <= 3:
            raise ValueError("cudnn_flex: gen_index axis must be 0 (batch), 1 (head), 2 (query) or "
                             f"3 (key), got {axis}")
    return inputs, {k: v for k, v in attrs.items() if v is not None}, compute


def add_dsl_operators(cls, graph_of) -> None:
    """Gives cls (a graph tensor type) the DSL's Python operators: `a + b` calls
    graph_of(a).add(a, b), `~m` graph_of(m).logical_not(m), and so on (as the C++ bridge does).
    `%` is the DSL's mod (C fmod, like cuDNN); `&`, `|`, `~` are logical (the DSL's masks)."""
    def binary(name: str, swap: bool):
        def method(self, other):
            op = getattr(graph_of(self), name)
            return op(other, self) if swap else op(self, other)
        return method

    for dunder, name, swap in [
            ("__add__", "add", False), ("__radd__", "add", True), ("__sub__", "sub", False),
            ("__rsub__", "sub", True), ("__mul__", "mul", False), ("__rmul__", "mul", True),
            ("__truediv__", "div", False), ("__rtruediv__", "div", True), ("__pow__", "pow", False),
            ("__rpow__", "pow", True), ("__mod__", "mod", False), ("__rmod__", "mod", True),
            ("__lt__", "cmp_lt", False), ("__le__", "cmp_le", False), ("__gt__", "cmp_gt", False),
            ("__ge__", "cmp_ge", False), ("__eq__", "cmp_eq", False), ("__ne__", "cmp_neq", False),
            ("__and__", "logical_and", False), ("__rand__", "logical_and", True),
            ("__or__", "logical_or", False), ("__ror__", "logical_or", True)]:
        setattr(cls, dunder, binary(name, swap))
    cls.__neg__ = lambda self: graph_of(self).neg(self)
    cls.__abs__ = lambda self: graph_of(self).abs(self)
    cls.__invert__ = lambda self: graph_of(self).logical_not(self)
