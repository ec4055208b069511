"""One query row (a decode step) of a program that reads the head or key index, at one row.

cuDNN 9.19 computes the key index, and the head index under GQA, wrongly inside a score_mod when
the query dim is 1 (_ops.needs_two_rows), yet it reads score_mod tensors indexed by them right
there (measured on the H200). So a forward that needs no backward runs its program's forward with
each such index read from an int32 tensor instead: [1, H, 1, 1] holding 0..H-1 for the head,
[1, 1, 1, Skv] holding 0..Skv-1 for the key, the values gen_index gives on the call's scores.
That spares the second query row (its copy, cuDNN's two-row kernel and the narrowing): ALiBi
and relative-position decode steps. What stays at two rows: calls with a backward (cuDNN's
backward was not measured with these inputs), one key, a recognised band (two rows keep its
tile skipping), an index with a compute type of its own, and torch.compile (the program is not
at hand where the op runs).

The index tensors are views of one int32 arange per device, made outside any CUDA graph capture
and complete before any stream reads it, never written and never freed (a captured graph reads
them at each replay); a longer one is made when a call needs more.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from . import _registry
from .masks.lower import tile_skipping_band
from .program.record import Node, Program, mod_slot, reads_head_or_key

_HEAD, _KEY = 1, 3
# The derived programs' extra slots (part of their signature, so of their ids).
_SLOT_NAMES = {_HEAD: "cudnn_flex head index", _KEY: "cudnn_flex key index"}
_NO_BACKWARD = RuntimeError("cudnn_flex: internal error: the one-row forward of a program was asked for a "
                            "backward (one_query_row.py runs it only where none is needed)")


class OneRowForm:
    """A program's forward at one query row: the derived program and the index axes its extra
    input slots read, in slot order."""

    __slots__ = ("program", "axes")

    def __init__(self, program: Program, axes: tuple):
        self.program, self.axes = program, axes


def one_row_form(program: Program) -> Optional[OneRowForm]:
    """The program's forward with its head and key indices as input slots (after the program's
    own), or None where it stays at two rows (the module docstring). Made once per program, kept
    with it, and known to the op's lookup while the program lives."""
    form = program.one_row_form
    if form is None:
        form = program.one_row_form = _derive(program) or False
        if form:
            _registry.keep_while_held(form.program)
    return form or None


def _derive(program: Program) -> Optional[OneRowForm]:
    if tile_skipping_band(program) is not None:
        return None
    nodes = list(program.nodes[:program.fwd_len()])
    slots = list(program.mod_slots)
    slot_of_axis: dict[int, int] = {}
    for i, node in enumerate(nodes):
        if not reads_head_or_key(node):
            continue
        attrs = dict(node.attrs)
        if set(attrs) != {"axis"} or node.out_dtype is not None:
            return None  # not the plain INT32 index an int32 tensor stands for
        axis = int(attrs["axis"])
        if axis not in slot_of_axis:
            slot_of_axis[axis] = len(slots)
            slots.append((_SLOT_NAMES[axis], str(torch.int32)))
        nodes[i] = Node("input", (("s", mod_slot(slot_of_axis[axis])),))
    derived = Program(nodes, program.fwd_out, None, tuple(slots), program.bprop_slots, bprop_error=_NO_BACKWARD)
    return OneRowForm(derived, tuple(sorted(slot_of_axis, key=slot_of_axis.get)))


# device -> the int32 aranges made for it, the last the longest (the others stay alive: a captured
# CUDA graph may read them); (device, axes, heads, keys) -> the index tensors of such calls.
_aranges: dict = {}
_views: dict = {}
_MAX_VIEWS = 256
_lock = threading.Lock()


def index_tensors(form: OneRowForm, heads: int, s_kv: int, device: torch.device) -> Optional[list]:
    """The index tensors of form's extra slots for a call over heads x s_kv scores, or None when
    none can be made now (under a CUDA graph capture or a mode that makes no real tensor: the
    call runs two rows)."""
    key = (device, form.axes, heads, s_kv)
    views = _views.get(key)
    if views is not None:
        return views
    longest = _arange(device, max(heads if _HEAD in form.axes else 0, s_kv if _KEY in form.axes else 0))
    if longest is None:
        return None
    views = [longest[:heads].view(1, heads, 1, 1) if axis == _HEAD else longest[:s_kv].view(1, 1, 1, s_kv)
             for axis in form.axes]
    if len(_views) < _MAX_VIEWS:
        _views[key] = views
    return views


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _arange(device: torch.device, length: int) -> Optional[torch.Tensor]:
    made = _aranges.get(device)
    if made and made[-1].shape[0] >= length:
        return made[-1]
    if _capturing(device):
        return None  # a capture cannot wait for the fill (a later call outside it makes it)
    with torch.inference_mode(False):  # read by calls with autograd on too
        longest = torch.arange(max(length, 2 * made[-1].shape[0] if made else 1024), dtype=torch.int32,
                               device=device)
    if type(longest) is not torch.Tensor:
        return None
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # another stream may read it next
    with _lock:
        made = _aranges.setdefault(device, [])
        if not made or made[-1].shape[0] < longest.shape[0]:
            made.append(longest)
        return made[-1]
