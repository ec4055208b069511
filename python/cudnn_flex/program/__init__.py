"""The recorded program of a score_mod: one small list of ops with constants and input slots,
with a structural digest. The graph key, the cuDNN lowering, the reference, the derived bprop
all read it (DESIGN.md, "One recorded program")."""

from .autodiff import BpropNotDerivable
from .ops import OPS, OpSpec
from .record import Node, Program, Recorder, Value
from .replay import Replay, evaluate

__all__ = ["BpropNotDerivable", "Node", "OPS", "OpSpec", "Program", "Recorder", "Replay", "Value", "evaluate"]
