"""The shortcut of a repeated call (fast_path.py) with score_mod tensors and padded lengths, on the
CPU (cuDNN's op replaced by a stub): a repeat skips the recording, hands the op this call's tensors
as the full path would, and refuses to the full path (with its error) whatever that path refuses."""

import types

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, fast_path, mods, padded_batch
from dsl_tensor_mods import masked_by, same_document, scaled_by, scaled_by_bprop
from stub_op import logged_subclass, op, then_once  # noqa: F401  (op: a fixture)


def qkv(b=2, s=8):
    return [torch.randn(b, 2, s, 16, dtype=torch.bfloat16) for _ in range(3)]


def test_each_call_hands_the_op_its_own_tensors(op):
    q, k, v = qkv()
    for scale in (1.0, 2.0, 3.0):
        slopes = (mods.alibi_slopes(2) * scale).view(1, 2, 1, 1)
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": slopes})
        assert op.calls[-1]["mod_tensors"][0] is slopes
    assert op.records == 1
    assert len(set(op.ids)) == 1


def test_values_written_in_place_reach_the_op(op):
    """The op gets the tensor itself: it reads the values at the launch."""
    q, k, v = qkv()
    bias = torch.zeros(1, 1, 8, 8)
    for fill in (0.0, 5.0):
        bias.fill_(fill)
        cudnn_flex.flex_attention(q, k, v, dsl_mods.add_bias, score_mod_tensors={"bias": bias})
    assert op.records == 1
    assert op.calls[-1]["mod_tensors"][0] is bias


def test_a_bool_tensor_is_converted_on_every_call(op):
    """As the full path does (record_call.as_graph_input): a float32 copy of this call's values."""
    q, k, v = qkv()
    keep = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    cudnn_flex.flex_attention(q, k, v, masked_by, score_mod_tensors={"keep": keep})
    keep[..., 3] = False
    cudnn_flex.flex_attention(q, k, v, masked_by, score_mod_tensors={"keep": keep})
    assert op.records == 1
    passed = op.calls[-1]["mod_tensors"][0]
    assert passed.dtype == torch.float32 and torch.equal(passed, keep.float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.int32])
def test_integer_ids_as_cudnn_reads_them(op, dtype):
    """int64 and uint8 ids reach the op as float32 copies (cuDNN 9.19 never finished a graph over
    an INT64 input, and reads odd-length uint8 rows misaligned); int32 ids as they are."""
    q, k, v = qkv(b=1, s=9)
    ids = (torch.arange(9) // 4).to(dtype)
    tensors = {"q_doc": ids.view(1, 1, 9, 1), "kv_doc": ids.view(1, 1, 1, 9)}
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, same_document, score_mod_tensors=tensors)
        passed = op.calls[-1]["mod_tensors"]
        if dtype == torch.int32:
            assert passed[0] is tensors["q_doc"] and passed[1] is tensors["kv_doc"]
        else:
            assert all(t.dtype == torch.float32 for t in passed)
            assert torch.equal(passed[1], tensors["kv_doc"].float())
    assert op.records == 1


def test_bprop_tensors_are_passed_on_the_shortcut(op):
    q, k, v = qkv()
    for c in (2.0, 3.0):
        scalar = {"c": torch.tensor(c)}
        cudnn_flex.flex_attention(q, k, v, scaled_by, scaled_by_bprop, scalar, {"c": torch.tensor(c + 1)})
        assert op.calls[-1]["mod_tensors"][0].item() == c
        assert op.calls[-1]["bprop_tensors"][0].item() == c + 1
    assert op.records == 1


@pytest.mark.parametrize("change", ["dtype", "name", "another tensor", "no bprop tensors"])
def test_another_slot_signature_is_recorded_again(op, change):
    """The names and dtypes of the tensors are the program's input slots: another signature never
    gets the program of the first."""
    q, k, v = qkv()
    first = {"c": torch.tensor(2.0)}
    cudnn_flex.flex_attention(q, k, v, scaled_by, scaled_by_bprop, first, first)
    tensors, bprop = dict(first), dict(first)
    if change == "dtype":
        tensors = {"c": torch.tensor(2.0, dtype=torch.bfloat16)}
    elif change == "name":
        tensors = {"c": torch.tensor(2.0), "unused": torch.tensor(1.0)}
    elif change == "another tensor":
        bprop = {"c": torch.tensor(2.0), "d": torch.tensor(1.0)}
    else:
        cudnn_flex.flex_attention(q, k, v, scaled_by, None, tensors)
        assert op.records == 2 and op.ids[-1] != op.ids[0]
        return
    cudnn_flex.flex_attention(q, k, v, scaled_by, scaled_by_bprop, tensors, bprop)
    assert op.records == 2
    assert op.ids[-1] != op.ids[0]
    cudnn_flex.flex_attention(q, k, v, scaled_by, scaled_by_bprop, first, first)
    assert op.records == 2 and op.ids[-1] == op.ids[0]  # both remembered


