"""Gathers by a computed index in torch-style mods, done ahead of the kernel.

cuDNN cannot gather inside the fused kernel. `offsets[doc_id[q_idx]]`, `rel_bias[q_idx - kv_idx +
offset]` or `spatial_bias[h, distances[b, q_idx, kv_idx]]` index a captured tensor by values that
depend only on the index variables and other captured tensors, never on the score: those index
values are computed here on the device (the recorded program evaluated on broadcast index grids,
in float64, so integers are exact), the gather runs as a torch op, and its result enters the
kernel as one more broadcast score_mod tensor. It costs one gather per call whose tensors changed
(a call with the same tensors at the same versions reuses the last result) and memory of the
broadcast shape of the indices: [Sq] for `offsets[doc_id[q_idx]]`, [Sq, Skv] for a relative
table, [B, H, Sq, Skv] for a per-graph bias (a warning says so once when that is large).
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import Sequence

import torch

from .program.record import SCORE, mod_slot
from .program.replay import Replay
from .reference import RefTensor, ReferenceGraph

# Gathered tensors above this size are worth a warning (materialised whenever their inputs change).
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


# id(gathered tensor), the index program, its entries and the scores' shape -> (the tensors read,
# their versions, the result): a call whose tensors are the same objects at the same versions gets
# the tensor gathered before, not a new copy. One entry per table and program; it goes with the table.
_reused: dict = {}


def gather(t: torch.Tensor, entries: Sequence, nodes, captures, full: tuple, view) -> torch.Tensor:
    """t indexed by `entries` (an axis number for an index variable, a node index for a computed
    value, or a Python int), as a tensor broadcastable to `full` = [B, H, Sq, Skv]; the previous
    result again when nothing it was made from changed."""
    read = [t] + [u for u, _ in captures]
    # Inference tensors have no version to compare; a result with an autograd history belongs to
    # one call's graph; in a CUDA graph capture the gather must be in the graph, so that replays
    # follow in-place updates.
    reusable = not any(u.is_inference() or u.requires_grad for u in read) and not (
        t.is_cuda and torch.cuda.is_current_stream_capturing())
    key = (id(t), tuple(entries), tuple(n.key() for n in nodes), tuple(axes for _, axes in captures), tuple(full))
    if reusable:
        seen = _reused.get(key)
        if seen is not None and all(ref() is u and version == u._version
                                    for ref, version, u in zip(seen[0], seen[1], read)):
            return seen[2]
    result = _materialise(t, entries, nodes, captures, full, view)
    if reusable:
        refs = [weakref.ref(t, lambda _: _reused.pop(key, None))] + [weakref.ref(u) for u in read[1:]]
        _reused[key] = (refs, [u._version for u in read], result)
    return result


def _materialise(t: torch.Tensor, entries: Sequence, nodes, captures, full: tuple, view) -> torch.Tensor:
    """The gather itself: index values on broadcast grids, then one advanced-indexing read of t."""
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
                      f"{list(result.shape)} tensor ({size >> 20} MiB) whenever its tensors change; index the "
                      "captured tensor by the index variables themselves where you can", stacklevel=4)
