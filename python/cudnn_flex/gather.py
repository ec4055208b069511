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

import collections
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


# id(gathered tensor) -> {what was gathered (the index program, its entries and the scores'
# shape, on which stream) -> (the tensors read, their versions, the result)}. A call that gathers
# the same from the same tensor objects at the same versions gets the tensor gathered before, not
# a new copy. The last _PER_TABLE results per table (a mask may gather twice from one table:
# offsets[doc[q_idx]] and offsets[doc[kv_idx]]), kept while the table lives. A write the version
# counter does not see (through .data, numpy or DLPack) is not seen here either, as with every
# in-place check of torch (autograd's included).
_reused: dict = {}
_PER_TABLE = 4


def gather(t: torch.Tensor, entries: Sequence, nodes, captures, full: tuple, view) -> torch.Tensor:
    """t indexed by `entries` (an axis number for an index variable, a node index for a computed
    value, or a Python int), as a tensor broadcastable to `full` = [B, H, Sq, Skv]; the previous
    result again when nothing it was made from changed."""
    read = [t] + [u for u, _ in captures]
    # Inference tensors have no version to compare, and a result made in inference mode cannot be
    # saved for a later backward; a result with an autograd history belongs to one call's graph;
    # in a CUDA graph capture the gather must be in the graph, so that replays follow in-place
    # updates.
    reusable = not (torch.is_inference_mode_enabled() or any(u.is_inference() or u.requires_grad for u in read)
                    or (t.is_cuda and torch.cuda.is_current_stream_capturing()))
    if not reusable:
        return _materialise(t, entries, nodes, captures, full, view)
    # The stream too: a result is read without waiting only on the stream that wrote it.
    stream = torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else None
    what = (tuple(entries), tuple(n.key() for n in nodes), tuple(axes for _, axes in captures), tuple(full), stream)
    tid = id(t)
    owner, results = _reused.get(tid, (None, None))
    if owner is None or owner() is not t:
        owner, results = weakref.ref(t, lambda _: _reused.pop(tid, None)), collections.OrderedDict()
        _reused[tid] = (owner, results)
    seen = results.get(what)
    if seen is not None and all(ref() is u and version == u._version for ref, version, u in zip(seen[0], seen[1], read)):
        results.move_to_end(what)
        return seen[2]
    result = _materialise(t, entries, nodes, captures, full, view)
    results[what] = ([weakref.ref(u) for u in read], [u._version for u in read], result)
    results.move_to_end(what)
    if len(results) > _PER_TABLE:
        results.popitem(last=False)
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
