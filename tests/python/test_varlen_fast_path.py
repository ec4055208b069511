"""The shortcut of a repeated flex_attention_varlen call (fast_path.py), on the CPU with cuDNN's op
replaced by a stub (stub_op.py): a repeat with the same mods, the same cu_seqlens tensors at the
same versions and the same shapes runs the op with exactly what the full path gave it; anything
else takes the full path."""

import gc
import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import cudnn_flex
from cudnn_flex import dsl_mods, fast_path, mods
from dsl_tensor_mods import masked_by, scaled_by, scaled_by_bprop
from length_mods import cu_seqlens
from stub_op import assert_batches_keep_nothing, is_the_op, op, then_once  # noqa: F401  (op: a fixture)

H, H_KV, D = 4, 2, 16
LENGTHS = [3, 1, 5]  # no two equal: the packed (ragged) path, not a batch of views




def tokens(lengths=LENGTHS):
    total = sum(lengths)
    return [torch.randn(total, h, D, dtype=torch.bfloat16) for h in (H, H_KV, H_KV)]


def call(q, k, v, cu, **kw):
    kw.setdefault("max_seqlen_q", max(LENGTHS))
    kw.setdefault("max_seqlen_kv", max(LENGTHS))
    return cudnn_flex.flex_attention_varlen(q, k, v, cu, cu, **kw)


def same_op_arguments(a, b):
    """Two calls of the stub gave the op the same lengths (values), cu_seqlens (objects) and options."""
    assert [x.tolist() for x in a["seq_lens"]] == [x.tolist() for x in b["seq_lens"]]
    assert all(x is y for x, y in zip(a["cu_seqlens"], b["cu_seqlens"]))
    assert (a["max_seqlens"], a["scale"], a["deterministic"]) == (b["max_seqlens"], b["scale"], b["deterministic"])


_CAP = dsl_mods.softcap(20.0)
KINDS = {
    "no mod": {},
    "DSL function": {"score_mod": dsl_mods.causal},
    "torch-style closure": {"score_mod": mods.softcap(20.0)},
    "mask_mod": {"mask_mod": mods.causal},
    "keyed object's methods": {"score_mod": _CAP.forward, "score_mod_bprop": _CAP.backward},
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_repeat_takes_the_shortcut_with_the_full_paths_arguments(op, kind):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    for _ in range(3):
        call(q, k, v, cu, scale=0.5, deterministic=True, **KINDS[kind])
    assert op.records == 1
    assert op.ids[0] == op.ids[1] == op.ids[2]
    same_op_arguments(op.calls[0], op.calls[1])
    assert op.calls[1]["seq_lens"][0].tolist() == LENGTHS
    assert op.calls[1]["scale"] == 0.5 and op.calls[1]["deterministic"] is True


def test_a_new_cu_seqlens_tensor_takes_the_full_path(op):
    """(One tensor per batch, as a training loop makes them: read in full once, then each layer's
    call with it takes the shortcut.)"""
    q, k, v = tokens()
    call(q, k, v, cu_seqlens(LENGTHS), mask_mod=mods.causal)
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu, mask_mod=mods.causal)
    call(q, k, v, cu, mask_mod=mods.causal)
    assert op.records == 2


def test_cu_seqlens_changed_in_place_are_read_again(op):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu, mask_mod=mods.causal)
    new = [5, 3, 1]
    cu.copy_(cu_seqlens(new))  # the same total: only the values tell
    call(q, k, v, cu, mask_mod=mods.causal)
    assert op.records == 2
    assert op.calls[1]["seq_lens"][0].tolist() == new and op.calls[1]["seq_lens"][1].tolist() == new
    call(q, k, v, cu, mask_mod=mods.causal)
    assert op.records == 2 and op.calls[2]["seq_lens"][0].tolist() == new


def test_cu_seqlens_kv_is_checked_as_well_as_q(op):
    q, k, v = tokens()
    cu_q, cu_kv = cu_seqlens(LENGTHS), cu_seqlens(LENGTHS)
    varlen = lambda cu_kv: cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, max_seqlen_q=5,  # noqa: E731
                                                            max_seqlen_kv=5)
    for _ in range(2):
        varlen(cu_kv)
    varlen(cu_seqlens([1, 5, 3]))  # another tensor at the same version
    assert op.records == 2 and op.calls[2]["seq_lens"][1].tolist() == [1, 5, 3]
    cu_kv = cu_seqlens(LENGTHS)
    varlen(cu_kv)
    cu_kv.copy_(cu_seqlens([5, 1, 3]))  # changed in place
    varlen(cu_kv)
    assert op.records == 4 and op.calls[4]["seq_lens"][1].tolist() == [5, 1, 3]


