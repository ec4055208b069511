"""Recognised masks lowered in the form cuDNN skips tiles for.

A band (causal, sliding window, their offsets; masks/recognize.py) written as the user wrote it
lowers to selects over compares that cuDNN computes on every tile. Lowered instead as the
frontend's diagonal band mask (the bridge's private `_band_mask`, after the user's other ops, as the
frontend orders them), cuDNN skips the tiles outside the band: forward and backward run at the
speed of its native causal and sliding-window masks. The values are the same: the band keeps
exactly the scores the recorded selects keep and fills the rest with -inf, as they do.

Only the cuDNN lowering reads this; the reference path evaluates the recorded program itself.
"""

from __future__ import annotations

from typing import Any, Optional

from ..program.record import Program
from ..program.replay import Replay
from .recognize import Band, band


def tile_skipping_band(program: Program) -> Optional[Band]:
    """The band of the program's forward that cuDNN can skip tiles for, or None (the dense
    lowering). An empty band (hi < lo: every score masked) stays dense: it has no diagonal."""
    found = band(program)
    if found is None:
        return None
    if found.lo is not None and found.hi is not None and found.hi < found.lo:
        return None
    return found


def lower_forward(replay: Replay) -> Any:
    """The forward result of the replay's program on its graph: the user's other ops, then the
    band as the frontend's diagonal band mask where the mask is a recognised band."""
    program = replay.program
    found = tile_skipping_band(program)
    if found is None:
        return replay.value(program.fwd_out)
    return replay.graph._band_mask(replay.value(found.inner), lo=found.lo, hi=found.hi)
