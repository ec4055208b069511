"""Which score_mods cudnn-flex refuses to differentiate on cuDNN, written out from the documented rule.

cuDNN 9.19 returns NaN gradients from a backward graph (measured on the H100) for a score_mod with
sin, cos, tan or gelu of a value that depends on the score, or with a product, quotient or power
of two such values; cudnn-flex runs the forward and refuses the backward with
cudnn_flex.BackwardNotSupported. The GPU tests expect exactly these refusals (gpu_cases.compare)
and test_backward_refusals.py pins the library to this rule on the CPU.

A value depends on the score when it is computed from it through ops that carry a gradient:
floor, ceil, comparisons, logical ops and indices carry none. Never imports cudnn_flex.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

NAN_OPS = frozenset({"sin", "cos", "tan", "gelu"})
PRODUCT_OPS = frozenset({"mul", "div", "pow", "add_square", "scale"})
GRADIENT_FREE = frozenset({"floor", "ceil", "gen_index", "cmp_eq", "cmp_neq", "cmp_gt", "cmp_ge", "cmp_lt",
                           "cmp_le", "logical_and", "logical_or", "logical_not"})


def _form(op: str, depends: list[bool]) -> Optional[str]:
    if op in NAN_OPS and any(depends):
        return f"{op}() of the score"
    if op in PRODUCT_OPS and sum(depends) >= 2:
        return f"{op}() of two values that both depend on the score"
    return None


# --- DSL score_mods ------------------------------------------------------------------------------

class _Value:
    """A DSL value that knows whether it depends on the score."""

    def __init__(self, graph: "_Graph", depends: bool):
        self.graph, self.depends = graph, depends

    def _op(name, swap=False):  # noqa: N805  (builds the operator methods below)
        def method(self, other):
            return self.graph._apply(name, (other, self) if swap else (self, other))
        return method

    __add__, __radd__ = _op("add"), _op("add", True)
    __sub__, __rsub__ = _op("sub"), _op("sub", True)
    __mul__, __rmul__ = _op("mul"), _op("mul", True)
    __truediv__, __rtruediv__ = _op("div"), _op("div", True)
    __pow__, __rpow__ = _op("pow"), _op("pow", True)
    __mod__, __rmod__ = _op("mod"), _op("mod", True)
    __lt__, __le__, __gt__, __ge__ = _op("cmp_lt"), _op("cmp_le"), _op("cmp_gt"), _op("cmp_ge")
    __eq__, __ne__ = _op("cmp_eq"), _op("cmp_neq")
    __and__, __rand__, __or__, __ror__ = _op("logical_and"), _op("logical_and", True), _op("logical_or"), \
        _op("logical_or", True)
    __hash__ = object.__hash__

    def __neg__(self):
        return self.graph._apply("neg", (self,))

    def __abs__(self):
        return self.graph._apply("abs", (self,))

    def __invert__(self):
        return self.graph._apply("logical_not", (self,))

    del _op


class _Graph:
    """Runs a DSL score_mod on _Values, collecting the refused forms it meets."""

    def __init__(self):
        self.found: list[str] = []

    def _apply(self, op: str, inputs) -> _Value:
        depends = [isinstance(x, _Value) and x.depends for x in inputs]
        form = _form(op, depends)
        if form:
            self.found.append(form)
        if op == "binary_select":
            depends = depends[:2]
        return _Value(self, any(depends) and op not in GRADIENT_FREE)

    def __getattr__(self, op: str) -> Callable:
        return lambda *args, **kwargs: self._apply(op, list(args) + [v for v in kwargs.values() if isinstance(v, _Value)])


def dsl_refusals(score_mod: Callable, tensor_names=()) -> list[str]:
    """The refused forms (empty: none) of a DSL score_mod(graph, score, tensors)."""
    graph = _Graph()
    score_mod(graph, _Value(graph, True), {name: _Value(graph, False) for name in tensor_names})
    return graph.found


# --- Torch-style score_mods ------------------------------------------------------------------------

_TORCH_NAMES = {"mul": "mul", "multiply": "mul", "div": "div", "divide": "div", "true_divide": "div",
                "truediv": "div", "pow": "pow", "float_power": "pow", "square": "square"}
_TORCH_GRADIENT_FREE = ("floor", "ceil", "eq", "ne", "lt", "le", "gt", "ge", "logical_", "bitwise_", "and", "or",
                        "invert", "remainder", "floor_divide", "sign", "round", "trunc")


class _TorchDepends(TorchFunctionMode):
    """Tracks which tensors depend on the score while a torch-style score_mod runs."""

    def __init__(self, score: torch.Tensor):
        super().__init__()
        self.ids, self.keep, self.found = {id(score)}, [score], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "").strip("_")
        name = name[1:] if name.startswith("r") and name[1:] in ("mul", "truediv", "pow", "add", "sub") else name
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        depends = [id(t) in self.ids for t in tensors]
        op = _TORCH_NAMES.get(name, name)
        if op == "square":
            op, depends = "mul", depends * 2
        elif op == "where":
            depends = depends[1:]
        form = _form(op, depends)
        if form:
            self.found.append(form)
        if any(depends) and not name.startswith(_TORCH_GRADIENT_FREE):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.ids.add(id(t))
                    self.keep.append(t)
        return out


def torch_refusals(score_mod: Callable, shape) -> list[str]:
    """The refused forms of a torch-style score_mod(score, b, h, q_idx, kv_idx) on scores of
    `shape` [B, H, Sq, Skv] (its captured tensors must be on the CPU)."""
    b, h, s_q, s_kv = shape
    grids = (torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1),
             torch.arange(s_q).view(1, 1, s_q, 1), torch.arange(s_kv).view(1, 1, 1, s_kv))
    score = torch.zeros(shape)
    with _TorchDepends(score) as mode:
        score_mod(score, *grids)
    return mode.found


def _positional(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return -1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def refusals(kwargs: Mapping, shape) -> list[str]:
    """The refused forms of the score_mod in flex_attention kwargs (a mask_mod has none)."""
    score_mod = kwargs.get("score_mod")
    if score_mod is None:
        return []
    if _positional(score_mod) == 5:
        return torch_refusals(score_mod, shape)
    return dsl_refusals(score_mod, tuple(kwargs.get("score_mod_tensors") or ()))
