"""Gathers by a computed index in torch-style mods, done ahead of the kernel.

cuDNN cannot gather inside the fused kernel. `offsets[doc_id[q_idx]]`, `rel_bias[q_idx - kv_idx +
offset]` or `spatial_bias[h, distances[b, q_idx, kv_idx]]` index a captured tensor by values that
depend only on the index variables and other captured tensors, never on the score: those index
values are computed here on the device (the recorded program evaluated on broadcast index grids,
in float64, so integers are exact), the gather runs as a torch op, and its result enters the
kernel as one more broadcast score_mod tensor. It costs one gather per call and memory of the
broadcast shape of the indices: [Sq] for `offsets[doc_id[q_idx]]`, [Sq, Skv] for a relative
table, [B, H, Sq, Skv] for a per-graph bias (a warning says so once when that is large).
"""

from __future__ import annotations

import types
import warnings
from typing import Sequence

import torch

from .program.record import SCORE, mod_slot
from .program.replay import Replay
from .reference import RefTensor, ReferenceGraph

# Gathered tensors above this size are worth a warning (they are materialised on every call).
LARGE_BYTES = 256 << 20
_warned_large = False


def reads_score(nodes, index: int) -> bool:
    """Whether node `index` depends on the score at all (even through floor or a comparison)."""
    stack, seen = [index], set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        node = nodes[i]
        if node.op == "input" and node.args[0][1] == SCORE:
            return True
        if node.op != "gen_index":  # an index reads the score's shape, not its value
            stack.extend(v for kind, v in node.args if kind == "n")
    return False


def gather(t: torch.Tensor, entries: Sequence, nodes, captures, full: tuple, view) -> torch.Tensor:
    """t indexed by `entries` (an axis number for an index variable, a node index for a computed
    value, or a Python int), as a tensor broadcastable to `full` = [B, H, Sq, Skv]."""
    graph = ReferenceGraph(full, t.device, torch.float64)
    slots = {SCORE: RefTensor(torch.zeros((1, 1, 1, 1), dtype=torch.float64, device=t.device), graph)}
    for i, (u, axes) in enumerate(captures):
        slots[mod_slot(i)] = RefTensor(view(u, axes, full, f"capture {i}").to(t.device, torch.float64), graph)
    replay = Replay(types.SimpleNamespace(nodes=nodes), graph, slots)
    index = []
    for kind, value in entries:
        if kind == "axis":
            shape = [1, 1, 1, 1]
            shape[value] = full[value]
            index.append(torch.arange(full[value], device=t.device).view(shape))
        elif kind == "node":
            index.append(replay.value(value).value.to(torch.float64).round().long())
        else:
            index.append(torch.tensor(value, device=t.device))
    result = t[tuple(torch.broadcast_tensors(*index))]
    if result.dim() < 4:
        result = result.reshape((1,) * (4 - result.dim()) + tuple(result.shape))
    _warn_if_large(result)
    return result


def _warn_if_large(result: torch.Tensor) -> None:
    global _warned_large
    size = result.numel() * 4  # passed to cuDNN as float32
    if size > LARGE_BYTES and not _warned_large:
        _warned_large = True
        warnings.warn(f"cudnn_flex: a gather by a computed index in the score_mod is materialised as a "
                      f"{list(result.shape)} tensor ({size >> 20} MiB) on every call; index the "
                      "captured tensor by the index variables themselves where you can", stacklevel=4)
