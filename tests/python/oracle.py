"""Expected values written out independently of cudnn_flex: attention on a materialized float64
score matrix, with the score_mod given as a formula in plain torch ops.

Nothing here imports cudnn_flex: an oracle never shares code with what it checks, so a bug in a
ready mod, in the tracer or in the reference path cannot sit on both sides of a comparison.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

NEG_INF = float("-inf")

# The standard ALiBi slopes 2^(-8 (h + 1) / H), as literal numbers (not computed).
ALIBI_SLOPES = {
    1: [0.00390625],
    2: [0.0625, 0.00390625],
    4: [0.25, 0.0625, 0.015625, 0.00390625],
    8: [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625],
}


def index_grids(b: int, h: int, s_q: int, s_kv: int):
    """b, h, q_idx, kv_idx as int64 tensors broadcastable to [B, H, Sq, Skv]."""
    return (torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1),
            torch.arange(s_q).view(1, 1, s_q, 1), torch.arange(s_kv).view(1, 1, 1, s_kv))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              formula: Optional[Callable] = None, scale: Optional[float] = None):
    """(out [B, H, Sq, Dv], lse [B, H, Sq]) of softmax(formula(S, b, h, q_idx, kv_idx)) V with
    S = scale * Q K^T (scale 1/sqrt(D) by default), for BHSD tensors.

    GQA/MQA: query head h reads key/value head h // (H_q / H_kv). A row whose scores are all -inf
    (fully masked, or Skv = 0) gives out 0 and lse -inf, as cudnn-flex documents. Differentiable."""
    b, h_q, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    kv_head = torch.arange(h_q) // (h_q // h_kv)
    k, v = k[:, kv_head], v[:, kv_head]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if formula is not None:
        s = formula(s, *index_grids(b, h_q, s_q, s_kv)).expand(b, h_q, s_q, s_kv)
    empty = (s == NEG_INF).all(dim=-1, keepdim=True)
    safe = torch.where(empty, 0.0, s)
    p = torch.softmax(safe, dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(safe, dim=-1).masked_fill(empty.squeeze(-1), NEG_INF)
    return torch.einsum("bhqk,bhkd->bhqd", p, v), lse
