"""A shadow run of a DSL mod for torch.compile: what the mod reads becomes a guard.

Under torch.compile the program is recorded once, outside dynamo (its ids are constants of the
graph), so dynamo would not see what the mod reads: a global or closure value could change and
the compiled graph keep the old program. Running the mod on Shadow values *inside* the traced
code makes dynamo inline it and guard every value it reads; the trail of ops and numbers it
returns is passed, as a constant, to the recording, so a change recompiles and records anew.
Numbers enter the trail through float.hex(), which makes dynamo specialise on them (a float it
has seen change would otherwise become symbolic and unguarded).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from .ops import OPS, add_dsl_operators


class Shadow:
    """Stands in for the graph and its tensors: each op appends (op, inputs, attributes)."""

    def __init__(self, trail: list, index: int):
        self.trail, self.index = trail, index

    def set_data_type(self, dt):
        self.trail.append(("set_data_type", self.index))
        return self

    def get_data_type(self):
        return None

    def set_name(self, name):
        return self

    def get_dim(self):
        return []


def _entry(x):
    if isinstance(x, Shadow):
        return x.index
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x).hex()
    return "other"


def _op(name: str):
    def method(self, *args, **kwargs):
        items = tuple(_entry(a) for a in args) + tuple((k, _entry(v)) for k, v in sorted(kwargs.items())
                                                       if k != "compute_data_type")
        self.trail.append((name,) + items)
        return Shadow(self.trail, len(self.trail))
    method.__name__ = name
    return method


for _name in OPS:
    setattr(Shadow, _name, _op(_name))
add_dsl_operators(Shadow, lambda value: value)


def trail(score_mod: Optional[Callable], score_mod_bprop: Optional[Callable], mod_names: Sequence[str],
          bprop_names: Sequence[str]) -> tuple:
    """The ops and numbers the mods produce on shadow values (run inline by dynamo)."""
    if score_mod is None:
        return ()
    ops: list = []
    root = Shadow(ops, 0)
    score_mod(root, root, {name: Shadow(ops, -1 - i) for i, name in enumerate(mod_names)})
    if score_mod_bprop is not None:
        score_mod_bprop(root, root, {name: Shadow(ops, -100 - i) for i, name in enumerate(bprop_names)})
    return tuple(ops)
