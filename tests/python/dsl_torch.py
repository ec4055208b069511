"""The score_mod DSL written out on torch tensors: expected values for DSL score_mods.

`formula(score_mod, tensors)` turns a DSL score_mod(graph, score, tensors) into a formula
(s, b, h, q_idx, kv_idx) -> s' for oracle.attention, by calling the score_mod with a TorchGraph
whose methods compute each op with plain torch on the materialized scores (float64, CPU).

Like oracle.py, this never imports cudnn_flex: the meaning of each op is written here from the
cuDNN pointwise modes it names (MOD is C fmod, the *_backward ops are loss * f'(input) with f'
taken by autograd of f, numbers are float constants, comparisons give booleans), so a wrong op in
the library's own op table, reference path or lowering cannot sit on both sides of a comparison.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch

F = torch.nn.functional


def _t(x, like: torch.Tensor) -> torch.Tensor:
    """A number as a float64 tensor (so that torch.maximum & co take it)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(float(x), dtype=torch.float64, device=like.device)


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _elu(x):
    return torch.where(x > 0, x, torch.expm1(x))


def _softplus(x):
    return torch.logaddexp(x, torch.zeros_like(x))


def _swish(x, swish_beta=None):
    beta = 1.0 if swish_beta is None else swish_beta
    return x * torch.sigmoid(beta * x)


def _relu(x, negative_slope=None, lower_clip=None, upper_clip=None):
    lo = 0.0 if lower_clip is None else lower_clip
    slope = 0.0 if negative_slope is None else negative_slope
    y = torch.where(x > lo, x, lo + slope * (x - lo))
    return y if upper_clip is None else torch.clamp(y, max=upper_clip)


def _derivative(f: Callable, x: torch.Tensor, **attrs) -> torch.Tensor:
    """f'(x) elementwise, by autograd of f (no derivative is written by hand here)."""
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(f(x, **attrs).sum(), x)
    return grad


UNARY = {
    "abs": torch.abs, "neg": torch.neg, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "sin": torch.sin, "cos": torch.cos,
    "tan": torch.tan, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "erf": torch.erf,
    "floor": torch.floor, "ceil": torch.ceil, "identity": lambda x: x, "softplus": _softplus,
    "gelu": _gelu, "gelu_approx_tanh": _gelu_tanh, "elu": _elu,
}
BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    "add_square": lambda a, b: a + b * b, "max": torch.maximum, "min": torch.minimum,
    "mod": torch.fmod, "pow": torch.pow, "bias": torch.add, "scale": torch.mul,
}
COMPARE = {"cmp_eq": torch.eq, "cmp_neq": torch.ne, "cmp_gt": torch.gt, "cmp_ge": torch.ge,
           "cmp_lt": torch.lt, "cmp_le": torch.le}
# name -> (f, its attributes); name_backward(loss, input) = loss * f'(input)
ACTIVATIONS = {"tanh": (torch.tanh, ()), "sigmoid": (torch.sigmoid, ()), "softplus": (_softplus, ()),
               "gelu": (_gelu, ()), "gelu_approx_tanh": (_gelu_tanh, ()), "elu": (_elu, ()),
               "relu": (_relu, ("negative_slope", "lower_clip", "upper_clip")),
               "leaky_relu": (_relu, ("negative_slope",)), "swish": (_swish, ("swish_beta",))}


class TorchGraph:
    """A DSL graph whose tensors are torch tensors broadcastable to [B, H, Sq, Skv]."""

    def __init__(self, grids):
        self.grids = grids  # b, h, q_idx, kv_idx index tensors

    def gen_index(self, input, axis, **_):
        return self.grids[axis].to(torch.float64)

    def binary_select(self, input0, input1, mask, **_):
        like = mask
        return torch.where(mask, _t(input0, like), _t(input1, like))

    def logical_and(self, a, b, **_):
        return torch.logical_and(a, b)

    def logical_or(self, a, b, **_):
        return torch.logical_or(a, b)

    def logical_not(self, input, **_):
        return torch.logical_not(input)

    def relu(self, input, negative_slope=None, lower_clip=None, upper_clip=None, **_):
        return _relu(input, negative_slope, lower_clip, upper_clip)

    def leaky_relu(self, input, negative_slope, **_):
        return _relu(input, negative_slope)

    def swish(self, input, swish_beta=None, **_):
        return _swish(input, swish_beta)

    def __getattr__(self, name):
        if name in UNARY:
            return lambda input, **_: UNARY[name](input)
        if name in BINARY:
            def binary(a, b, **_):
                like = a if isinstance(a, torch.Tensor) else b
                return BINARY[name](_t(a, like), _t(b, like))
            return binary
        if name in COMPARE:
            return lambda input, comparison, **_: COMPARE[name](input, _t(comparison, input))
        if name.endswith("_backward") and name[:-len("_backward")] in ACTIVATIONS:
            fn, attr_names = ACTIVATIONS[name[:-len("_backward")]]

            def backward(loss, input, *args, **kwargs):
                attrs = dict(zip(attr_names, args))
                attrs.update({k: v for k, v in kwargs.items() if k in attr_names and v is not None})
                return loss * _derivative(fn, input, **attrs)
            return backward
        raise AttributeError(f"TorchGraph has no op {name!r}")


def formula(score_mod: Callable, tensors: Optional[Mapping[str, torch.Tensor]] = None) -> Callable:
    """(s, b, h, q_idx, kv_idx) -> score_mod's result on torch (for oracle.attention). Tensors
    are used as float64 on the CPU; a one-element tensor is a number broadcast everywhere."""
    tensors = {name: t.detach().to("cpu", torch.float64) for name, t in (tensors or {}).items()}

    def apply(s, b, h, q_idx, kv_idx):
        views = {name: (t.reshape(()) if t.numel() == 1 else t) for name, t in tensors.items()}
        return score_mod(TorchGraph((b, h, q_idx, kv_idx)), s, views)
    return apply