def _bad(kind):
    if kind == "requires grad":
        return {"slopes": torch.ones(1, 2, 1, 1, requires_grad=True)}, "requires grad"
    if kind == "shape":
        return {"slopes": torch.ones(1, 3, 1, 1)}, "does not broadcast"
    if kind == "float64":
        return {"slopes": torch.ones(1, 2, 1, 1, dtype=torch.float64)}, "float64"
    if kind == "not a tensor":
        return {"slopes": 0.5}, "must be a torch.Tensor"
    if kind == "five dims":
        return {"slopes": torch.ones(1, 1, 2, 1, 1)}, "does not broadcast"
    if kind == "device":
        return {"slopes": torch.ones(1, 2, 1, 1, device="meta")}, "is on meta but q is on cpu"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["requires grad", "shape", "float64", "not a tensor", "five dims", "device"])
def test_a_bad_tensor_on_a_repeat_gets_the_full_paths_error(op, kind):
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": torch.ones(1, 2, 1, 1)})
    bad, message = _bad(kind)
    calls = len(op.ids)
    with pytest.raises((ValueError, TypeError), match=message):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=bad)
    assert len(op.ids) == calls


@pytest.mark.parametrize("kind", ["shape", "five dims", "device"])
def test_the_op_refuses_what_the_shortcut_leaves_to_it(op, kind):
    """The shortcut leaves a given tensor's device and shape to the op, which refuses them as the
    full path does (then the full path runs and says what is wrong): the op sees the bad tensor."""
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": torch.ones(1, 2, 1, 1)})
    bad, message = _bad(kind)
    handed = []
    op.during = lambda: handed.append(True)  # runs inside the op's next call
    with pytest.raises(ValueError, match=message):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=bad)
    assert handed, "the shortcut refused the tensor itself"


def test_one_query_row_checks_the_tensors_itself(op):
    """One query row runs as two (_ops.fwd): a tensor over two query rows fits the op's scores but
    not the call's, so the shortcut checks it itself and the full path refuses it."""
    q, (k, v) = qkv(s=1)[0], qkv()[1:]
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": torch.ones(1, 2, 1, 1)})
    calls = len(op.ids)
    with pytest.raises(ValueError, match="does not broadcast"):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": torch.ones(1, 2, 2, 1)})
    assert len(op.ids) == calls


def test_one_query_row_of_a_score_only_mod_leaves_the_tensors_to_the_op(op):
    """A program that reads neither the head nor the key index runs one query row as one
    (_ops.needs_two_rows), so the op checks its tensors against the call's own scores: a tensor
    over two query rows reaches the op, which refuses it (and the full path says why)."""
    q, (k, v) = qkv(s=1)[0], qkv()[1:]
    cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors={"c": torch.ones(1, 2, 1, 1)})
    calls = len(op.calls)
    handed = []
    op.during = lambda: handed.append(True)  # runs inside the op's next call
    with pytest.raises(ValueError, match="does not broadcast"):
        cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors={"c": torch.ones(1, 2, 2, 1)})
    assert handed and len(op.calls) == calls
    assert op.calls[-1]["rows"] == 1


@pytest.mark.parametrize("given", ["score_mod_tensors", "score_mod_bprop_tensors"])
def test_an_empty_dict_without_its_mod_is_refused_on_a_repeat(op, given):
    """An empty dict has no slots, as no dict; the full path still refuses it without its mod."""
    q, k, v = qkv()
    kw = {"score_mod": dsl_mods.causal} if given == "score_mod_bprop_tensors" else {}
    cudnn_flex.flex_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match=f"{given} were given without"):
        cudnn_flex.flex_attention(q, k, v, **kw, **{given: {}})


def test_a_mapping_that_is_no_dict_takes_the_full_path(op):
    q, k, v = qkv()
    tensors = types.MappingProxyType({"slopes": mods.alibi_slopes(2).view(1, 2, 1, 1)})
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=tensors)
    assert op.records == 2 and op.ids[0] == op.ids[1]


