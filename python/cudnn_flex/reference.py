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
from .program.ops import COMPARE, INDEX, LOGICAL, OPS, SELECT, add_dsl_operators, bind

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


add_dsl_operators(RefTensor, lambda t: t.graph)


class ReferenceGraph:
    """Mirror of the bridge graph (cudnn_flex.Graph) that computes with torch instead of building.
    Its methods come from the op table (program/ops.py), one per op."""

    def __init__(self, score_shape, device, float_dtype=torch.float32):
        self.shape = tuple(score_shape)
        self.device = device
        self.float_dtype = float_dtype

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

    def _compute(self, compute_data_type, default=data_type.FLOAT):
        dt = default if compute_data_type in (None, data_type.NOT_SET) else compute_data_type
        td = _TORCH_DTYPE[dt]
        return self.float_dtype if td.is_floating_point else td

    def _run(self, op: str, args: tuple, kwargs: dict) -> RefTensor:
        spec = OPS[op]
        inputs, attrs, compute = bind(op, args, kwargs)
        vals = [self._value(x, op, name) for x, name in zip(inputs, spec.inputs)]
        if spec.kind == INDEX:
            axis = attrs["axis"]
            shape = [1, 1, 1, 1]
            shape[axis] = self.shape[axis]
            out = torch.arange(self.shape[axis], device=self.device, dtype=torch.int32).view(shape)
        elif spec.kind == COMPARE:
            ctype = self._compute(compute)
            out = spec.value(vals[0].to(ctype), vals[1].to(ctype))
        elif spec.kind == LOGICAL:
            out = spec.value(*[v != 0 for v in vals])
        elif spec.kind == SELECT:
            out = torch.where(vals[2] != 0, vals[0].to(self.float_dtype), vals[1].to(self.float_dtype))
        else:
            ctype = self._compute(compute)
            out = spec.value(*[v.to(ctype) for v in vals], **attrs)
            if not ctype.is_floating_point and out.is_floating_point():
                out = out.trunc().to(ctype)
        return RefTensor(out, self)


def _reference_method(op: str):
    def method(self, *args, **kwargs):
        return self._run(op, args, kwargs)
    method.__name__ = op
    return method


for _op in OPS:
    setattr(ReferenceGraph, _op, _reference_method(_op))


def expand_kv_heads(t: torch.Tensor, h_q: int) -> torch.Tensor:
    """GQA/MQA: repeat each K/V head for the query heads that share it."""
    return t if t.shape[1] == h_q else t.repeat_interleave(h_q // t.shape[1], dim=1)


def _past(lengths: Optional[torch.Tensor], size: int, device) -> Optional[torch.Tensor]:
    """[B, 1, size, 1]: where a position is at or past lengths[b] (None without lengths)."""
    if lengths is None:
        return None
    return (torch.arange(size, device=device) >= lengths.to(device).view(-1, 1, 1)).unsqueeze(-1)


def _zero_past(x: torch.Tensor, past: Optional[torch.Tensor]) -> torch.Tensor:
    """x [B, H, S, D] with the rows `past` marks set to 0 (no gradient reaches them)."""
    return x if past is None else torch.where(past, 0.0, x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              score_mod: Optional[Callable] = None,
              score_mod_tensors: Optional[Mapping[str, torch.Tensor]] = None,
              scale: Optional[float] = None, float_dtype: torch.dtype = torch.float32,
              kv_lengths: Optional[torch.Tensor] = None, q_lengths: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention on BHSD tensors with score_mod, in float_dtype. Returns (out, lse [B,H,Sq]).

    Rows in which every score is -inf give out = 0 and lse = -inf, as cuDNN does. With kv_lengths
    ([B] integers), keys at kv_idx >= kv_lengths[b] are masked after the score_mod (padded
    batches, packed sequences); with q_lengths, so are the rows at q_idx >= q_lengths[b].
    """
    h_q = q.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    qf = q.to(float_dtype)
    kf = expand_kv_heads(k, h_q).to(float_dtype)
    vf = expand_kv_heads(v, h_q).to(float_dtype)
    # Padding past a length is zeroed before it is read: whatever it holds (torch.empty's NaN)
    # must not reach the valid rows through 0 * NaN, forward or backward.
    past_kv, past_q = _past(kv_lengths, kf.shape[2], kf.device), _past(q_lengths, qf.shape[2], qf.device)
    kf, vf, qf = _zero_past(kf, past_kv), _zero_past(vf, past_kv), _zero_past(qf, past_q)
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
    if past_kv is not None:
        scores = scores.masked_fill(past_kv.transpose(-1, -2), float("-inf"))  # [B, 1, 1, Skv]
    if past_q is not None:
        scores = scores.masked_fill(past_q, float("-inf"))  # [B, 1, Sq, 1]
    lse = torch.logsumexp(scores, dim=-1)
    # Fully masked rows (lse = -inf) give 0 as cuDNN does; NaN or inf in the inputs propagate.
    empty_row = (lse == float("-inf")).unsqueeze(-1)
    # softmax, not exp(scores - lse): with huge finite fills (torch.finfo.min) lse absorbs
    # log(row length) and exp(scores - lse) would not sum to 1.
    probs = torch.where(empty_row, 0.0, torch.softmax(torch.where(empty_row, 0.0, scores), dim=-1))
    return probs @ vf, lse


def attention_program(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, program,
                      mod_tensors=(), scale: Optional[float] = None,
                      float_dtype: Optional[torch.dtype] = None,
                      kv_lengths: Optional[torch.Tensor] = None, q_lengths: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """attention() of a recorded program (what flex_attention runs off cuDNN): the program's
    forward evaluated on the materialized scores, with mod_tensors in slot order; by default in
    float64 for float64 inputs, float32 otherwise."""
    if float_dtype is None:
        float_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    from .program.record import SCORE, mod_slot
    from .program.replay import evaluate

    def score_mod(graph, score, tensors):
        slots = {SCORE: score}
        for i, t in enumerate(mod_tensors):
            t = t.to(score.value.device)
            slots[mod_slot(i)] = RefTensor(t.to(float_dtype) if t.is_floating_point() else t, graph)
        return evaluate(program, graph, slots)
    return attention(q, k, v, None if program is None else score_mod, None, scale, float_dtype, kv_lengths,
                     q_lengths)
