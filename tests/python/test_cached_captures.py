"""A cached torch-style call whose mods capture tensors: the program is known without tracing the
mods again when their closures have the same structure and tensor metadata, and the tensors are
read from the closures where the recording found them. Anything that could make that stale is
traced on every call: a value read on the host, a tensor made inside the mod, one tensor held in
two places. Each call is checked against the formula with the values the tensors hold then (the
per-head terms are multiplied by kv_idx: a term constant along a row would not change softmax)."""

import collections

import pytest
import torch

import cudnn_flex
import oracle
from cudnn_flex import mods, torch_style

B, H, S, D = 1, 3, 9, 8


def qkv(seed=0, s=S):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, s, D, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.fixture
def traces(monkeypatch):
    """The number of torch-style traces so far."""
    count = [0]
    real = torch_style.trace

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(torch_style, "trace", counting)
    return count


def assert_matches(out, q, k, v, formula):
    want, _ = oracle.attention(q, k, v, formula)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)


def test_new_closures_over_new_tensors_are_not_traced_again(traces):
    q, k, v = qkv()
    for call, scale in enumerate((0.5, -1.0, 2.0)):
        slopes = torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64) * scale
        doc = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2]) if call % 2 else torch.tensor([0] * 4 + [1] * 5)
        out = cudnn_flex.flex_attention(q, k, v, mods.alibi(slopes), mask_mod=mods.document_mask(doc))
        assert_matches(out, q, k, v, lambda s, b, h, qi, ki: torch.where(
            doc[qi] == doc[ki], s + slopes[h] * (ki - qi), oracle.NEG_INF))
        if call == 0:
            first = traces[0]  # the recording, and its check over meta tensors
    assert traces[0] == first


def signed_by_sum(t):
    def mod(score, b, h, q_idx, kv_idx):
        sign = 1.0 if float(t.sum()) > 0 else -1.0  # a value read on the host
        return score + sign * t[h] * kv_idx
    return mod


def scaled_by_value(t):
    return lambda score, b, h, q_idx, kv_idx: score * float(t)  # t: one element, read as a number


def doubled_inside(t):
    return lambda score, b, h, q_idx, kv_idx: score + (t * 2)[h] * kv_idx  # a tensor made inside the mod


def same_or_other(a, c):
    return lambda score, b, h, q_idx, kv_idx: score + (a[h] + 2 * c[h]) * kv_idx


CASES = {  # name -> (the mod over tensors, the tensors, an in-place change, the formula)
    "value read on the host": (signed_by_sum, lambda: (torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64),),
                               lambda t: t.neg_(),
                               lambda t: lambda s, b, h, q, k: s + (1.0 if t.sum() > 0 else -1.0) * t[h] * k),
    "value read as a number": (scaled_by_value, lambda: (torch.tensor([0.5], dtype=torch.float64),),
                               lambda t: t.fill_(3.0), lambda t: lambda s, b, h, q, k: s * t.item()),
    "tensor made inside": (doubled_inside, lambda: (torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64),),
                           lambda t: t.mul_(-3.0), lambda t: lambda s, b, h, q, k: s + 2 * t[h] * k),
}


@pytest.mark.parametrize("name", CASES)
def test_what_could_go_stale_is_traced_every_call(name, traces):
    make, tensors, change, formula = CASES[name]
    q, k, v = qkv(1)
    held = tensors()
    assert_matches(cudnn_flex.flex_attention(q, k, v, make(*held)), q, k, v, formula(*held))
    before = traces[0]
    change(*held)
    assert_matches(cudnn_flex.flex_attention(q, k, v, make(*held)), q, k, v, formula(*held))
    assert traces[0] > before


def test_one_tensor_held_twice_then_two_tensors():
    q, k, v = qkv(2)
    t = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    out = cudnn_flex.flex_attention(q, k, v, same_or_other(t, t))
    assert_matches(out, q, k, v, lambda s, b, h, qi, ki: s + 3 * t[h] * ki)
    a, c = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), torch.tensor([-2.0, 0.5, 0.0], dtype=torch.float64)
    out = cudnn_flex.flex_attention(q, k, v, same_or_other(a, c))
    assert_matches(out, q, k, v, lambda s, b, h, qi, ki: s + (a[h] + 2 * c[h]) * ki)


def test_new_tensor_shape_or_dtype_records_again(traces):
    q, k, v = qkv(3, s=11)  # a shape no other test here records
    for slopes in (torch.ones(3, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                   torch.ones(3, dtype=torch.float32)):
        before = traces[0]
        out = cudnn_flex.flex_attention(q, k, v, mods.alibi(slopes))
        assert traces[0] > before
        assert_matches(out, q, k, v, lambda s, b, h, qi, ki: s + slopes[h].double() * (ki - qi))


def test_a_namedtuple_in_the_closure_is_traced_every_call():
    Params = collections.namedtuple("Params", "bias scale")
    q, k, v = qkv(4)
    for scale in (0.5, 2.0):
        p = Params(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), scale)
        out = cudnn_flex.flex_attention(q, k, v, lambda s, b, h, qi, ki: s * p.scale + p.bias[h] * ki)
        assert_matches(out, q, k, v, lambda s, b, h, qi, ki: s * p.scale + p.bias[h] * ki)


def branches_on_layout(t):
    return lambda score, b, h, q_idx, kv_idx: score + (t[h] if t.is_contiguous() else -t[h]) * kv_idx


def test_a_tensor_of_other_strides_records_again():
    q, k, v = qkv(5, s=7)
    dense = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)
    for t in (dense[:, 0].contiguous(), dense[:, 0]):  # same shape and dtype, stride 1 then 2
        out = cudnn_flex.flex_attention(q, k, v, branches_on_layout(t))
        assert_matches(out, q, k, v, lambda s, b, h, qi, ki: s + (t[h] if t.is_contiguous() else -t[h]) * ki)
