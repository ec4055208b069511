"""program/captures.py: where a torch-style mod keeps its captured tensors (the path a compiled
call fetches them by), and the constant description a mod is recorded from under torch.compile."""

import types

import torch

from cudnn_flex import _registry
from cudnn_flex.program import captures

TABLE = torch.arange(6.0)


class Holder:
    def __init__(self):
        self.bias = {"rel": torch.ones(3)}

    def __call__(self, score, b, h, q, kv):
        return score + self.bias["rel"][q]


def test_paths_lead_back_to_each_kind_of_capture():
    cell, default, kw = torch.zeros(2), torch.zeros(3), torch.zeros(4)

    def mod(score, b, h, q, kv, d=default, *, k=kw):
        return score + cell[q] + d[kv] + k[h] + TABLE[b]

    holder = Holder()
    roots = (mod, holder)
    for tensor in (cell, default, kw, TABLE, holder.bias["rel"]):
        path = captures.path_to(roots, tensor)
        assert path is not None and captures.fetch(roots, path) is tensor
    assert captures.path_to(roots, torch.zeros(1)) is None


def test_a_described_mod_is_rebuilt_with_placeholders_of_its_tensors():
    doc = torch.tensor([0, 0, 1])

    def make(c):
        def mask(b, h, q, kv, *, scale=c):
            return (doc[q] == doc[kv]) & (q * scale >= kv)
        return mask

    desc = captures.describe(make(2), _registry.constant_form)
    hash(desc)  # a constant dynamo can pass
    rebuilt = captures.rebuild(desc, _registry.from_constant_form)
    assert isinstance(rebuilt, types.FunctionType) and rebuilt.__code__ is make(2).__code__
    placeholder = rebuilt.__closure__[0].cell_contents
    assert placeholder.device.type == "meta" and placeholder.dtype == doc.dtype and placeholder.dim() == 1
    assert rebuilt.__kwdefaults__ == {"scale": 2}