def test_a_new_cu_seqlens_q_with_the_same_cu_seqlens_kv(op):
    q, k, v = tokens()
    cu_q, cu_kv = cu_seqlens(LENGTHS), cu_seqlens(LENGTHS)
    for _ in range(2):
        cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, max_seqlen_q=5, max_seqlen_kv=5)
    cudnn_flex.flex_attention_varlen(q, k, v, cu_seqlens([5, 3, 1]), cu_kv, max_seqlen_q=5, max_seqlen_kv=5)
    assert op.records == 2 and op.calls[2]["seq_lens"][0].tolist() == [5, 3, 1]


@pytest.mark.parametrize("which", ["q", "kv"])
def test_a_new_tensor_where_a_freed_one_was_is_read(op, which):
    """A new cu_seqlens tensor at a freed one's address and version, with other values (as the
    caching allocator hands a freed block to the next tensor): here two views of one buffer, the
    values written through .data between them (no version bump)."""
    q, k, v = tokens()
    buffer, other = cu_seqlens(LENGTHS), cu_seqlens(LENGTHS)
    pair = lambda t: (t, other) if which == "q" else (other, t)  # noqa: E731
    for _ in range(2):
        cudnn_flex.flex_attention_varlen(q, k, v, *pair(buffer.view(-1)), max_seqlen_q=5, max_seqlen_kv=5)
    buffer.data.copy_(cu_seqlens([5, 3, 1]))
    cudnn_flex.flex_attention_varlen(q, k, v, *pair(buffer.view(-1)), max_seqlen_q=5, max_seqlen_kv=5)
    lengths = op.calls[-1]["seq_lens"][0 if which == "q" else 1]
    assert lengths.tolist() == [5, 3, 1]


def test_cu_seqlens_whose_storage_was_swapped_are_read_again(op):
    """`t.data = u` gives the same tensor object new values without a version bump."""
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu)
    cu.data = cu_seqlens([1, 5, 3])
    call(q, k, v, cu)
    assert op.records == 2 and op.calls[1]["seq_lens"][0].tolist() == [1, 5, 3]


def test_cu_seqlens_changed_while_the_call_ran_are_not_remembered(op):
    """(Another thread, say, between the full path's read and the op.)"""
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    op.during = lambda: cu.add_(0)
    call(q, k, v, cu)
    call(q, k, v, cu)
    assert op.records == 2


def test_a_tensor_made_inside_the_mod_is_read_every_call(op):
    def per_head_bias(score, b, h, q_idx, kv_idx):
        return score + torch.tensor([0.5, -0.5, 0.25, 0.0])[h]

    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    for _ in range(2):
        call(q, k, v, cu, score_mod=per_head_bias)
    assert op.records == 2 and not fast_path._varlen_entries


@pytest.mark.parametrize("scale", [True, float("nan")], ids=["bool", "nan"])
def test_a_scale_the_full_path_refuses_is_refused_on_a_repeat(op, scale):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu, scale=0.5)
    with pytest.raises((TypeError, ValueError), match="scale"):
        call(q, k, v, cu, scale=scale)


@pytest.mark.parametrize("max_q", [None, 5, 9], ids=["read from cu_seqlens", "the longest", "larger"])
def test_the_lse_of_the_shortcut_is_the_full_paths(op, max_q):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    results = [call(q, k, v, cu, return_lse=True, max_seqlen_q=max_q, max_seqlen_kv=None) for _ in range(2)]
    assert op.records == 1
    (out0, lse0), (out1, lse1) = results
    assert lse0.shape == lse1.shape == (H, sum(LENGTHS)) and out1.shape == q.shape
    torch.testing.assert_close(lse1, lse0, rtol=0, atol=0)
    # Each token's row of the stub's [n, H, max_q] lse: sequence i, position j.
    want = [(i, j) for i, n in enumerate(LENGTHS) for j in range(n)]
    longest = max_q or max(LENGTHS)
    assert lse1[1].tolist() == [float((i * H + 1) * longest + j) for i, j in want]


