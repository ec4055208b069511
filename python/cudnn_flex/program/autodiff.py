"""The derived bprop: the chain rule over a recorded forward program, appended to it.

While cuDNN builds the backward graph it lowers the score_mod and then the bprop into the same
graph, so the bprop's nodes may read any forward node (tanh's input, exp's output, a bias).
When the derivative is exactly dP wherever it matters (additive biases, masks against -inf), no
bprop is emitted at all and dP passes through.
"""

from __future__ import annotations

from typing import Any, Optional

from .ops import OPS
from .record import D_P, SCORE, Recorder, Value


class BpropNotDerivable(NotImplementedError):
    """An op on the score's path has no automatic derivative; pass score_mod_bprop."""


class _Symbolic:
    """Stands in for the graph when only asked whether the derivative is exactly dP."""

    ONE, OTHER = "dP", "expr"

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.OTHER


def _depends(recorder: Recorder, length: int) -> list[bool]:
    return depends_on_score(recorder.nodes, length)


def depends_on_score(nodes, length: int) -> list[bool]:
    """Which of the first `length` nodes depend on the score through ops that carry a gradient."""
    flags = []
    for node in nodes[:length]:
        if node.op == "input":
            flags.append(node.args[0][1] == SCORE)
        else:
            flags.append(not OPS[node.op].constant_output
                         and any(kind == "n" and flags[v] for kind, v in node.args))
    return flags


def _derive(recorder: Recorder, length: int, fwd_out: int, emit: Any, d_p: Any) -> Any:
    depends = _depends(recorder, length)
    nodes = recorder.nodes
    grads: dict[int, Any] = {fwd_out: d_p}
    score = None
    for i in reversed(range(length)):
        node = nodes[i]
        if node.op == "input":
            if node.args[0][1] == SCORE:
                score = i
            continue
        g = grads.pop(i, None)
        if g is None or not depends[i]:
            continue
        spec = OPS[node.op]
        if spec.grad is None:
            raise BpropNotDerivable(
                f"cudnn_flex: the score_mod's {node.op}() lies on the score's path and has no "
                "automatic derivative; pass score_mod_bprop(graph, dP, tensors) written by hand")
        ins = [Value(recorder, v, "float") if kind == "n" else v for kind, v in node.args]
        attrs = {k: v for k, v in node.attrs if k != "compute_data_type"}
        thunks = spec.grad(emit, g, ins, Value(recorder, i, "float"), attrs)
        for (kind, v), thunk in zip(node.args, thunks):
            if kind != "n" or not depends[v]:
                continue
            if thunk is None:
                raise BpropNotDerivable(
                    f"cudnn_flex: {node.op}() of a value that depends on the score in that position "
                    "has no automatic derivative; pass score_mod_bprop")
            gx = thunk()
            grads[v] = emit.add(grads[v], gx) if v in grads else gx
    g = grads.get(score) if score is not None else None
    if g is None:  # the result does not depend on the score: its gradient is 0
        return emit.mul(d_p, 0.0)
    return g


def passes_through(recorder: Recorder, fwd_out: int) -> bool:
    """True when d(result)/d(score) is exactly dP wherever it matters, so no bprop is needed."""
    try:
        length = len(recorder.nodes)
        return _derive(recorder, length, fwd_out, _Symbolic(), _Symbolic.ONE) is _Symbolic.ONE
    except BpropNotDerivable:
        return False


# Ops whose value at -inf is NaN (fmod(-inf, c)). cuDNN's backward feeds the padding of a partial
# tile through the score_mod, and without a bprop nothing masks it afterwards: such a program
# gave NaN gradients at Sq, Skv = 129, 127 on the H100 (test_gpu_correctness, fmod). A backward
# with a bprop masks the padding after the score_mod (csrc/score_mod_bridge.h), so these programs
# get an explicit pass-through bprop instead of none.
_NAN_AT_MINUS_INF = frozenset({"mod"})


def _reads_minus_inf_into_nan(recorder: Recorder, fwd_out: int) -> bool:
    depends = _depends(recorder, fwd_out + 1)
    return any(node.op in _NAN_AT_MINUS_INF and depends[i] for i, node in enumerate(recorder.nodes[:fwd_out + 1]))


def append_bprop(recorder: Recorder, fwd_out: int) -> Optional[int]:
    """Records the derived bprop after the forward nodes; returns its result node, or None when
    dP passes through. Raises BpropNotDerivable when an op on the score's path has no rule."""
    if passes_through(recorder, fwd_out):
        if not _reads_minus_inf_into_nan(recorder, fwd_out):
            return None
        return recorder.identity(recorder.input(D_P)).index
    length = len(recorder.nodes)
    d_p = recorder.input(D_P)
    result = _derive(recorder, length, fwd_out, recorder, d_p)
    if result is d_p:  # cannot happen after passes_through, but a bprop must add a node
        result = recorder.identity(d_p)
    return result.index