def test_a_tensor_subclass_takes_the_full_path(op):
    """A subclass may override __torch_function__, which the shortcut does not call: the full path
    runs, and the op goes through torch.ops, which calls it."""
    seen = []
    Logged = logged_subclass(seen)

    q, k, v = qkv()
    slopes = mods.alibi_slopes(2).view(1, 2, 1, 1)
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": slopes})
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": slopes.as_subclass(Logged)})
    assert op.records == 2 and len(seen) == 1


def test_a_dict_changed_between_the_key_and_the_call(op, monkeypatch):
    """Another thread adds a tensor after the key was taken: the call runs the key's program over
    the tensors the key was taken of (read once), not over the new ones; the next call sees them."""
    q, k, v = qkv()
    c = torch.tensor(2.0)
    tensors = {"c": c}
    cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors=tensors)
    then_once(monkeypatch, "key", lambda: tensors.update(d=torch.tensor(1.0)))
    cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors=tensors)
    passed = op.calls[-1]["mod_tensors"]
    assert op.records == 1 and len(passed) == 1 and passed[0] is c and op.ids[-1] == op.ids[0]
    cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors=tensors)
    assert op.records == 2 and len(op.calls[-1]["mod_tensors"]) == 2 and op.ids[-1] != op.ids[0]


def _scaled_by_any(graph, score, tensors):
    return graph.mul(score, next(iter(tensors.values())))


def test_a_dict_renamed_between_the_key_and_the_call(op, monkeypatch):
    """Another thread renames the tensor after the key was taken: the names are the program's
    slots, and the call runs the program of the names it read; the next call, of the new name."""
    q, k, v = qkv()
    c = torch.tensor(2.0)
    tensors = {"c": c}
    cudnn_flex.flex_attention(q, k, v, _scaled_by_any, score_mod_tensors=tensors)
    then_once(monkeypatch, "key", lambda: tensors.update(d=tensors.pop("c")))
    cudnn_flex.flex_attention(q, k, v, _scaled_by_any, score_mod_tensors=tensors)
    passed = op.calls[-1]["mod_tensors"]
    assert op.records == 1 and len(passed) == 1 and passed[0] is c
    cudnn_flex.flex_attention(q, k, v, _scaled_by_any, score_mod_tensors=tensors)
    assert op.records == 2 and op.ids[-1] != op.ids[0]


def test_a_dict_changed_while_the_full_path_runs_is_not_remembered(op, monkeypatch):
    """Another thread changes a tensor's dtype after the shortcut declined the call and before the
    full path read the dict: the program recorded for the new dtype is not kept under the key of
    the old one."""
    q, k, v = qkv()
    tensors = {"keep": torch.ones(1, 2, 1, 1)}
    then_once(monkeypatch, "call", lambda: tensors.update(keep=torch.ones(1, 2, 1, 1, dtype=torch.bool)))
    cudnn_flex.flex_attention(q, k, v, masked_by, score_mod_tensors=tensors)
    cudnn_flex.flex_attention(q, k, v, masked_by, score_mod_tensors={"keep": torch.ones(1, 2, 1, 1)})
    cudnn_flex.clear_cache()
    cudnn_flex.flex_attention(q, k, v, masked_by, score_mod_tensors={"keep": torch.ones(1, 2, 1, 1)})
    assert op.ids[1] == op.ids[2] != op.ids[0]


def _passes_dp(graph, d_p, tensors):
    return d_p


def test_an_empty_dict_filled_between_the_key_and_the_call(op, monkeypatch):
    """An empty bprop dict (no slots) gets a tensor after the key was taken: the call runs the
    key's program, which has no slot for it, without it; the next call records one that has."""
    q, k, v = qkv()
    bprop_tensors: dict = {}
    cudnn_flex.flex_attention(q, k, v, scaled_by, _passes_dp, {"c": torch.tensor(2.0)}, bprop_tensors)
    then_once(monkeypatch, "key", lambda: bprop_tensors.update(c=torch.tensor(3.0)))
    cudnn_flex.flex_attention(q, k, v, scaled_by, _passes_dp, {"c": torch.tensor(2.0)}, bprop_tensors)
    assert op.records == 1 and op.calls[-1]["bprop_tensors"] == [] and op.ids[-1] == op.ids[0]
    cudnn_flex.flex_attention(q, k, v, scaled_by, _passes_dp, {"c": torch.tensor(2.0)}, bprop_tensors)
    assert op.records == 2 and len(op.calls[-1]["bprop_tensors"]) == 1 and op.ids[-1] != op.ids[0]


