"""Recognised masks lowered in the form cuDNN skips tiles for.

A band (causal, sliding window, their offsets; masks/recognize.py) written as the user wrote it
lowers to selects over compares that cuDNN computes on every tile. Lowered instead as the
frontend's diagonal band mask (the bridge's private `_band_mask`, after the user's other ops, as the
frontend orders them), cuDNN skips the tiles outside the band, as for its native causal and
sliding-window masks. The values are the same: the band keeps exactly the scores the recorded
selects keep and fills the rest with -inf, as they do. A backward graph with a bprop (softcap +
window) masks the tile padding after the band (csrc/score_mod_bridge.h): the frontend puts the
padding before the band, and whether cuDNN still skips tiles in that order is not measured yet
(the values were checked on the H100).

Only the cuDNN lowering reads this; the reference path evaluates the recorded program itself.
"""

from __future__ import annotations

from typing import Any, Optional

from ..program.record import Program
from ..program.replay import Replay
from .recognize import Band, band


# Bounds beyond any sequence length: the band node takes them as INT32 (and FLOAT) constants.
_FAR = 2 ** 30


def tile_skipping_band(program: Program) -> Optional[Band]:
    """The band of the program's forward that cuDNN can skip tiles for, or None (the dense
    lowering). A bound no length reaches is dropped (it keeps every score, and would overflow
    the node's INT32 constant); an empty band (hi < lo, or a bound that keeps nothing) stays
    dense: it has no diagonal."""
    found = band(program)
    if found is None:
        return None
    lo, hi = found.lo, found.hi
    if (lo is not None and lo > _FAR) or (hi is not None and hi < -_FAR):
        return None
    lo = None if lo is not None and lo < -_FAR else lo
    hi = None if hi is not None and hi > _FAR else hi
    if (lo is None and hi is None) or (lo is not None and hi is not None and hi < lo):
        return None
    return Band(lo, hi, found.inner)


def lower_forward(replay: Replay) -> Any:
    """The forward result of the replay's program on its graph: the user's other ops, then the
    band as the frontend's diagonal band mask where the mask is a recognised band."""
    program = replay.program
    found = tile_skipping_band(program)
    if found is None:
        return replay.value(program.fwd_out)
    return replay.graph._band_mask(replay.value(found.inner), lo=found.lo, hi=found.hi)
