"""Recording a score_mod into a program: a small list of ops with constants and input slots.

A mod runs once on a Recorder, a graph with every DSL method of the op table whose methods
append a node instead of computing. The nodes, constants and slots make the program's structural
key; its digest is the mod's identity everywhere (graph key, plan store). Two calls whose mods
compute the same program share a graph; any change in what the mod computes (a default argument,
a global, an attribute, an `.item()`, one tensor captured twice) changes the program.
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

from .._C import data_type
from .ops import ARITH, COMPARE, INDEX, LOGICAL, OPS, SELECT, add_dsl_operators, bind

# Slot names of a program's inputs.
SCORE, D_P = "score", "dP"


def mod_slot(i: int) -> str:
    return f"t{i}"


def bprop_slot(i: int) -> str:
    return f"bt{i}"


# Data types, as the bridge's data_type enum values (int), kept without importing _C here.
FLOAT, INT32, BOOLEAN, UINT8 = "FLOAT", "INT32", "BOOLEAN", "UINT8"


class Node:
    """One op of a program: op name, arguments (("n", index) for a node, ("c", float) for a
    constant), attributes (sorted (name, value) pairs) and an explicit output data type."""

    __slots__ = ("op", "args", "attrs", "out_dtype")

    def __init__(self, op: str, args: tuple, attrs: tuple = (), out_dtype: Any = None):
        self.op, self.args, self.attrs, self.out_dtype = op, args, attrs, out_dtype

    def key(self) -> tuple:
        args = tuple(("c", v.hex()) if kind == "c" else (kind, v) for kind, v in self.args)
        dtype = None if self.out_dtype is None else int(self.out_dtype)
        attrs = tuple((k, v.hex() if isinstance(v, float) else int(v)) for k, v in self.attrs)
        return (self.op, args, attrs, dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"%{v}" if kind == "n" else repr(v) for kind, v in self.args)
        attrs = "".join(f", {k}={v!r}" for k, v in self.attrs)
        return f"{self.op}({args}{attrs})"


class Value:
    """A value of the program being recorded, as the mod sees it (DSL methods and operators)."""

    __slots__ = ("recorder", "index", "kind")

    def __init__(self, recorder: "Recorder", index: int, kind: str):
        self.recorder, self.index, self.kind = recorder, index, kind

    def set_data_type(self, dt) -> "Value":
        self.recorder.nodes[self.index].out_dtype = dt
        return self

    def get_data_type(self):
        node = self.recorder.nodes[self.index]
        if node.out_dtype is not None:
            return node.out_dtype
        return self.recorder.data_type(self.kind)

    def set_name(self, name: str) -> "Value":
        return self

    def get_name(self) -> str:
        return f"%{self.index}"

    def get_dim(self) -> list[int]:
        return list(self.recorder.shape)

    def __repr__(self) -> str:
        return f"cudnn_flex.program.Value(%{self.index} = {self.recorder.nodes[self.index]!r})"

    def __hash__(self) -> int:
        return id(self)

    def __bool__(self):
        raise TypeError("cudnn_flex: a graph tensor has no truth value while the graph is built; use "
                        "graph.binary_select(a, b, mask) instead of Python if/and/or on tensors")


# The kind of value an op of each kind produces (what get_data_type() and operators see).
_KIND_OF_OUTPUT = {INDEX: "int", COMPARE: "bool", LOGICAL: "bool", ARITH: "float", SELECT: "float"}


class Recorder:
    """A graph whose DSL methods record nodes. `shape` is the score's [B, H, Sq, Skv] (what
    get_dim() answers); it is not part of the program (the graph key has the shapes)."""

    def __init__(self, shape: Sequence[int] = (1, 1, 1, 1)):
        self.nodes: list[Node] = []
        self.shape = tuple(shape)
        self._inputs: dict[str, Value] = {}

    # -- inputs -----------------------------------------------------------------------------------
    def input(self, slot: str, kind: str = "float") -> Value:
        value = self._inputs.get(slot)
        if value is None:
            value = self._inputs[slot] = self._append(Node("input", (("s", slot),)), kind)
        return value

    def data_type(self, kind: str):
        return {"int": data_type.INT32, "bool": data_type.BOOLEAN}.get(kind, data_type.FLOAT)

    # -- ops ----------------------------------------------------------------------------------------
    def _append(self, node: Node, kind: str) -> Value:
        self.nodes.append(node)
        return Value(self, len(self.nodes) - 1, kind)

    def _arg(self, x: Any, op: str, arg: str) -> tuple:
        if isinstance(x, Value):
            if x.recorder is not self:
                raise ValueError(f"cudnn_flex: argument '{arg}' of {op}() is a tensor of another graph "
                                 "(one kept from an earlier build?); a score_mod may only use the "
                                 "tensors it is given in this call")
            return ("n", x.index)
        if isinstance(x, bool):
            raise TypeError(f"cudnn_flex: argument '{arg}' of {op}() is a bool; use a comparison or "
                            "the number 0 or 1")
        if isinstance(x, (int, float)):
            return ("c", float(x))
        name = type(x).__qualname__
        hint = (" A torch.Tensor cannot be used directly: pass it in score_mod_tensors and use "
                "tensors['name'] inside the score_mod.") if name == "Tensor" else ""
        raise TypeError(f"cudnn_flex: argument '{arg}' of {op}() must be a cudnn_flex graph tensor or "
                        f"a Python number, got {name}.{hint}")

    def record(self, op: str, args: tuple, kwargs: dict) -> Value:
        spec = OPS[op]
        if not kwargs and len(args) == len(spec.inputs):  # the common call: inputs only
            node_args = tuple(self._arg(x, op, name) for x, name in zip(args, spec.inputs))
            return self._append(Node(op, node_args), _KIND_OF_OUTPUT[spec.kind])
        inputs, attrs, compute = bind(op, args, kwargs)
        if compute is not None and compute != data_type.NOT_SET:
            attrs["compute_data_type"] = compute
        else:
            compute = None
        node_args = tuple(self._arg(x, op, name) for x, name in zip(inputs, spec.inputs))
        # Numeric attributes are floats (as the bridge takes them), except gen_index's axis and
        # the compute data type (an enum).
        clean = tuple(sorted((k, v if k in ("axis", "compute_data_type") else float(v))
                             for k, v in attrs.items()))
        kind = _KIND_OF_OUTPUT[spec.kind]
        if spec.kind not in (INDEX, COMPARE, LOGICAL) and compute in (data_type.INT32, data_type.INT64):
            kind = "int"
        return self._append(Node(op, node_args, clean), kind)

    def __getattr__(self, op: str):
        if op not in OPS:
            raise AttributeError(f"cudnn_flex: the score_mod graph has no op {op!r}")

        def method(*args, **kwargs):
            return self.record(op, args, kwargs)
        method.__name__ = op
        return method


add_dsl_operators(Value, lambda v: v.recorder)


def _digest(key: tuple) -> int:
    """A 63-bit id of a structural key, stable across processes (plan store), never 0."""
    h = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return (int.from_bytes(h, "little") & ((1 << 63) - 1)) or 1


class Program:
    """A recorded score_mod (and its bprop): nodes, the forward result and the backward result.

    `mod_id` identifies the forward part (the score_mod), `bprop_id` the whole program (the
    score_mod plus its bprop; 0 when the backward passes dP through). Slots: the score_mod's
    tensors in order (`t0`, `t1`, ...; their data types in `mod_dtypes`), then the bprop's."""

    __slots__ = ("nodes", "fwd_out", "bwd_out", "mod_slots", "bprop_slots", "key", "mod_id",
                 "bprop_id", "bprop_error", "reads_head_or_key", "__weakref__")

    def __init__(self, nodes: list[Node], fwd_out: int, bwd_out: Optional[int], mod_slots: tuple,
                 bprop_slots: tuple, bprop_error: Optional[Exception] = None):
        self.nodes = tuple(nodes)
        self.fwd_out, self.bwd_out = fwd_out, bwd_out
        self.mod_slots, self.bprop_slots = tuple(mod_slots), tuple(bprop_slots)
        # A derived bprop that failed (an op without a rule): raised when a backward is built.
        self.bprop_error = bprop_error
        # Whether it reads the head or the key index (gen_index over axis 1 or 3), forward or
        # backward: cuDNN 9.19 computes those wrongly at one query row (_ops.needs_two_rows).
        self.reads_head_or_key = any(_reads_head_or_key(n) for n in self.nodes)
        node_keys = tuple(n.key() for n in self.nodes)
        fwd_key = (node_keys[:self.fwd_len()], fwd_out, self.mod_slots)
        self.key = (node_keys, fwd_out, bwd_out, self.mod_slots, self.bprop_slots)
        self.mod_id = _digest(fwd_key)
        if bprop_error is not None:
            self.bprop_id = _digest(self.key + ("bprop error",))
        else:
            self.bprop_id = 0 if bwd_out is None else _digest(self.key)

    def fwd_len(self) -> int:
        """Nodes up to the forward result: the forward part never reads a later node."""
        return _fwd_prefix(self.nodes)

    def __repr__(self) -> str:
        lines = [f"%{i} = {n!r}" + (f" as {n.out_dtype}" if n.out_dtype is not None else "")
                 for i, n in enumerate(self.nodes)]
        lines.append(f"forward -> %{self.fwd_out}")
        if self.bwd_out is not None:
            lines.append(f"backward -> %{self.bwd_out}")
        return "\n".join(lines)


def _reads_head_or_key(node: Node) -> bool:
    if node.op != "gen_index":
        return False
    axis = dict(node.attrs).get("axis")
    return axis is None or int(axis) in (1, 3)  # (no axis: taken as reading one)


def _fwd_prefix(nodes) -> int:
    """Length of the forward part: every node recorded before the bprop started (its dP input)."""
    for i, n in enumerate(nodes):
        if n.op == "input" and n.args[0][1] == D_P:
            return i
    return len(nodes)


def checked_result(result: Any, recorder: Recorder, role: str, who: str) -> int:
    if not isinstance(result, Value):
        raise TypeError(
            f"cudnn_flex: {who} returned {type(result).__name__}; a {role} must return the graph "
            "tensor it computed from its input (for example `return graph.mul(score, 0.5)` or "
            "`return score * 0.5`)")
    return recorder._arg(result, role, "return value")[1]