# --- padded lengths ---------------------------------------------------------------------------------


def test_lengths_take_the_shortcut_and_reach_the_op(op):
    q, k, v = qkv(b=2, s=8)
    for n in (5, 7):
        lengths = torch.tensor([n, 8], dtype=torch.int32)
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
        seq_lens = op.calls[-1]["seq_lens"]
        assert seq_lens[1] is lengths
        assert seq_lens[0].tolist() == [8, 8]  # the queries' side: full
    assert op.records == 1


# (seq_lens_q, seq_lens_kv) of a batch of 2 at Sq = Skv = 8 -> whether every query row attends: lies
# inside its sequence and has a key, so that the op's forward need not clear out and lse.
ROWS_ATTENDING = {
    "kv only, all >= 1": (None, [1, 8], True),
    "kv only, an empty cache": (None, [0, 8], False),
    "q full": ([8, 8], None, True),
    "q short": ([8, 7], None, False),
    "both, q full": ([8, 8], [3, 1], True),
    "both, an empty kv": ([8, 8], [3, 0], False),
    "both, q short": ([5, 8], [3, 4], False),
}


@pytest.mark.parametrize("case", ROWS_ATTENDING)
def test_whether_every_row_attends_reaches_the_op(op, case):
    """Found by the lengths' checks, which read their values on the host: the full path's call and
    the shortcut's repeats (the same lengths, checked once) hand the op the same answer."""
    q_lengths, kv_lengths, attends = ROWS_ATTENDING[case]
    q, k, v = qkv(b=2, s=8)
    kw = {name: torch.tensor(n, dtype=torch.int32) for name, n in (("seq_lens_q", q_lengths),
                                                                  ("seq_lens_kv", kv_lengths)) if n is not None}
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == 1
    assert [call["every_row_attends"] for call in op.calls] == [attends] * 3


def test_lengths_written_to_leave_a_row_without_keys_are_cleared_again(op):
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    lengths[0] = 0  # written in place: the repeat reads the values again
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    lengths[0] = 2
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    lengths.data[0] = 0  # a write the version counter misses (a kernel of the user's own)...
    torch.autograd.graph.increment_version(lengths)  # ...told to it, as README says
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    assert [call["every_row_attends"] for call in op.calls] == [True, False, True, False]


def test_one_query_row_run_as_two_is_cleared(op):
    """A score_mod's one query row runs as two (_ops.fwd); the second lies past the query lengths,
    so the op must clear it, whatever the lengths say of the first. No score_mod: one row."""
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([3, 8], dtype=torch.int32)
    for score_mod, attends in ((dsl_mods.causal, False), (None, True)):
        for _ in range(2):
            cudnn_flex.flex_attention(q[:, :, :1], k, v, score_mod, seq_lens_kv=lengths)
            assert op.calls[-1]["every_row_attends"] is attends
            assert op.calls[-1]["seq_lens"][0].tolist() == [1, 1]
    assert op.records == 2


def test_lengths_unread_under_compile_do_not_say_every_row_attends(monkeypatch):
    """torch.compile checks the lengths' metadata only (no host read in a compiled graph): nothing
    is known of their values, so the op clears out and lse."""
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    assert padded_batch.padded_lengths(None, lengths, q, k).every_row_attends
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    checked = padded_batch.padded_lengths(None, lengths, q, k)
    assert checked.kv is lengths and checked.q is None and not checked.every_row_attends


@pytest.fixture
def no_kept_lengths(monkeypatch):
    """padded_batch's kept full lengths, empty for this test (they live for the process)."""
    monkeypatch.setattr(padded_batch, "_kept_lengths", {})


def test_the_full_side_is_made_once_and_is_no_inference_tensor(op, no_kept_lengths):
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    with torch.inference_mode():
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths)
    cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths)
    first, second = op.calls[0]["seq_lens"][1], op.calls[1]["seq_lens"][1]
    assert first is second and not first.is_inference()
    assert first.tolist() == [8, 8] and first.dtype == torch.int32


