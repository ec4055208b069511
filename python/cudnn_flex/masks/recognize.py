"""Mask recognition: which recorded programs are a diagonal band (causal, sliding window).

cuDNN skips whole tiles for causal and sliding-window masks written in the frontend's own index
pattern (../shared/reference/cudnn_masks.md), not for an arbitrary select. This module reads a
recorded program (however the mask was written: `mods.sliding_window(1024)`, a user's
`(q >= kv) & (q - kv < 1024)`, a DSL select chain) and finds the band it keeps, as bounds on
d = q_idx - kv_idx: causal is d >= 0, a causal window of w is 0 <= d <= w - 1, a two-sided
window |d| <= w. Anything that is not exactly such a band (an extra condition, a non-unit
coefficient, a score-dependent mask) is not recognised and keeps the dense path.

The lowering that emits the tile-skipping form from a recognised band (the masks issue) reads
`Band`; nothing here changes what runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..program.record import Program

NEG_INF = float("-inf")


@dataclass(frozen=True)
class Band:
    """score where lo <= q_idx - kv_idx <= hi (None: unbounded), -inf elsewhere; `inner` is the
    node of the score before the mask (the user's other ops)."""
    lo: Optional[int]
    hi: Optional[int]
    inner: int

    @property
    def causal(self) -> bool:
        return self.lo == 0 and self.hi is None


# A linear form in the index variables: (coefficient of q_idx, of kv_idx, constant).
_Linear = tuple


def _linear(program: Program, index: int, memo: dict) -> Optional[_Linear]:
    """The node as c_q * q_idx + c_kv * kv_idx + c, or None when it is not such a form."""
    if index in memo:
        return memo[index]
    node = program.nodes[index]
    args = node.args
    out = None
    if node.op == "gen_index" and dict(node.attrs).get("compute_data_type") is None:
        axis = dict(node.attrs)["axis"]
        out = {2: (1.0, 0.0, 0.0), 3: (0.0, 1.0, 0.0)}.get(axis)
    elif node.op in ("add", "sub", "mul", "identity", "neg"):
        forms = [(_constant_form(v) if kind == "c" else _linear(program, v, memo)) for kind, v in args]
        if all(f is not None for f in forms):
            if node.op == "identity":
                out = forms[0]
            elif node.op == "neg":
                out = tuple(-x for x in forms[0])
            elif node.op == "add":
                out = tuple(a + b for a, b in zip(*forms))
            elif node.op == "sub":
                out = tuple(a - b for a, b in zip(*forms))
            else:  # mul: one side must be a constant
                (a, b) = forms
                if a[:2] == (0.0, 0.0):
                    out = tuple(a[2] * x for x in b)
                elif b[:2] == (0.0, 0.0):
                    out = tuple(b[2] * x for x in a)
    memo[index] = out
    return out


def _constant_form(value: float) -> _Linear:
    return (0.0, 0.0, float(value))


def _bounds_of_compare(program: Program, index: int, memo: dict) -> Optional[tuple]:
    """(lo, hi) on d = q - kv for a comparison node that constrains only d, else None."""
    node = program.nodes[index]
    ops = {"cmp_ge": ">=", "cmp_gt": ">", "cmp_le": "<=", "cmp_lt": "<"}
    if node.op in ops:
        (ka, a), (kb, b) = node.args
        fa = _constant_form(a) if ka == "c" else _linear(program, a, memo)
        fb = _constant_form(b) if kb == "c" else _linear(program, b, memo)
        if fa is None or fb is None:
            return None
        cq, ckv, c = (x - y for x, y in zip(fa, fb))  # (a - b) OP 0
        if (cq, ckv) == (-1.0, 1.0):  # turn -(d) + c OP 0 into d OP' c
            cq, ckv, c, op = 1.0, -1.0, -c, {">=": "<=", ">": "<", "<=": ">=", "<": ">"}[ops[node.op]]
        elif (cq, ckv) == (1.0, -1.0):
            op = ops[node.op]
        else:
            return None
        # d + c OP 0  <=>  d OP -c, over integers
        bound = -c
        if bound != math.floor(bound):
            lo_hi = {">=": (math.ceil(bound), None), ">": (math.ceil(bound), None),
                     "<=": (None, math.floor(bound)), "<": (None, math.floor(bound))}
            return lo_hi[op]
        bound = int(bound)
        return {">=": (bound, None), ">": (bound + 1, None), "<=": (None, bound), "<": (None, bound - 1)}[op]
    return None


def _abs_bounds(program: Program, index: int, memo: dict) -> Optional[tuple]:
    """|q - kv| <= w (or < w), the two-sided window."""
    node = program.nodes[index]
    if node.op not in ("cmp_le", "cmp_lt"):
        return None
    (ka, a), (kb, b) = node.args
    if ka != "n" or kb != "c" or program.nodes[a].op != "abs":
        return None
    (kx, x), = program.nodes[a].args
    form = _linear(program, x, memo) if kx == "n" else None
    if form is None or abs(form[0]) != 1.0 or form[1] != -form[0] or form[2] != 0.0:
        return None
    w = math.floor(b) if node.op == "cmp_le" else math.ceil(b) - 1
    return (-w, w)


def _conjunction(program: Program, index: int, memo: dict) -> Optional[tuple]:
    """(lo, hi) for a mask that is an AND of comparisons of d, else None."""
    node = program.nodes[index]
    if node.op == "logical_and":
        parts = [_conjunction(program, v, memo) for kind, v in node.args if kind == "n"]
        if len(parts) != 2 or None in parts:
            return None
        return _intersect(*parts)
    return _bounds_of_compare(program, index, memo) or _abs_bounds(program, index, memo)


def _negated(bounds: Optional[tuple]) -> Optional[tuple]:
    """The bounds of `not (one comparison of d)`: d >= lo becomes d <= lo - 1 and the reverse;
    the negation of a two-sided condition is no band."""
    if bounds is None:
        return None
    lo, hi = bounds
    if hi is None:
        return (None, lo - 1)
    if lo is None:
        return (hi + 1, None)
    return None


def _intersect(a: tuple, b: tuple) -> tuple:
    lo = max((x for x in (a[0], b[0]) if x is not None), default=None)
    hi = min((x for x in (a[1], b[1]) if x is not None), default=None)
    return (lo, hi)


def band(program: Program) -> Optional[Band]:
    """The band the program's forward keeps, or None when it is not exactly a band mask."""
    memo: dict = {}
    index = program.fwd_out
    bounds: tuple = (None, None)
    found = False
    # A chain of selects against -inf, outermost first: each one ANDs its condition in
    # (`torch.where(m, s, -inf)`, or `torch.where(m, -inf, s)` with m one comparison).
    while True:
        node = program.nodes[index]
        if node.op != "binary_select":
            break
        (k0, a0), (k1, a1), (k2, mask) = node.args
        if k2 != "n":
            return None
        if k1 == "c" and a1 == NEG_INF and k0 == "n":  # select(score, -inf, mask): keep where mask
            keep, part = a0, _conjunction(program, mask, memo)
        elif k0 == "c" and a0 == NEG_INF and k1 == "n":  # select(-inf, score, mask): keep where not mask
            keep, part = a1, _negated(_bounds_of_compare(program, mask, memo))
        else:
            return None
        if part is None:
            return None
        bounds = _intersect(bounds, part)
        found = True
        index = keep
    if not found or bounds == (None, None):
        return None
    return Band(bounds[0], bounds[1], index)
