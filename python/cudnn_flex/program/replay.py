"""A recorded program replayed onto a graph: the cuDNN bridge graph (lowering) or the reference
graph (evaluation). Nodes are emitted on demand from the results asked for, so values nothing
reads are never emitted (cuDNN 9.19 returns wrong dV for graphs with dangling ops)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from .record import Program

# A finite fill below this (torch.finfo(dtype).min, what Hugging Face masks with) overflows to
# -inf inside cuDNN's softmax (it scales scores by log2(e)), which turns a fully masked row into
# zeros where torch gives uniform attention. Lowered as this value instead: every row keeps the
# same softmax (masked positions still get probability 0, a fully masked row stays uniform).
_LARGEST_SAFE_FILL = -1.0e37


class Replay:
    """Lowers the nodes of `program` onto `graph`; `slots` maps input slots to graph tensors."""

    def __init__(self, program: Program, graph: Any, slots: dict, for_cudnn: bool = False):
        self.program, self.graph, self.slots = program, graph, slots
        self.for_cudnn = for_cudnn
        self.done: dict[int, Any] = {}

    def _constant(self, node, position: int, value: float) -> float:
        if self.for_cudnn and node.op == "binary_select" and position < 2 and \
                -math.inf < value < _LARGEST_SAFE_FILL:
            return _LARGEST_SAFE_FILL
        return value

    def value(self, index: int) -> Any:
        """The graph tensor of node `index`, emitting it and what it reads first."""
        nodes = self.program.nodes
        stack = [index]
        while stack:
            i = stack[-1]
            if i in self.done:
                stack.pop()
                continue
            node = nodes[i]
            missing = [v for kind, v in node.args if kind == "n" and v not in self.done]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            self.done[i] = self._emit(node)
        return self.done[index]

    def _emit(self, node) -> Any:
        if node.op == "input":
            slot = node.args[0][1]
            if slot not in self.slots:
                raise RuntimeError(f"cudnn_flex: the program reads input {slot!r}, which this graph "
                                   "build does not have (a bprop's forward value outside its build?)")
            out = self.slots[slot]
        else:
            args = [self.done[v] if kind == "n" else self._constant(node, pos, v)
                    for pos, (kind, v) in enumerate(node.args)]
            out = getattr(self.graph, node.op)(*args, **dict(node.attrs))
        if node.out_dtype is not None:
            out.set_data_type(node.out_dtype)
        return out


def evaluate(program: Program, graph: Any, slots: dict, backward: bool = False,
             replay: Optional[Replay] = None) -> Any:
    """The forward (or backward) result of program on graph."""
    replay = replay or Replay(program, graph, slots)
    return replay.value(program.bwd_out if backward else program.fwd_out)
