"""A recorded program replayed onto a graph: the cuDNN bridge graph (lowering) or the reference
graph (evaluation). Nodes are emitted on demand from the results asked for, so values nothing
reads are never emitted (cuDNN 9.19 returns wrong dV for graphs with dangling ops).

Lowering for cuDNN also rewrites the forms cuDNN 9.19 gets wrong (each measured on the H100 with
cuDNN 9.19; docs/dsl_ops.md has the table):
- a comparison whose first input is an INT32 index and whose second is a FLOAT tensor compares
  garbage (`q_idx >= kv_idx + 5` was wrong everywhere): the index goes through identity() first,
  and so does an INT32 score_mod tensor (int32 ids, read in place) there;
- a finite fill below -2^14 (torch.finfo(dtype).min, what Hugging Face masks with) is lowered
  as -2^14: cuDNN's backward recomputes P = exp(S - LSE), and with a fill of -3.4e38 the LSE of a
  fully masked row (fill + log(Skv)) rounds to the fill, so P there was 1 instead of 1/Skv (dV
  wrong by Skv). At -2^14 the LSE keeps log(Skv) to 1e-3, and any score above -16000 still masks.
- an op whose first input is a constant or a score_mod tensor and whose second is computed is
  lowered with the computed value first: the bridge would otherwise lift the first input to the
  score's shape (zero + x), and with such a lift cuDNN's backward was wrong even on whole tiles
  (`1 - s / 2`: dq off by 1e10; `torch.where(kv > q, -inf, s)`: dq off by 1e9) although the
  forward was right. Commutative ops swap, comparisons mirror, `c - x` becomes `-x + c`,
  `add_square(t, s)` (t + s*s: dq off by 4e9) becomes `s * s + t`, and a select swaps its
  branches under the negated condition;
- `x ** n` for an integer |n| <= 4 is lowered as products: cuDNN's POW is NaN for a negative base.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from .ops import COMPARE, INDEX, OPS
from .record import D_P, SCORE, Program

_LARGEST_SAFE_FILL = -(2.0 ** 14)
_COMMUTATIVE = ("add", "mul", "max", "min")
_SMALL_POWERS = (-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0)
# a OP b == b MIRRORED a;  not (a OP b) == a NEGATED b (indices and finite scores: no NaN)
_MIRRORED = {"cmp_gt": "cmp_lt", "cmp_ge": "cmp_le", "cmp_lt": "cmp_gt", "cmp_le": "cmp_ge",
             "cmp_eq": "cmp_eq", "cmp_neq": "cmp_neq"}
_NEGATED = {"cmp_gt": "cmp_le", "cmp_ge": "cmp_lt", "cmp_lt": "cmp_ge", "cmp_le": "cmp_gt",
            "cmp_eq": "cmp_neq", "cmp_neq": "cmp_eq"}


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
        self.negated: dict[int, Any] = {}  # comparisons emitted negated, for flipped selects

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
        # A comparison read only by selects that the lowering flips is emitted negated by them,
        # not as recorded too: an op whose result nothing reads is a dangling op to cuDNN.
        readers: dict[int, list] = {}
        for i in needed:
            for kind, v in nodes[i].args:
                if kind == "n":
                    readers.setdefault(v, []).append(i)
        flipped = {i for i in needed if self._flips(nodes[i])}
        skipped = {i for i in needed if i != index and nodes[i].op in _NEGATED
                   and all(r in flipped and nodes[r].args[2] == ("n", i) and ("n", i) not in nodes[r].args[:2]
                           for r in readers.get(i, ()))}
        for i in sorted(needed - skipped):
            self.done[i] = self._emit(nodes[i])
        return self.done[index]

    def _flips(self, node) -> bool:
        """The cuDNN lowering emits this select with its branches swapped (see _lower)."""
        return self.for_cudnn and node.op == "binary_select" and \
            not self._computed(*node.args[0]) and self._computed(*node.args[1])

    def _arg(self, node, pos: int, kind: str, v) -> Any:
        if kind != "n":
            return self._constant(node, pos, v)
        return self.done[v]

    def _computed(self, kind: str, v) -> bool:
        """The argument is a value the score_mod computes (an op, or the score / dP): what cuDNN
        accepts as an op's first input. Constants and score_mod tensors are not."""
        if kind != "n":
            return False
        node = self.program.nodes[v]
        return node.op != "input" or node.args[0][1] in (SCORE, D_P)

    def _emit(self, node) -> Any:
        if node.op == "input":
            slot = node.args[0][1]
            if slot not in self.slots:
                raise RuntimeError(f"cudnn_flex: the program reads input {slot!r}, which this graph "
                                   "build does not have (a bprop's forward value outside its build?)")
            out = self.slots[slot]
        else:
            flips = self._flips(node)  # then its condition is emitted negated, not read here
            args = [None if flips and pos == 2 else self._arg(node, pos, kind, v)
                    for pos, (kind, v) in enumerate(node.args)]
            out = self._lower(node.op, node.args, args, dict(node.attrs)) if self.for_cudnn else \
                getattr(self.graph, node.op)(*args, **dict(node.attrs))
        if node.out_dtype is not None:
            out.set_data_type(node.out_dtype)
        return out

    def _lower(self, op: str, arg_kinds: tuple, args: list, attrs: dict) -> Any:
        """The op on the cuDNN bridge graph, with the rewrites of the module docstring."""
        graph = self.graph
        if len(args) >= 2 and not self._computed(*arg_kinds[0]) and self._computed(*arg_kinds[1]):
            if op in _COMMUTATIVE or op in _MIRRORED:
                op = _MIRRORED.get(op, op)
                args[0], args[1] = args[1], args[0]
                arg_kinds = (arg_kinds[1], arg_kinds[0])
            elif op == "sub":
                return graph.add(graph.neg(args[1]), args[0], **attrs)
            elif op == "add_square":
                return graph.add(graph.mul(args[1], args[1], **attrs), args[0], **attrs)
            elif op == "binary_select":
                return graph.binary_select(args[1], args[0], self._negated(arg_kinds[2]), **attrs)
        if op == "pow" and arg_kinds[1][0] == "c" and arg_kinds[1][1] in _SMALL_POWERS:
            return self._power(args[0], int(arg_kinds[1][1]), attrs)
        if OPS[op].kind == COMPARE:
            (k0, v0), (k1, v1) = arg_kinds
            first_int = k0 == "n" and self._int32(v0, args[0])
            second_int = k1 == "n" and self._int32(v1, args[1])
            if first_int and k1 == "n" and not second_int:
                args[0] = graph.identity(args[0])
        return getattr(graph, op)(*args, **attrs)

    def _int32(self, index: int, tensor: Any) -> bool:
        """Node `index` is INT32 on the graph: by the program (_is_int32), or an input slot given
        an INT32 tensor (int32 ids, read in place), which the program does not know of."""
        node = self.program.nodes[index]
        if node.op == "input" and node.out_dtype is None:
            return "INT32" in str(tensor.get_data_type())
        return _is_int32(node)

    def _power(self, x: Any, n: int, attrs: dict) -> Any:
        """x ** n for a small integer n as products: cuDNN's POW is exp(n log x), NaN for x < 0
        (`s ** 2` had a NaN forward on the H100), where torch's integer power is defined."""
        if n == 0:
            return self.graph.add(self.graph.mul(x, 0.0), 1.0, **attrs)
        out = x
        for _ in range(abs(n) - 1):  # each product in the op's compute type (INT32 index powers)
            out = self.graph.mul(out, x, **attrs)
        if n < 0:
            return self.graph.reciprocal(out, **attrs)
        return self.graph.identity(x, **attrs) if out is x else out

    def _negated(self, condition: tuple) -> Any:
        """not condition: the complementary comparison where the condition is one, else
        logical_not."""
        kind, v = condition
        node = self.program.nodes[v] if kind == "n" else None
        if node is None or node.op not in _NEGATED:
            return self.graph.logical_not(self.done[v] if kind == "n" else v)
        if v not in self.negated:
            args = [self.done[x] if k == "n" else x for k, x in node.args]
            self.negated[v] = self._lower(_NEGATED[node.op], node.args, args, dict(node.attrs))
            if node.out_dtype is not None:
                self.negated[v].set_data_type(node.out_dtype)
        return self.negated[v]


def evaluate(program: Program, graph: Any, slots: dict, backward: bool = False,
             replay: Optional[Replay] = None) -> Any:
    """The forward (or backward) result of program on graph."""
    replay = replay or Replay(program, graph, slots)
    return replay.value(program.bwd_out if backward else program.fwd_out)