def test_one_query_per_sequence_keeps_its_lse_rows(op):
    """Decoding: the op runs the query dim as 2 (_ops.fwd); the lse keeps one row per sequence."""
    kv_lengths = [4, 7, 2]
    q = torch.randn(3, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(kv_lengths), H_KV, D, dtype=torch.bfloat16) for _ in range(2))
    cu_q, cu_kv = cu_seqlens([1, 1, 1]), cu_seqlens(kv_lengths)
    kw = dict(mask_mod=mods.causal, max_seqlen_q=1, max_seqlen_kv=7, return_lse=True)
    results = [cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, **kw) for _ in range(2)]
    assert op.records == 1 and op.calls[1]["max_seqlens"] == [2, 7]
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    assert results[1][1].shape == (H, 3)


def test_one_query_per_sequence_checks_the_tensors_against_one_row(op):
    """The op's packed scores have two query rows where the sequences have one: a bias over two
    rows fits the op but not the call, so the shortcut checks it itself and the full path refuses it."""
    kv_lengths = [4, 7, 2]
    q = torch.randn(3, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(kv_lengths), H_KV, D, dtype=torch.bfloat16) for _ in range(2))
    cu_q, cu_kv = cu_seqlens([1, 1, 1]), cu_seqlens(kv_lengths)
    kw = dict(score_mod=dsl_mods.add_bias, max_seqlen_q=1, max_seqlen_kv=7)
    cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, score_mod_tensors={"bias": torch.zeros(1, H, 1, 7)}, **kw)
    calls = len(op.ids)
    with pytest.raises(ValueError, match="does not broadcast"):
        cudnn_flex.flex_attention_varlen(q, k, v, cu_q, cu_kv, score_mod_tensors={"bias": torch.zeros(1, H, 2, 7)},
                                         **kw)
    assert len(op.ids) == calls


@pytest.mark.parametrize("what", ["max_seqlen", "numpy max_seqlen", "mods", "shape"])
def test_another_call_takes_the_full_path(op, what):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu, mask_mod=mods.causal)
    if what == "max_seqlen":
        call(q, k, v, cu, mask_mod=mods.causal, max_seqlen_q=8)
    elif what == "numpy max_seqlen":
        for _ in range(2):
            call(q, k, v, cu, mask_mod=mods.causal, max_seqlen_q=np.int64(5))
    elif what == "mods":
        call(q, k, v, cu, mask_mod=mods.sliding_window(2))
    else:
        call(q[:, :2], k[:, :1], v[:, :1], cu, mask_mod=mods.causal)
    assert op.records == (3 if what == "numpy max_seqlen" else 2)


def test_a_rebound_closure_is_recorded_again(op):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    window = 2

    def banded(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < window
    call(q, k, v, cu, mask_mod=banded)
    window = 3  # noqa: F841  (read by banded)
    call(q, k, v, cu, mask_mod=banded)
    assert op.records == 2 and op.ids[0] != op.ids[1]


def test_tokens_read_through_a_copy_are_not_remembered(op):
    """k and v as views of one packed projection have a gap between tokens: the full path copies
    them; the op would refuse them on the shortcut, so no entry is kept."""
    q, k, v = tokens()
    kv = torch.stack([k, v], dim=1)
    for _ in range(2):
        call(q, kv[:, 0], kv[:, 1], cu_seqlens(LENGTHS))
    cu = cu_seqlens(LENGTHS)
    for _ in range(2):
        call(q, kv[:, 0], kv[:, 1], cu)
    assert op.records == 4


def test_a_refusal_of_the_op_takes_the_full_path(op):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu)
    op.refuse = ValueError("cudnn_flex: refused")
    call(q, k, v, cu)
    assert op.records == 2 and len(op.ids) == 2


def test_inference_tensors_are_read_every_call(op):
    q, k, v = tokens()
    with torch.inference_mode():
        cu = cu_seqlens(LENGTHS)
        for _ in range(2):
            call(q, k, v, cu)
    assert op.records == 2