def test_a_full_side_made_for_one_call_is_not_handed_to_the_next(op, no_kept_lengths, monkeypatch):
    """Past _MAX_FULL_LENGTHS (or under a CUDA graph capture, where a fill is only recorded) a full
    side is made for its call alone: the shortcut's repeats, which skip the lengths' checks, make
    their own too, each with the full length."""
    monkeypatch.setattr(padded_batch, "_MAX_FULL_LENGTHS", 0)
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    handed = [call["seq_lens"][0] for call in op.calls]
    assert op.records == 1 and all(side.tolist() == [8, 8] for side in handed)
    assert len({id(side) for side in handed}) == 3


def test_repeats_hand_the_given_lengths_and_the_kept_full_side(op, no_kept_lengths):
    """The shortcut's repeats (lengths checked once) hand the given side itself and the kept full
    side of the other (one entry: which sides are given is no part of its key)."""
    q, k, v = qkv(b=2, s=8)
    for given in ("seq_lens_q", "seq_lens_kv"):
        lengths = torch.tensor([5, 8], dtype=torch.int32)
        for _ in range(3):
            cudnn_flex.flex_attention(q, k, v, **{given: lengths})
        lists = [call["seq_lens"] for call in op.calls[-3:]]
        side = 0 if given == "seq_lens_q" else 1
        assert all(handed[side] is lengths for handed in lists)
        assert all(handed[1 - side] is lists[0][1 - side] and handed[1 - side].tolist() == [8, 8] for handed in lists)
    assert op.records == 1


def test_a_full_side_is_found_kept_without_walking_the_table(op, monkeypatch):
    """Whether a full side is a kept one is looked up by its key: another thread's first call at a
    new shape adds to the table meanwhile, which a walk over it would raise on (RuntimeError:
    dictionary changed size during iteration)."""
    class Unwalkable(dict):
        def _walked(self, *args):
            raise AssertionError("the table of kept full sides was walked")
        __iter__ = keys = values = items = _walked
    monkeypatch.setattr(padded_batch, "_kept_lengths", Unwalkable())
    checks = count_length_checks(monkeypatch)
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    for n in (5, 6, 7):  # a decode loop: written in place, so checked (and looked up) each call
        lengths[0] = n
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    assert op.records == 1 and checks[0] == 2 and len(op.calls) == 3
    assert all(call["seq_lens"][1] is lengths for call in op.calls)
    assert all(call["seq_lens"][0] is op.calls[0]["seq_lens"][0] for call in op.calls)


def test_no_fake_tensor_is_kept_for_the_full_side(op, no_kept_lengths):
    """A call under FakeTensorMode (a shape or memory estimate) makes a fake full side: a later real
    call gets a real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)  # lengths checked on the host
    with FakeTensorMode(allow_non_fake_inputs=True):
        short = torch.empty(2, 2, 4, 16, dtype=torch.bfloat16)
        cudnn_flex.flex_attention(short, k, v, seq_lens_kv=lengths)
    cudnn_flex.flex_attention(torch.randn(2, 2, 4, 16, dtype=torch.bfloat16), k, v, seq_lens_kv=lengths)
    full = op.calls[-1]["seq_lens"][0]
    assert type(full) is torch.Tensor and full.tolist() == [4, 4]


def test_each_length_gets_its_own_full_side(op, no_kept_lengths):
    k, v = qkv(b=2, s=8)[1:]
    lengths = torch.tensor([5, 8], dtype=torch.int32)
    for s_q in (8, 5, 8):
        q = torch.randn(2, 2, s_q, 16, dtype=torch.bfloat16)
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
        assert op.calls[-1]["seq_lens"][0].tolist() == [s_q, s_q]


def test_lengths_written_in_place_are_checked_again(op):
    q, k, v = qkv(b=1, s=8)
    lengths = torch.tensor([5], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths, seq_lens_kv=lengths)
    lengths.fill_(9)  # past the padded length
    with pytest.raises(ValueError, match=r"seq_lens_kv must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=lengths, seq_lens_kv=lengths)


def count_length_checks(monkeypatch) -> list:
    """How many times the shortcut ran cudnn_seq_lens (its checks of the lengths' values)."""
    count = [0]
    real = fast_path.cudnn_seq_lens

    def counted(*args):
        count[0] += 1
        return real(*args)
    monkeypatch.setattr(fast_path, "cudnn_seq_lens", counted)
    return count


@pytest.mark.parametrize("sides", ["kv", "q", "both", "both, q written"])
def test_the_same_lengths_are_checked_once(op, monkeypatch, sides):
    """Lengths that passed the checks on the shortcut's last padded call, the same tensors at the
    same versions and storage, are not read again (the full path's rule, once_per_version); a
    write in place or new storage has them checked again."""
    checks = count_length_checks(monkeypatch)
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([5, 8], dtype=torch.int32)  # the side written below
    side = "seq_lens_q" if sides in ("q", "both, q written") else "seq_lens_kv"
    kw = {side: lengths}
    if sides.startswith("both"):
        other = "seq_lens_kv" if side == "seq_lens_q" else "seq_lens_q"
        kw[other] = torch.tensor([8, 3], dtype=torch.int32)
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, **kw)
        assert op.calls[-1]["seq_lens"][0 if side == "seq_lens_q" else 1] is lengths
    assert op.records == 1 and checks[0] == 1
    lengths[1] = 9  # past the padded length
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, **kw)
    lengths.data = torch.tensor([5, 8], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, **kw)
    lengths.data = torch.tensor([9, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, **kw)


def test_other_lengths_are_checked(op, monkeypatch):
    """Another tensor, or lengths now given for the other side too, is checked, whatever passed before."""
    checks = count_length_checks(monkeypatch)
    q, k, v = qkv(b=2, s=8)
    good = torch.tensor([5, 8], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=good)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=torch.tensor([9, 8], dtype=torch.int32))
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=good)
    with pytest.raises(ValueError, match=r"seq_lens_q must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=torch.tensor([9, 8], dtype=torch.int32), seq_lens_kv=good)
    assert checks[0] == 3


def test_inference_lengths_are_checked_every_call(op):
    """An inference tensor has no version counter: a write in place goes unseen by versions, so its
    values are checked on every call, as by the full path."""
    q, k, v = qkv(b=1, s=8)
    with torch.inference_mode():
        lengths = torch.tensor([5], dtype=torch.int32)
        for _ in range(2):
            cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
        lengths.fill_(9)
        with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
            cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)


