"""The score_mod DSL evaluated with torch ops on the materialized score matrix.

This is both the CPU path of flex_attention and the oracle of the tests: the same score_mod that
cuDNN compiles runs here on a [B, H, Sq, Skv] float32 (or float64) tensor, followed by softmax and
P @ V. Autograd through it gives the true gradients of the forward score_mod.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch

from ._C import data_type

_TORCH_DTYPE = {
    data_type.FLOAT: torch.float32, data_type.DOUBLE: torch.float64, data_type.HALF: torch.float16,
    data_type.BFLOAT16: torch.bfloat16, data_type.INT32: torch.int32, data_type.INT64: torch.int64,
    data_type.INT8: torch.int8, data_type.UINT8: torch.uint8, data_type.BOOLEAN: torch.bool,
}


class RefTensor:
    """A score_mod tensor of the reference graph: a torch tensor with DSL methods and operators."""

    __slots__ = ("value", "graph")

    def __init__(self, value: torch.Tensor, graph: "ReferenceGraph"):
        self.value = value
        self.graph = graph

    def set_data_type(self, dt) -> "RefTensor":
        self.value = self.graph._cast(self.value, dt)
        return self

    def get_data_type(self):
        for dt, td in _TORCH_DTYPE.items():
            if td == self.value.dtype:
                return dt
        return data_type.FLOAT

    def set_name(self, name: str) -> "RefTensor":
        return self

    def get_dim(self) -> list[int]:
        return list(self.value.shape)

    def __repr__(self) -> str:
        return f"cudnn_flex.reference.RefTensor(shape={list(self.value.shape)}, dtype={self.value.dtype})"

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self):
        raise TypeError("cudnn_flex: a graph tensor has no truth value while the graph is built; use "
                        "graph.binary_select(a, b, mask) instead of Python if/and/or on tensors")


def add_dsl_operators(cls, graph_of) -> None:
    """Gives cls (a graph tensor type) the DSL's Python operators: `a + b` calls
    graph_of(a).add(a, b), `~m` graph_of(m).logical_not(m), and so on (as the C++ bridge does)."""
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


add_dsl_operators(RefTensor, lambda t: t.graph)


class ReferenceGraph:
    """Mirror of the bridge graph (cudnn_flex.Graph) that computes with torch instead of building."""

    def __init__(self, score_shape, device, float_dtype=torch.float32):
        self.shape = tuple(score_shape)
        self.device = device
        self.float_dtype = float_dtype

    # -- helpers --------------------------------------------------------------------------------
    def _cast(self, value: torch.Tensor, dt) -> torch.Tensor:
        target = _TORCH_DTYPE.get(dt)
        if target is None:
            return value
        if target.is_floating_point:
            target = self.float_dtype  # intermediates are float in cuDNN; keep the oracle exact
        if target == torch.bool:
            return value != 0
        if not target.is_floating_point and value.is_floating_point():
            return value.trunc().to(target)
        return value.to(target)

    def _value(self, x, op: str, arg: str) -> torch.Tensor:
        if isinstance(x, RefTensor):
            return x.value
        if isinstance(x, bool):
            raise TypeError(f"cudnn_flex: argument '{arg}' of {op}() is a bool; use a comparison or "
                            "the number 0 or 1")
        if isinstance(x, (int, float)):
            return torch.tensor(float(x), dtype=self.float_dtype, device=self.device)
        raise TypeError(f"cudnn_flex: argument '{arg}' of {op}() must be a cudnn_flex graph tensor or "
                        f"a Python number, got {type(x).__qualname__}")

    def _compute(self, compute_data_type, default):
        dt = default if compute_data_type in (None, data_type.NOT_SET) else compute_data_type
        td = _TORCH_DTYPE[dt]
        return self.float_dtype if td.is_floating_point else td

    def _arith(self, fn, values, compute_data_type, op, names):
        ctype = self._compute(compute_data_type, data_type.FLOAT)
        vals = [self._value(v, op, n) for v, n in zip(values, names)]
        vals = [v.to(ctype) if not (ctype == torch.bool) else v for v in vals]
        out = fn(*vals)
        if not ctype.is_floating_point and out.is_floating_point():
            out = out.trunc().to(ctype)
        return RefTensor(out, self)

    def _compare(self, fn, a, b, compute_data_type, op):
        ctype = self._compute(compute_data_type, data_type.FLOAT)
        x = self._value(a, op, "input").to(ctype)
        y = self._value(b, op, "comparison").to(ctype)
        return RefTensor(fn(x, y), self)

    def _logical(self, fn, values, op, names):
        vals = [self._value(v, op, n) != 0 for v, n in zip(values, names)]
        return RefTensor(fn(*vals), self)


def _binary(torch_fn, a="a", b="b"):
    def method(self, x, y, compute_data_type=None, name=""):
        return self._arith(torch_fn, (x, y), compute_data_type, method.__name__, (a, b))
    return method


def _unary(torch_fn):
    def method(self, input, compute_data_type=None, name=""):
        return self._arith(torch_fn, (input,), compute_data_type, method.__name__, ("input",))
    return method


def _backward(derivative):
    """loss * f'(input), as cuDNN's *_BWD pointwise modes compute."""
    def method(self, loss, input, compute_data_type=None, name=""):
        return self._arith(lambda l, x: l * derivative(x), (loss, input), compute_data_type,
                           method.__name__, ("loss", "input"))
    return method


def _cmp(torch_fn):
    def method(self, input, comparison, compute_data_type=None, name=""):
        return self._compare(torch_fn, input, comparison, compute_data_type, method.__name__)
    return method


def _gelu_grad(x):
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_tanh_grad(x):
    k = math.sqrt(2.0 / math.pi)
    inner = k * (x + 0.044715 * x ** 3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * x * x)


_BINARY = {
    "add": (torch.add, "a", "b"), "sub": (torch.sub, "a", "b"), "mul": (torch.mul, "a", "b"),
    "div": (torch.div, "a", "b"), "add_square": (lambda a, b: a + b * b, "a", "b"),
    "bias": (torch.add, "input", "bias"), "scale": (torch.mul, "input", "scale"),
    "max": (torch.maximum, "input0", "input1"), "min": (torch.minimum, "input0", "input1"),
    "mod": (torch.fmod, "input0", "input1"), "pow": (torch.pow, "input0", "input1"),
}
_UNARY = {
    "sqrt": torch.sqrt, "tanh": torch.tanh, "elu": torch.nn.functional.elu,
    "gelu": torch.nn.functional.gelu, "sigmoid": torch.sigmoid,
    "softplus": torch.nn.functional.softplus, "gelu_approx_tanh": _gelu_tanh, "erf": torch.erf,
    "identity": lambda x: x, "exp": torch.exp, "log": torch.log, "neg": torch.neg, "abs": torch.abs,
    "ceil": torch.ceil, "floor": torch.floor, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal,
    "sin": torch.sin, "cos": torch.cos, "tan": torch.tan,
}
_BACKWARD = {
    "tanh_backward": lambda x: 1 - torch.tanh(x) ** 2,
    "sigmoid_backward": lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
    "elu_backward": lambda x: torch.where(x > 0, torch.ones_like(x), torch.exp(x)),
    "gelu_backward": _gelu_grad,
    "softplus_backward": torch.sigmoid,
    "gelu_approx_tanh_backward": _gelu_tanh_grad,
}
_COMPARE = {
    "cmp_eq": torch.eq, "cmp_neq": torch.ne, "cmp_gt": torch.gt, "cmp_ge": torch.ge,
    "cmp_lt": torch.lt, "cmp_le": torch.le,
}

for _name, (_fn, _a, _b) in _BINARY.items():
    _m = _binary(_fn, _a, _b)
    _m.__name__ = _name
    setattr(ReferenceGraph, _name, _m)
for _name, _fn in _UNARY.items():
    _m = _unary(_fn)
    _m.__name__ = _name
    setattr(ReferenceGraph, _name, _m)
for _name, _fn in _BACKWARD.items():
    _m = _backward(_fn)
    _m.__name__ = _name
    setattr(ReferenceGraph, _name, _m)
for _name, _fn in _COMPARE.items():
    _m = _cmp(_fn)
    _m.__name__ = _name
    setattr(ReferenceGraph, _name, _m)


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


def _swish(x, beta):
    return x * torch.sigmoid((1.0 if beta is None else beta) * x)


def _swish_grad(x, beta):
    b = 1.0 if beta is None else beta
    s = torch.sigmoid(b * x)
    return s + b * x * s * (1 - s)


def _graph_methods():
    def relu(self, input, negative_slope=None, lower_clip=None, upper_clip=None,
             compute_data_type=None, name=""):
        return self._arith(lambda x: _relu(x, negative_slope, lower_clip, upper_clip), (input,),
                           compute_data_type, "relu", ("input",))

    def relu_backward(self, loss, input, negative_slope=None, lower_clip=None, upper_clip=None,
                      compute_data_type=None, name=""):
        return self._arith(lambda l, x: l * _relu_grad(x, negative_slope, lower_clip, upper_clip),
                           (loss, input), compute_data_type, "relu_backward", ("loss", "input"))

    def leaky_relu(self, input, negative_slope=None, compute_data_type=None, name=""):
        return relu(self, input, negative_slope=negative_slope, compute_data_type=compute_data_type)

    def leaky_relu_backward(self, loss, input, negative_slope=None, compute_data_type=None, name=""):
        return relu_backward(self, loss, input, negative_slope=negative_slope,
                             compute_data_type=compute_data_type)

    def swish(self, input, swish_beta=None, compute_data_type=None, name=""):
        return self._arith(lambda x: _swish(x, swish_beta), (input,), compute_data_type, "swish",
                           ("input",))

    def swish_backward(self, loss, input, swish_beta=None, compute_data_type=None, name=""):
        return self._arith(lambda l, x: l * _swish_grad(x, swish_beta), (loss, input),
                           compute_data_type, "swish_backward", ("loss", "input"))

    def logical_and(self, a, b, compute_data_type=None, name=""):
        return self._logical(torch.logical_and, (a, b), "logical_and", ("a", "b"))

    def logical_or(self, a, b, compute_data_type=None, name=""):
        return self._logical(torch.logical_or, (a, b), "logical_or", ("a", "b"))

    def logical_not(self, input, compute_data_type=None, name=""):
        return self._logical(torch.logical_not, (input,), "logical_not", ("input",))

    def gen_index(self, input, axis, compute_data_type=None, name=""):
        if not 0 <= axis <= 3:
            raise ValueError("cudnn_flex: gen_index axis must be 0 (batch), 1 (head), 2 (query) or "
                             f"3 (key), got {axis}")
        shape = [1, 1, 1, 1]
        shape[axis] = self.shape[axis]
        index = torch.arange(self.shape[axis], device=self.device, dtype=torch.int32).view(shape)
        return RefTensor(index, self)

    def binary_select(self, input0, input1, mask, compute_data_type=None, name=""):
        a = self._value(input0, "binary_select", "input0").to(self.float_dtype)
        b = self._value(input1, "binary_select", "input1").to(self.float_dtype)
        m = self._value(mask, "binary_select", "mask") != 0
        return RefTensor(torch.where(m, a, b), self)

    return locals()


for _name, _m in _graph_methods().items():
    setattr(ReferenceGraph, _name, _m)


def expand_kv_heads(t: torch.Tensor, h_q: int) -> torch.Tensor:
    """GQA/MQA: repeat each K/V head for the query heads that share it."""
    return t if t.shape[1] == h_q else t.repeat_interleave(h_q // t.shape[1], dim=1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              score_mod: Optional[Callable] = None,
              score_mod_tensors: Optional[Mapping[str, torch.Tensor]] = None,
              scale: Optional[float] = None, float_dtype: torch.dtype = torch.float32
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on BHSD tensors with score_mod, in float_dtype. Returns (out, lse [B,H,Sq]).

    Rows in which every score is -inf give out = 0 and lse = -inf, as cuDNN does.
    """
    h_q = q.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q.to(float_dtype)
    kf = expand_kv_heads(k, h_q).to(float_dtype)
    vf = expand_kv_heads(v, h_q).to(float_dtype)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if score_mod is not None:
        graph = ReferenceGraph(scores.shape, scores.device, float_dtype)
        tensors = {}
        for name, t in (score_mod_tensors or {}).items():
            t = t.to(scores.device)
            tensors[name] = RefTensor(t.to(float_dtype) if t.is_floating_point() else t, graph)
        result = score_mod(graph, RefTensor(scores, graph), tensors)
        if not isinstance(result, RefTensor):
            raise TypeError(f"cudnn_flex: the score_mod returned {type(result).__name__}; it must "
                            "return the graph tensor it computed from its input")
        scores = result.value.to(float_dtype).expand(scores.shape)
    lse = torch.logsumexp(scores, dim=-1)
    # Fully masked rows (lse = -inf) give 0 as cuDNN does; NaN or inf in the inputs propagate.
    empty_row = (lse == float("-inf")).unsqueeze(-1)
    probs = torch.where(empty_row, 0.0, torch.exp(scores - torch.where(empty_row, 0.0, lse.unsqueeze(-1))))
    return probs @ vf, lse