def test_score_mod_tensors_take_the_shortcut_each_call_its_own(op):
    """The slots' names and dtypes are the key's; each call's tensors reach the op, checked against
    the packed scores [n, H, longest_q, longest_kv]."""
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    longest = max(LENGTHS)
    for i in range(3):
        bias = torch.full((1, H, longest, longest), float(i))
        call(q, k, v, cu, score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": bias})
        assert op.calls[-1]["mod_tensors"][0] is bias
    assert op.records == 1 and op.ids[0] == op.ids[1] == op.ids[2]
    same_op_arguments(op.calls[0], op.calls[2])
    with pytest.raises(ValueError, match="does not broadcast"):  # the full path's error, on a repeat
        call(q, k, v, cu, score_mod=dsl_mods.add_bias, score_mod_tensors={"bias": torch.zeros(1, H, 4, 4)})
    call(q, k, v, cu, score_mod=dsl_mods.add_bias,
         score_mod_tensors={"bias": torch.zeros(1, H, longest, longest, dtype=torch.bool)})
    assert op.records == 3 and op.calls[-1]["mod_tensors"][0].dtype == torch.float32  # another slot dtype


def test_the_shortcut_keeps_no_cu_seqlens_alive_and_clear_cache_forgets_it(op):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu)
    gone = weakref.ref(cu)
    op.calls.clear()  # (the stub's own record of the call)
    del cu
    gc.collect()
    assert gone() is None
    cu = cu_seqlens(LENGTHS)
    call(q, k, v, cu)
    cudnn_flex.clear_cache()
    assert not fast_path._varlen_entries
    call(q, k, v, cu)
    assert op.records == 3


def test_lengths_read_under_inference_mode_serve_a_later_backward():
    """The lengths are remembered per cu_seqlens version; made under torch.inference_mode() they
    would be inference tensors, which a later call with autograd cannot save for its backward.
    (The CPU reference path, no stub: it saves them.)"""
    cu = cu_seqlens(LENGTHS)
    q, k, v = (t.float() for t in tokens())
    with torch.inference_mode():
        cudnn_flex.flex_attention_varlen(q, k, v, cu, cu, max_seqlen_q=5, max_seqlen_kv=5)
    q.requires_grad_()
    out = cudnn_flex.flex_attention_varlen(q, k, v, cu, cu, max_seqlen_q=5, max_seqlen_kv=5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_captured_tensors_take_the_shortcut_as_the_full_path_makes_them(op):
    """A torch-style mod over tensors in its closure (alibi's slopes, integer positions copied to
    float32 every call) takes the shortcut, handing the op what the full path hands it; values
    written in place are read."""
    positions = torch.arange(max(LENGTHS), dtype=torch.int32)
    slopes = mods.alibi_slopes(H)
    alibi = mods.alibi(slopes)

    def by_position(score, b, h, q_idx, kv_idx):
        return score - 0.1 * positions[kv_idx]

    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    for mod in (alibi, by_position):
        call(q, k, v, cu, score_mod=mod)
        records = op.records
        call(q, k, v, cu, score_mod=mod)
        assert op.records == records and op.ids[-1] == op.ids[-2]
        assert [t.tolist() for t in op.calls[-1]["mod_tensors"]] == [t.tolist() for t in op.calls[-2]["mod_tensors"]]
    positions.mul_(2)
    call(q, k, v, cu, score_mod=by_position)
    assert op.calls[-1]["mod_tensors"][0].flatten().tolist() == (2 * torch.arange(max(LENGTHS))).tolist()
    slopes.fill_(0.5)  # alibi's slopes: a view of the leaf, read at each launch
    call(q, k, v, cu, score_mod=alibi)
    assert op.calls[-1]["mod_tensors"][0].flatten().tolist() == [0.5] * H
    assert op.records == 2


def test_a_value_read_in_the_mod_takes_the_full_path_every_call(op):
    """A tensor read with .item() leaves its value in the program: no shortcut."""
    t = torch.tensor([2.0])

    def by_item(score, b, h, q_idx, kv_idx):
        return score / t.item()

    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    for _ in range(2):
        call(q, k, v, cu, score_mod=by_item)
    first = op.ids[-1]
    t.fill_(0.25)
    call(q, k, v, cu, score_mod=by_item)
    assert op.ids[-1] != first
    assert op.records == 3 and not fast_path._varlen_entries


def test_a_closure_per_batch_keeps_no_batch_alive(op):
    """Each batch makes its mod over its own tensors: once the batch's closure goes, so do its
    packed entry and its tensors (without waiting for the cycle collector)."""
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)

    def batch():
        slopes = mods.alibi_slopes(H).clone()
        return slopes, mods.alibi(slopes)
    assert_batches_keep_nothing(op, fast_path._varlen_entries, batch, lambda alibi: call(q, k, v, cu, score_mod=alibi))


