"""Automatic score_mod_bprop: the chain rule over the ops a score_mod emitted.

While cuDNN builds the backward graph it calls the score_mod and then the bprop on the same graph.
AutoBprop runs the score_mod on a recording view of the graph (a tape of op, inputs, output), and
its bprop walks that tape backwards, emitting the derivative ops into the same graph; the forward
values it needs (tanh's input, exp's output, a bias tensor) are the graph tensors on the tape.
Works for any graph with the DSL's methods: the C++ bridge graph and the reference graph alike.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable, Hashable, Optional

from .reference import add_dsl_operators

# Input names of every DSL op, in positional order (mirrors the bridge and the reference graph).
_BINARY_NAMES = {"add": ("a", "b"), "sub": ("a", "b"), "mul": ("a", "b"), "div": ("a", "b"),
                 "add_square": ("a", "b"), "bias": ("input", "bias"), "scale": ("input", "scale"),
                 "max": ("input0", "input1"), "min": ("input0", "input1"),
                 "mod": ("input0", "input1"), "pow": ("input0", "input1"),
                 "logical_and": ("a", "b"), "logical_or": ("a", "b")}
_UNARY_OPS = ("sqrt", "tanh", "elu", "gelu", "sigmoid", "softplus", "gelu_approx_tanh", "erf",
              "identity", "exp", "log", "neg", "abs", "ceil", "floor", "rsqrt", "reciprocal", "sin",
              "cos", "tan", "logical_not")
_COMPARE_OPS = ("cmp_eq", "cmp_neq", "cmp_gt", "cmp_ge", "cmp_lt", "cmp_le")
_BACKWARD_OPS = ("tanh_backward", "sigmoid_backward", "elu_backward", "gelu_backward",
                 "softplus_backward", "gelu_approx_tanh_backward")
INPUT_NAMES = {**_BINARY_NAMES, **{op: ("input",) for op in _UNARY_OPS},
               **{op: ("input", "comparison") for op in _COMPARE_OPS},
               **{op: ("loss", "input") for op in _BACKWARD_OPS},
               "binary_select": ("input0", "input1", "mask"), "gen_index": ("input", "axis")}
# Outputs that carry no gradient: masks, indices, and piecewise-constant values.
_NO_GRADIENT = set(_COMPARE_OPS) | {"logical_and", "logical_or", "logical_not", "gen_index",
                                    "ceil", "floor"}
# A select against a constant at or below this is a mask: where it picks the constant the
# probability is 0, so the gradient there does not matter and the other branch passes dP as is.
_MASK_VALUE = -1e30


class BpropNotDerivable(NotImplementedError):
    """An op on the score's path has no automatic derivative; pass score_mod_bprop."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Op:
    __slots__ = ("name", "inputs", "output")

    def __init__(self, name, inputs, output):
        self.name, self.inputs, self.output = name, inputs, output


class TapeTensor:
    """A graph tensor seen through the tape: operators and methods record like graph ops."""

    __slots__ = ("tensor", "tape", "depends")

    def __init__(self, tensor, tape: "Tape", depends: bool):
        self.tensor, self.tape, self.depends = tensor, tape, depends

    def set_data_type(self, dt):
        self.tensor.set_data_type(dt)
        return self

    def __getattr__(self, name):  # get_data_type, get_dim, set_name, ...
        return getattr(self.tensor, name)

    def __bool__(self):
        return bool(self.tensor)  # the graph's own explanation

    def __hash__(self):
        return id(self)


add_dsl_operators(TapeTensor, lambda t: t.tape.graph)


def _raw(x):
    return x.tensor if isinstance(x, TapeTensor) else x


def _depends(x) -> bool:
    return isinstance(x, TapeTensor) and x.depends


class _RecordingGraph:
    """The graph as the score_mod sees it: every op runs on the real graph and is recorded."""

    def __init__(self, tape: "Tape"):
        self._tape = tape

    def __getattr__(self, name):
        real = getattr(self._tape.real, name)
        if name not in INPUT_NAMES:
            return real  # not an op (e.g. attributes); nothing to record
        return lambda *args, **kwargs: self._tape.record(name, real, args, kwargs)