def test_strided_lengths_are_copied_on_every_call(op):
    """Lengths the checks copy (not contiguous) are handed as a copy of each call's values; a write
    through .data, which no version sees, still reaches the next call."""
    q, k, v = qkv(b=2, s=8)
    base = torch.tensor([5, 0, 8, 0], dtype=torch.int32)
    lengths = base[::2]
    for _ in range(2):  # the full path, then the shortcut
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    base.data[0] = 3
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    handed = op.calls[-1]["seq_lens"][1]
    assert handed.is_contiguous() and handed.tolist() == [3, 8]
    assert op.records == 1, "the repeat did not take the shortcut"


def test_a_new_tensor_over_checked_lengths_is_checked(op):
    """Another tensor object over the same storage, at the same version, is checked as the full path
    checks it (its values were written through .data since, which no version sees)."""
    q, k, v = qkv(b=2, s=8)
    store = torch.tensor([5, 8, 0, 0], dtype=torch.int32)
    first = store[:2]
    for _ in range(2):  # the full path, then the shortcut, which keeps the lengths as checked
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=first)
    store.data[1] = 9
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=store[:2])


def test_lengths_of_the_other_side_at_a_checked_ones_address_are_checked_against_their_bound(op):
    """The queries' lengths passed against Sq = 8 and are gone; the keys' lengths, another view of
    the same storage (same address and version counter), are checked against Skv = 4."""
    q, k, v = qkv(b=2, s=8)[0], *qkv(b=2, s=4)[1:]
    store = torch.tensor([8, 8], dtype=torch.int32)
    for _ in range(2):  # the full path, then the shortcut, which keeps the lengths as checked
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=store[:])
    op.calls.clear()  # the stub keeps what it was handed
    with pytest.raises(ValueError, match=r"seq_lens_kv must lie in \[0, 4\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=store[:])


def test_inference_lengths_beside_checked_ones(op):
    """An inference tensor (no version counter) beside lengths kept as checked takes the shortcut
    with its values checked, as the full path takes it."""
    q, k, v = qkv(b=2, s=8)
    kv = torch.tensor([5, 8], dtype=torch.int32)
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=kv)
    with torch.inference_mode():
        q_lengths = torch.tensor([3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"seq_lens_q must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_q=q_lengths, seq_lens_kv=kv)
    q_lengths = q_lengths.clone()  # (outside inference mode: a normal tensor)
    q_lengths[1] = 8
    cudnn_flex.flex_attention(q, k, v, seq_lens_q=q_lengths, seq_lens_kv=kv)
    assert op.records == 2 and op.calls[-1]["seq_lens"][0] is q_lengths


def test_lengths_written_while_checked_are_checked_again(op, monkeypatch):
    """Another thread writes the lengths right after the shortcut checked them: the state kept as
    checked is the one the checks read, so the next call checks the new values."""
    q, k, v = qkv(b=2, s=8)
    kv = torch.tensor([5, 8], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=kv)  # the full path
    then_once(monkeypatch, "cudnn_seq_lens", lambda: kv.fill_(9))
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=kv)  # the shortcut checks [5, 8]; then the write
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\]"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=kv)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_a_misaligned_tensor_of_a_copied_dtype_gets_the_full_paths_error(op, monkeypatch, dtype):
    """The op is handed the aligned float32 copy of an int64, bool or uint8 tensor, so it cannot
    refuse the tensor itself misaligned, as the full path does on CUDA: the shortcut checks it.
    (CUDA's alignment rule mimicked on the CPU: the full path, the shortcut's test of a CUDA
    tensor and the op's refusal.)"""
    import stub_op
    from cudnn_flex import _validation
    real_check, real_refuse = _validation._check_graph_tensor, stub_op.refuse_like_the_op

    def check_as_on_cuda(t, label, q, full):
        real_check(t, label, q, full)
        if t.data_ptr() % 16:
            raise ValueError(f"cudnn_flex: {label[0]}[{label[1]!r}] is not 16-byte aligned; pass a .clone()")

    def refuse_as_on_cuda(q, k, tensors, cu_seqlens, max_seqlens):
        real_refuse(q, k, tensors, cu_seqlens, max_seqlens)
        if any(not (t.device.type == "cpu" and t.numel() == 1) and t.data_ptr() % 16 for t in tensors):
            raise ValueError("stub op: a score_mod tensor is not 16-byte aligned")

    monkeypatch.setattr(_validation, "_check_graph_tensor", check_as_on_cuda)
    monkeypatch.setattr(stub_op, "refuse_like_the_op", refuse_as_on_cuda)
    q, k, v = qkv(b=1, s=9)
    ids = (torch.arange(10) // 4).to(dtype)
    good, bad = ids[:9], ids[1:]
    assert good.data_ptr() % 16 == 0 and bad.data_ptr() % 16 != 0
    tensors = lambda i: {"q_doc": i.view(1, 1, 9, 1), "kv_doc": i.view(1, 1, 1, 9)}  # noqa: E731
    for _ in range(2):  # the full path, then the shortcut
        cudnn_flex.flex_attention(q, k, v, same_document, score_mod_tensors=tensors(good))
    with monkeypatch.context() as on_cuda, pytest.raises(ValueError, match="not 16-byte aligned"):
        on_cuda.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # for the shortcut's test
        cudnn_flex.flex_attention(q, k, v, same_document, score_mod_tensors=tensors(bad))
    assert op.records == 2


@pytest.mark.parametrize("kind", ["int64", "shape", "list"])
def test_bad_lengths_on_a_repeat_get_the_full_paths_error(op, kind):
    q, k, v = qkv(b=2, s=8)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=torch.tensor([5, 8], dtype=torch.int32))
    bad = {"int64": torch.tensor([5, 8]), "shape": torch.tensor([5], dtype=torch.int32), "list": [5, 8]}[kind]
    with pytest.raises((ValueError, TypeError), match="seq_lens_kv must be"):
        cudnn_flex.flex_attention(q, k, v, seq_lens_kv=bad)
    assert len(op.ids) == 1


def test_a_lengths_subclass_on_a_repeat_takes_the_full_path(op):
    seen = []
    Logged = logged_subclass(seen)

    q, k, v = qkv(b=1, s=8)
    lengths = torch.tensor([5], dtype=torch.int32)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths.as_subclass(Logged))
    assert op.records == 2 and len(seen) == 1


def test_lengths_with_a_score_mod_tensor(op):
    q, k, v = qkv(b=2, s=8)
    lengths = torch.tensor([3, 6], dtype=torch.int32)
    slopes = mods.alibi_slopes(2).view(1, 2, 1, 1)
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": slopes}, seq_lens_kv=lengths)
    assert op.records == 1
    assert op.calls[-1]["mod_tensors"][0] is slopes and op.calls[-1]["seq_lens"][1] is lengths