def test_bprop_tensors_take_the_shortcut(op):
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    for c in (2.0, 3.0):
        given = torch.full((1, H, 1, 1), c)
        call(q, k, v, cu, score_mod=scaled_by, score_mod_bprop=scaled_by_bprop, score_mod_tensors={"c": given},
             score_mod_bprop_tensors={"c": given})
        assert op.calls[-1]["bprop_tensors"][0] is given
    assert op.records == 1 and op.ids[0] == op.ids[1] and op.ids[0][1] != 0


@pytest.mark.parametrize("given", ["score_mod_tensors", "score_mod_bprop", "score_mod_bprop_tensors"])
def test_tensors_or_bprop_without_their_mod_are_refused(op, given):
    """As flex_attention refuses them; the packed path used to drop them silently."""
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    kw = {"score_mod_tensors": {"c": torch.ones(1)}, "score_mod_bprop": scaled_by_bprop,
          "score_mod_bprop_tensors": {"c": torch.ones(1)}}
    extra = {"score_mod": scaled_by, "score_mod_tensors": {"c": torch.ones(1)}} if given.startswith("score_mod_bprop_") else {}
    with pytest.raises(ValueError, match=f"{given} w.*given without"):
        call(q, k, v, cu, **extra, **{given: kw[given]})
    assert not op.ids


def test_a_dict_changed_while_the_full_path_runs_is_not_remembered(op, monkeypatch):
    """As for flex_attention (test_fast_path_inputs.py): the program of a dtype changed between
    the shortcut's refusal and the full path's read is not kept under the old dtype's key."""
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    tensors = {"keep": torch.ones(1, H, 1, 1)}
    then_once(monkeypatch, "varlen_call", lambda: tensors.update(keep=torch.ones(1, H, 1, 1, dtype=torch.bool)))
    call(q, k, v, cu, score_mod=masked_by, score_mod_tensors=tensors)
    call(q, k, v, cu, score_mod=masked_by, score_mod_tensors={"keep": torch.ones(1, H, 1, 1)})
    cudnn_flex.clear_cache()
    call(q, k, v, cu, score_mod=masked_by, score_mod_tensors={"keep": torch.ones(1, H, 1, 1)})
    assert op.ids[1] == op.ids[2] != op.ids[0]


def answering_subclass(op, seen: list) -> type:
    """A torch.Tensor subclass whose __torch_function__ notes each call of the op in `seen` and
    answers it with the stub op over plain tensors; other ops keep the subclass."""
    class Seen(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types_, args=(), kwargs=None):
            if is_the_op(func):
                seen.append(func)
                plain = [[torch.Tensor._make_subclass(torch.Tensor, t) if isinstance(t, cls) else t for t in a]
                         if type(a) is list else a for a in args]
                return op.fwd(*plain)
            return super().__torch_function__(func, types_, args, kwargs)
    return Seen


def test_cu_seqlens_whose_class_changes_in_place_reach_their_torch_function(op):
    """The shortcut calls the op without torch.ops while every tensor it hands is a plain
    torch.Tensor: cu_seqlens made a subclass in place (`t.__class__ = Sub`) after calls that took
    the shortcut are no longer, and their __torch_function__ sees the next call of the op."""
    seen = []
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    for _ in range(2):
        call(q, k, v, cu, mask_mod=mods.causal)
    assert op.records == 1 and len(op.calls) == 2
    cu.__class__ = answering_subclass(op, seen)
    call(q, k, v, cu, mask_mod=mods.causal)
    assert len(seen) == 1 and len(op.calls) == 3


def test_lengths_computed_under_a_mode_reach_their_torch_function_on_a_repeat(op):
    """The lengths a packed call's full path derives from cu_seqlens are kept for the shortcut;
    made of a subclass (here by a TorchFunctionMode while they were computed), they are handed
    through torch.ops on a repeat, so that their __torch_function__ sees the op as it did."""
    seen = []
    tagged = answering_subclass(op, seen)

    class TagsDifferences(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out.as_subclass(tagged) if getattr(func, "__name__", None) == "sub" else out
    q, k, v = tokens()
    cu = cu_seqlens(LENGTHS)
    with TagsDifferences():
        call(q, k, v, cu, mask_mod=mods.causal)
    before = len(seen)
    call(q, k, v, cu, mask_mod=mods.causal)
    assert len(seen) == before + 1