class Tape:
    def __init__(self, graph):
        self.real = graph
        self.graph = _RecordingGraph(self)
        self.ops: list[_Op] = []

    def wrap(self, tensor, depends: bool) -> TapeTensor:
        return TapeTensor(tensor, self, depends)

    def record(self, name, real_op, args, kwargs):
        names = INPUT_NAMES[name]
        inputs = list(args[:len(names)]) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
        out = real_op(*[_raw(x) for x in inputs], *args[len(names):], **kwargs)
        depends = name not in _NO_GRADIENT and any(_depends(x) for x in inputs)
        wrapped = TapeTensor(out, self, depends)
        self.ops.append(_Op(name, inputs, wrapped))
        return wrapped


class _Symbolic:
    """Stands in for the graph when only asked whether the derivative is exactly dP."""

    ONE, OTHER = "dP", "expr"

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.OTHER


def _select_rules(emit, g, op):
    x0, x1, mask = op.inputs
    mask = _raw(mask)

    def branch(other, keep_first):
        if _is_number(other) and other <= _MASK_VALUE:
            return lambda: g  # the other side is a mask: dP passes through
        return (lambda: emit.binary_select(g, 0.0, mask)) if keep_first else \
            (lambda: emit.binary_select(0.0, g, mask))
    return (branch(x1, True), branch(x0, False), None)


def _rules(emit, g, op) -> tuple:
    """One thunk per input of op giving that input's gradient from g, the output's gradient.
    Thunks, so that only the gradients of inputs that depend on the score are emitted (cuDNN
    gets wrong dV when a graph holds unused ops)."""
    name, out = op.name, op.output.tensor
    a = _raw(op.inputs[0])
    b = _raw(op.inputs[1]) if len(op.inputs) > 1 else None
    if name == "binary_select":
        return _select_rules(emit, g, op)
    ge = lambda: emit.cmp_ge(a, b)  # noqa: E731
    le = lambda: emit.cmp_le(a, b)  # noqa: E731
    table: dict[str, tuple] = {
        "add": (lambda: g, lambda: g), "bias": (lambda: g, lambda: g), "identity": (lambda: g,),
        "sub": (lambda: g, lambda: emit.neg(g)),
        "mul": (lambda: emit.mul(g, b), lambda: emit.mul(g, a)),
        "scale": (lambda: emit.mul(g, b), lambda: emit.mul(g, a)),
        "div": (lambda: emit.div(g, b), lambda: emit.neg(emit.div(emit.mul(g, out), b))),
        "add_square": (lambda: g, lambda: emit.mul(emit.mul(g, b), 2.0)),
        "max": (lambda: emit.binary_select(g, 0.0, ge()), lambda: emit.binary_select(0.0, g, ge())),
        "min": (lambda: emit.binary_select(g, 0.0, le()), lambda: emit.binary_select(0.0, g, le())),
        "mod": (lambda: g, None),
        "pow": (lambda: emit.mul(emit.mul(g, b), emit.pow(a, b - 1.0 if _is_number(b) else emit.sub(b, 1.0))),
                lambda: emit.mul(emit.mul(g, out), emit.log(a))),
        "neg": (lambda: emit.neg(g),),
        "abs": (lambda: emit.binary_select(g, emit.neg(g), emit.cmp_ge(a, 0.0)),),
        "exp": (lambda: emit.mul(g, out),),
        "log": (lambda: emit.div(g, a),),
        "sqrt": (lambda: emit.div(emit.mul(g, 0.5), out),),
        "rsqrt": (lambda: emit.mul(emit.div(emit.mul(g, out), a), -0.5),),
        "reciprocal": (lambda: emit.neg(emit.mul(g, emit.mul(out, out))),),
        "tanh": (lambda: emit.tanh_backward(g, a),),
        "sigmoid": (lambda: emit.sigmoid_backward(g, a),),
        "elu": (lambda: emit.elu_backward(g, a),),
        "gelu": (lambda: emit.gelu_backward(g, a),),
        "softplus": (lambda: emit.softplus_backward(g, a),),
        "gelu_approx_tanh": (lambda: emit.gelu_approx_tanh_backward(g, a),),
        "erf": (lambda: emit.mul(g, emit.mul(emit.exp(emit.neg(emit.mul(a, a))), 2.0 / math.sqrt(math.pi))),),
        "sin": (lambda: emit.mul(g, emit.cos(a)),),
        "cos": (lambda: emit.neg(emit.mul(g, emit.sin(a))),),
        "tan": (lambda: emit.mul(g, emit.add(emit.mul(out, out), 1.0)),),
    }
    if name not in table:
        raise BpropNotDerivable(
            f"cudnn_flex: the score_mod's {name}() lies on the score's path and has no automatic "
            "derivative; pass score_mod_bprop(graph, dP, tensors) written by hand")
    return table[name]


