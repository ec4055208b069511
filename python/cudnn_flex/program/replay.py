"""A recorded program replayed onto a graph: the cuDNN bridge graph (lowering) or the reference
graph (evaluation). Nodes are emitted on demand from the results asked for, so values nothing
reads are never emitted (cuDNN 9.19 returns wrong dV for graphs with dangling ops).

Lowering for cuDNN also rewrites the forms cuDNN 9.19 gets wrong (each measured on the H100 with
cuDNN 9.19; docs/dsl_ops.md has the table):
- a comparison whose first input is an INT32 index and whose second is a FLOAT tensor compares
  garbage (`q_idx >= kv_idx + 5` was wrong everywhere): the index goes through identity() first;
- a finite fill below -2^14 (torch.finfo(dtype).min, what Hugging Face masks with) is lowered
  as -2^14: cuDNN's backward recomputes P = exp(S - LSE), and with a fill of -3.4e38 the LSE of a
  fully masked row (fill + log(Skv)) rounds to the fill, so P there was 1 instead of 1/Skv (dV
  wrong by Skv). At -2^14 the LSE keeps log(Skv) to 1e-3, and any score above -16000 still masks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from .ops import COMPARE, INDEX, OPS
from .record import Program

_LARGEST_SAFE_FILL = -(2.0 ** 14)


def _is_int32(node) -> bool:
    """The node's output is INT32 in the bridge (an index, or arithmetic computed in INT32)."""
    if node.out_dtype is not None:
        return "INT32" in str(node.out_dtype)
    if node.op == "input":
        return False
    compute = dict(node.attrs).get("compute_data_type")
    if OPS[node.op].kind == INDEX:
        return compute is None or "INT32" in str(compute)
    return compute is not None and "INT32" in str(compute) and OPS[node.op].kind != COMPARE


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
        """The graph tensor of node `index`, emitting it and what it reads first, in the order
        the mod recorded them (cuDNN's results depend on the order ops are added)."""
        nodes = self.program.nodes
        needed, stack = set(), [index]
        while stack:
            i = stack.pop()
            if i in self.done or i in needed:
                continue
            needed.add(i)
            stack.extend(v for kind, v in nodes[i].args if kind == "n")
        for i in sorted(needed):
            self.done[i] = self._emit(nodes[i])
        return self.done[index]

    def _arg(self, node, pos: int, kind: str, v) -> Any:
        if kind != "n":
            return self._constant(node, pos, v)
        return self.done[v]

    def _emit(self, node) -> Any:
        if node.op == "input":
            slot = node.args[0][1]
            if slot not in self.slots:
                raise RuntimeError(f"cudnn_flex: the program reads input {slot!r}, which this graph "
                                   "build does not have (a bprop's forward value outside its build?)")
            out = self.slots[slot]
        else:
            args = [self._arg(node, pos, kind, v) for pos, (kind, v) in enumerate(node.args)]
            if self.for_cudnn and OPS[node.op].kind == COMPARE:
                (k0, v0), (k1, v1) = node.args
                first_int = k0 == "n" and _is_int32(self.program.nodes[v0])
                second_int = k1 == "n" and _is_int32(self.program.nodes[v1])
                if first_int and k1 == "n" and not second_int:
                    args[0] = self.graph.identity(args[0])
            out = getattr(self.graph, node.op)(*args, **dict(node.attrs))
        if node.out_dtype is not None:
            out.set_data_type(node.out_dtype)
        return out


def evaluate(program: Program, graph: Any, slots: dict, backward: bool = False,
             replay: Optional[Replay] = None) -> Any:
    """The forward (or backward) result of program on graph."""
    replay = replay or Replay(program, graph, slots)
    return replay.value(program.bwd_out if backward else program.fwd_out)