def derive(tape: Tape, score: TapeTensor, result: TapeTensor, emit, d_p):
    """d(result)/d(score) * d_p emitted with `emit` (a graph, or _Symbolic)."""
    grads: dict[int, Any] = {id(result): d_p}
    for op in reversed(tape.ops):
        g = grads.pop(id(op.output), None)
        if g is None or not op.output.depends:
            continue
        for x, rule in zip(op.inputs, _rules(emit, g, op)):
            if not _depends(x):
                continue
            if rule is None:
                raise BpropNotDerivable(f"cudnn_flex: {op.name}() of a value that depends on the "
                                        "score in that position has no automatic derivative; pass "
                                        "score_mod_bprop")
            gx = rule()
            grads[id(x)] = emit.add(grads[id(x)], gx) if id(x) in grads else gx
    g = grads.get(id(score))
    if g is None:  # the result does not depend on the score: its gradient is 0
        return emit.mul(d_p, 0.0)
    return g


_local = threading.local()


class AutoBprop:
    """score_mod plus its derived bprop, as one keyed object for the registry.

    Use `forward` as the score_mod and `backward` as the score_mod_bprop. Builds are serialised
    (ops.cpp), and a build calls forward then backward on one thread: the tape lives per thread.
    """

    def __init__(self, score_mod: Callable, key: Optional[Hashable]):
        self.score_mod = score_mod
        self.key = key

    def score_mod_graph_cache_key(self):
        return self.key

    def forward(self, graph, score, tensors):
        tape = Tape(graph)
        wrapped_score = tape.wrap(score, True)
        result = self.score_mod(tape.graph, wrapped_score, {n: tape.wrap(t, False) for n, t in tensors.items()})
        if not isinstance(result, TapeTensor):
            return result  # the registry's type check explains it
        _local.last = (tape, wrapped_score, result)
        return result.tensor

    def backward(self, graph, d_p, tensors):
        tape, score, result = _local.__dict__.pop("last")
        return derive(tape, score, result, graph, d_p)


def passes_through(score_mod: Callable, graph, score, tensors) -> Optional[bool]:
    """True when d(score_mod)/d(score) is exactly dP wherever it matters (additive biases, masks),
    so that no bprop is needed at all; False when a bprop must be derived; None when the score_mod
    failed here (the real build then raises its error in the graph's own terms). Runs score_mod
    once on `graph`, a small reference graph."""
    auto = AutoBprop(score_mod, None)
    try:
        auto.forward(graph, score, tensors)
        tape, wrapped_score, result = _local.__dict__.pop("last")
        return derive(tape, wrapped_score, result, _Symbolic(), _Symbolic.ONE) is _Symbolic.ONE
    except BpropNotDerivable:
        return False  # raised again if a backward graph is ever built
    except Exception:  # noqa: BLE001  (the build reports it)
        _local.__dict__.pop("last", None)
        return None
