"""The shortcut of a repeated call whose torch-style mods capture tensors (fast_path.py), on the CPU
with cuDNN's op stubbed (stub_op.py): `alibi(slopes)`, `document_mask(doc_ids)`, a bias table
indexed by head and positions, as flex users write them. A repeat takes the shortcut and hands
the op what the full path hands it; new values are read; a change of a tensor's metadata or of
the closure takes the full path; a closure made per batch keeps nothing alive."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import fast_path, mods, torch_style
from stub_op import assert_batches_keep_nothing, is_the_op, op, op_zeros  # noqa: F401  (op: a fixture)

B, H, S, D = 2, 2, 8, 16


def qkv():
    return [torch.randn(B, H, S, D, dtype=torch.bfloat16) for _ in range(3)]


def bias_table(table):
    """A learned-style relative bias: a table indexed by head and positions (attention-gym's
    shape), captured by the closure."""
    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx, kv_idx]
    return bias


def doc_ids():
    return torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 2, 2, 2]], dtype=torch.int32)


def prefix_per_batch(prefix):
    """Causal, plus a bidirectional prefix of prefix[b] keys per batch element (a prefix LM over
    a batch of prompts of different lengths)."""
    def mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix[b])
    return mask


def ids_in_a_buffer(step: int, dtype=torch.int32):
    """Document ids as a view into a longer buffer: a storage offset, and with step 2 a stride."""
    buffer = (torch.arange(3 * S * step) // 3).to(dtype)
    return buffer[S // 2:S // 2 + S * step:step]


# name -> () -> (the call's mods, the captured tensor whose values a test rewrites)
CASES = {
    "alibi slopes": lambda: (lambda t: ({"score_mod": mods.alibi(t)}, t))(mods.alibi_slopes(H).reshape(-1)),
    "document mask, ids per position": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(doc_ids()[0]),
    "document mask, ids per batch": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(doc_ids()),
    "document mask, int64 ids": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(doc_ids()[0].long()),
    "document mask, int16 ids": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(doc_ids().short()),
    "document mask, int64 ids at a stride": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(
        ids_in_a_buffer(2, torch.int64)),
    "document mask, ids at an offset": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(ids_in_a_buffer(1)),
    "document mask, ids at a stride": lambda: (lambda t: ({"mask_mod": mods.document_mask(t)}, t))(ids_in_a_buffer(2)),
    "prefix per batch, int64": lambda: (lambda t: ({"mask_mod": prefix_per_batch(t)}, t))(torch.tensor([3, 5])),
    "prefix per batch, at an offset": lambda: (lambda t: ({"mask_mod": prefix_per_batch(t)}, t))(
        torch.tensor([8, 8, 3, 5, 2, 6])[2:4]),
    "prefix per batch, uint8 at an offset": lambda: (lambda t: ({"mask_mod": prefix_per_batch(t)}, t))(
        torch.tensor([8, 8, 3, 5, 2, 6], dtype=torch.uint8)[2:4]),
    "bias table": lambda: (lambda t: ({"score_mod": bias_table(t)}, t))(torch.randn(H, S, S)),
    "bias table, float64": lambda: (lambda t: ({"score_mod": bias_table(t)}, t))(torch.randn(H, S, S,
                                                                                                dtype=torch.float64)),
    "both mods capture": lambda: (lambda t: ({"mask_mod": mods.document_mask(doc_ids()), "score_mod": mods.alibi(t)},
                                             t))(mods.alibi_slopes(H).reshape(-1)),
}


def same_tensors(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype
                                    and torch.equal(x, y) for x, y in zip(a, b))


def full_path_call(q, k, v, kw, op):
    """What the full path hands the op for this call: (program ids, mod tensors)."""
    cudnn_flex.clear_cache()
    records = op.records
    cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == records + 1
    return op.ids[-1], op.calls[-1]["mod_tensors"]


@pytest.mark.parametrize("case", CASES)
def test_a_repeat_takes_the_shortcut_with_the_full_paths_tensors(op, case):
    kw, _ = CASES[case]()
    q, k, v = qkv()
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == 1
    ids, tensors = op.ids[-1], op.calls[-1]["mod_tensors"]
    assert tensors, "the call passes its captured tensors"
    assert (ids, True) == (op.ids[0], same_tensors(tensors, op.calls[0]["mod_tensors"]))
    want_ids, want = full_path_call(q, k, v, kw, op)
    assert ids == want_ids and same_tensors(tensors, want)


@pytest.mark.parametrize("case", CASES)
def test_new_values_written_in_place_reach_the_op(op, case):
    kw, captured = CASES[case]()
    q, k, v = qkv()
    for _ in range(2):  # the second by the shortcut, which keeps the views it may keep
        cudnn_flex.flex_attention(q, k, v, **kw)
    with torch.no_grad():
        captured.copy_(captured.flip(-1) + 1)  # new values, the same tensor
    cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == 1
    got = op.calls[-1]["mod_tensors"]
    assert same_tensors(got, full_path_call(q, k, v, kw, op)[1])


def _resize(t):
    t.resize_(t.numel() * 2)  # more entries than heads: the same program, a new shape in the key


def _set_storage(t):
    t.set_(torch.full_like(t, 3.0))  # the same metadata, another storage


def _transpose(t):
    t.transpose_(1, 2)


def _data(t):
    t.data = t.data.double()


def _requires_grad(t):
    t.requires_grad_()


@pytest.mark.parametrize("change", [_resize, _set_storage, _data])
def test_a_changed_slopes_tensor_gives_what_the_full_path_gives(op, change):
    slopes = mods.alibi_slopes(H).reshape(-1).clone()
    kw = {"score_mod": mods.alibi(slopes)}
    q, k, v = qkv()
    for _ in range(2):  # the second by the shortcut, which keeps the view it made
        cudnn_flex.flex_attention(q, k, v, **kw)
    change(kw["score_mod"].__closure__[0].cell_contents)  # the tensor the closure holds
    cudnn_flex.flex_attention(q, k, v, **kw)
    ids, got = op.ids[-1], op.calls[-1]["mod_tensors"]
    assert (ids, True) == (lambda w: (w[0], same_tensors(got, w[1])))(full_path_call(q, k, v, kw, op))


@pytest.mark.parametrize("case", ["document mask, ids at an offset", "document mask, ids at a stride",
                                  "prefix per batch, at an offset", "prefix per batch, uint8 at an offset"])
def test_ids_moved_to_another_offset_are_read_there(op, case):
    """`set_` to another offset of the same storage keeps every piece of metadata the key holds:
    the copies are made from where the tensor now starts (document ids: one copy of the whole
    tensor; prefix lengths: a copy of the view one slot reads)."""
    kw, ids = CASES[case]()
    q, k, v = qkv()
    for _ in range(3):  # the third by the shortcut's kept way of making the copies
        cudnn_flex.flex_attention(q, k, v, **kw)
    ids.set_(ids.untyped_storage(), ids.storage_offset() + 2, ids.shape, ids.stride())
    cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == 1
    got = op.calls[-1]["mod_tensors"]
    assert got[0].flatten().tolist() == ids.tolist()
    assert same_tensors(got, full_path_call(q, k, v, kw, op)[1])


def test_ids_moved_to_a_misaligned_offset_and_back_are_read_there(op, monkeypatch):
    """On CUDA a view that is not 16-byte aligned is cloned (view_for; mimicked here on the CPU).
    int32 ids read in place, moved by `set_` to a misaligned offset (their slots are clones for a
    call) and back: the next call reads them where they are, not the clone's values."""
    view_for = torch_style.view_for

    def aligned_as_on_cuda(t, axes, full, name):
        view = view_for(t, axes, full, name)
        return view.clone() if view.data_ptr() % 16 and view.data_ptr() == t.data_ptr() else view

    monkeypatch.setattr(torch_style, "view_for", aligned_as_on_cuda)
    ids = ids_in_a_buffer(1)
    kw = {"mask_mod": mods.document_mask(ids)}
    q, k, v = qkv()
    offset = ids.storage_offset()
    for moved in (0, 0, 2, 0, 0):  # the second call by the shortcut's views; then a clone; back
        ids.set_(ids.untyped_storage(), offset + moved, ids.shape, ids.stride())
        cudnn_flex.flex_attention(q, k, v, **kw)
        assert [t.flatten().tolist() for t in op.calls[-1]["mod_tensors"]] == [ids.tolist()] * 2
    assert op.records == 1


def test_metadata_changed_in_place_takes_the_full_path(op):
    """A transposed table gives other strides in the key (and other views): the full path runs."""
    table = torch.randn(H, S, S)
    kw = {"score_mod": bias_table(table)}
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, **kw)
    _transpose(table)
    cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == 2
    assert op.calls[-1]["mod_tensors"][0].stride() != op.calls[0]["mod_tensors"][0].stride()


def test_a_tensor_that_starts_to_require_grad_is_refused(op):
    """cuDNN returns no gradient for a captured tensor: under autograd the call says so, by the full
    path, even after the shortcut remembered the tensor without grad."""
    kw, slopes = CASES["alibi slopes"]()
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, **kw)
    _requires_grad(kw["score_mod"].__closure__[0].cell_contents)
    with pytest.raises(ValueError, match=r"captures a tensor that requires grad .*capture t\.detach\(\)"):
        cudnn_flex.flex_attention(q, k, v, **kw)
    with torch.no_grad():  # no gradient to lose
        cudnn_flex.flex_attention(q, k, v, **kw)  # the full path: the metadata changed
        cudnn_flex.flex_attention(q, k, v, **kw)  # the shortcut
    assert op.records == 3


def two_biases(first, second):
    """Two per-head biases in one closure (a learned bias next to a fixed ALiBi-style one): two
    captured tensors, each read in place."""
    def bias(score, b, h, q_idx, kv_idx):
        return score + first[h] + second[h]
    return bias


@pytest.mark.parametrize("learned", [0, 1])
def test_either_of_two_captured_tensors_that_requires_grad_is_refused_with_grad(op, learned):
    """Remembered under no_grad with one of two captured tensors requiring grad: with autograd the
    call is refused whichever of the two it is."""
    biases = [torch.randn(H), torch.randn(H)]
    biases[learned].requires_grad_()
    mod = two_biases(*biases)
    q, k, v = qkv()
    with torch.no_grad():
        for _ in range(3):  # the third by the views the shortcut keeps
            cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 1
    with pytest.raises(ValueError, match="captures a tensor that requires grad"):
        cudnn_flex.flex_attention(q, k, v, mod)


@pytest.mark.parametrize("swapped", [0, 1])
def test_either_of_two_captured_tensors_given_new_storage_is_read_there(op, swapped):
    """`.data = new` (no version bump, the same metadata) on either of two captured tensors after
    the shortcut kept views of both: the next call reads the new storage of that one."""
    biases = [torch.randn(H), torch.randn(H)]
    mod = two_biases(*biases)
    q, k, v = qkv()
    for _ in range(3):  # the third by the views the shortcut keeps
        cudnn_flex.flex_attention(q, k, v, mod)
    biases[swapped].data = torch.arange(H, dtype=torch.float32) + 10
    cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 1
    got = [t.flatten().tolist() for t in op.calls[-1]["mod_tensors"]]
    assert sorted(got) == sorted(b.tolist() for b in biases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_tensor_that_requires_grad_remembered_without_grad_is_refused_with_grad(op, dtype):
    """Remembered under no_grad (an eval loop over a learnable table), then called with autograd:
    refused, as the full path refuses it (float64: a table copied to float32 on every call)."""
    table = torch.randn(H, S, S, dtype=dtype, requires_grad=True)
    q, k, v = qkv()
    mod = bias_table(table)
    with torch.no_grad():
        cudnn_flex.flex_attention(q, k, v, mod)
        cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 1
    with pytest.raises(ValueError, match="captures a tensor that requires grad"):
        cudnn_flex.flex_attention(q, k, v, mod)


def test_a_rebound_closure_takes_the_full_path_and_its_new_tensor(op):
    def make():
        slopes = torch.tensor([0.5, 0.25])

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)

        def rebind(t):
            nonlocal slopes
            slopes = t
        return alibi, rebind
    alibi, rebind = make()
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, alibi)
    rebind(torch.tensor([2.0, 4.0]))
    cudnn_flex.flex_attention(q, k, v, alibi)
    assert op.records == 2
    assert op.calls[-1]["mod_tensors"][0].flatten().tolist() == [2.0, 4.0]


def test_a_mod_that_reads_a_value_is_traced_every_call(op):
    """A value read on the host (here a Python bool of a tensor) is no part of the guard's key: such
    a mod is traced on every call, so the shortcut never serves it."""
    scale = torch.tensor([2.0])
    bias = torch.tensor([0.5, -0.5])

    def mod(score, b, h, q_idx, kv_idx):
        return score * 2.0 + bias[h] if bool(scale > 1) else score + bias[h]

    q, k, v = qkv()
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 3 and not fast_path._entries


@pytest.mark.parametrize("read", ["item", "shape"])
def test_a_value_read_with_item_is_never_served_stale(op, read):
    """A captured tensor read with .item() is baked into the program (no input slot): such a mod is
    traced every call. One whose shape is read keys and checks that shape."""
    t = torch.tensor([2.0])

    def by_item(score, b, h, q_idx, kv_idx):
        return score / t.item()

    def by_shape(score, b, h, q_idx, kv_idx):
        return score / t.shape[0]
    mod = by_item if read == "item" else by_shape
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, mod)
    first = op.ids[-1]
    if read == "item":
        t.fill_(0.25)
    else:
        t.resize_(4)
    cudnn_flex.flex_attention(q, k, v, mod)
    assert op.ids[-1] != first
    assert op.ids[-1] == full_path_call(q, k, v, {"score_mod": mod}, op)[0]
    assert op.records == (3 if read == "item" else 2) + 1


def test_a_closure_per_batch_keeps_no_batch_alive(op):
    """Each batch makes its document mask: once the batch's closure goes, so do its entry and its
    ids (without waiting for the cycle collector)."""
    q, k, v = qkv()

    def batch():
        ids = doc_ids()
        return ids, mods.document_mask(ids)
    assert_batches_keep_nothing(op, fast_path._entries, batch,
                                lambda mask: cudnn_flex.flex_attention(q, k, v, mask_mod=mask))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("alongside", [None, "alibi over float slopes"])
@pytest.mark.parametrize("write", ["in place through .data", "through DLPack"])
def test_ids_written_without_a_version_bump_are_read(op, write, alongside, dtype):
    """A write that autograd's version counter does not see (`.data`, DLPack, a CUDA graph replay,
    a custom kernel) is read: int32 ids reach the op as views of their storage, int16 and int64
    ones as float32 copies made on every call. Alongside float slopes, which the shortcut keeps
    as views, the copies are still made anew (the entry keeps views, not copies)."""
    ids = doc_ids()[0].to(dtype)
    kw = {"mask_mod": mods.document_mask(ids)}
    if alongside:
        kw["score_mod"] = mods.alibi(mods.alibi_slopes(H).reshape(-1))
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, **kw)
    version = ids._version
    target = ids.data if write.endswith(".data") else torch.from_dlpack(ids)
    target.copy_(torch.arange(ids.numel(), dtype=ids.dtype))
    assert ids._version == version  # unseen by the version counter
    cudnn_flex.flex_attention(q, k, v, **kw)
    assert op.records == 1
    got = [t.flatten().tolist() for t in op.calls[-1]["mod_tensors"]]
    assert len(got) == (3 if alongside else 2) and list(range(ids.numel())) in got


@pytest.mark.parametrize("ids", ["per position", "per batch", "at a stride"])
def test_int32_ids_are_read_in_place(op, ids):
    """int32 ids reach the op as views of themselves (no copy per call), on the full path and the
    shortcut alike; the shortcut hands the views it kept."""
    doc = {"per position": doc_ids()[0], "per batch": doc_ids(), "at a stride": ids_in_a_buffer(2)}[ids]
    doc[..., -1] += 2**31 - 100  # the view hands the op the value itself (a float32 copy rounds it)
    mask = mods.document_mask(doc)
    q, k, v = qkv()
    rows = doc if doc.dim() == 2 else doc.expand(B, -1)
    for call in range(3):
        cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
        at_q, at_kv = op.calls[-1]["mod_tensors"]
        assert at_q.dtype == at_kv.dtype == torch.int32
        assert at_q.data_ptr() == at_kv.data_ptr() == doc.data_ptr()  # views of doc's storage
        assert torch.equal(at_q.expand(B, 1, S, S), rows[:, None, :S, None].expand(B, 1, S, S))
        assert torch.equal(at_kv.expand(B, 1, S, S), rows[:, None, None, :S].expand(B, 1, S, S))
        if call == 2:  # both shortcut calls hand the same kept views
            assert at_q is op.calls[-2]["mod_tensors"][0] and at_kv is op.calls[-2]["mod_tensors"][1]
    assert op.records == 1


def test_an_int32_scalar_and_gather_stay_float32_copies(op):
    """Only int32 tensors indexed by the index variables are read in place: a 0-dim one (passed by
    value) and one gathered by a computed index reach the op as float32, as before."""
    window = torch.tensor(3, dtype=torch.int32)
    rel = torch.arange(2 * S, dtype=torch.int32) - S

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx < window, score + rel[q_idx - kv_idx + S] * 0.5, score)
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, mod)
    passed = op.calls[-1]["mod_tensors"]
    assert sorted(t.dim() for t in passed) == [0, 4] and all(t.dtype == torch.float32 for t in passed)


def test_int64_values_beyond_int32_keep_their_order(op):
    """int64 tensors reach the op as float32 copies: an int64 max used as "no limit" stays larger
    than every position (a view of its low 32-bit words would read it as -1)."""
    mask = prefix_per_batch(torch.tensor([torch.iinfo(torch.int64).max, 2**32]))
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
        passed = op.calls[-1]["mod_tensors"]
        assert [t.dtype for t in passed] == [torch.float32]
        assert passed[0].flatten().tolist() == [float(2**63), float(2**32)]
    assert op.records == 1


def test_the_reference_path_trains_a_captured_tensor():
    """Only cuDNN drops a captured tensor's gradient: the reference path computes it."""
    table = torch.zeros(H, S, S, requires_grad=True)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    out = cudnn_flex.flex_attention(q, k, v, bias_table(table), backend="reference")
    out.sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize("ids", ["per position", "per batch", "longer than the scores"])
def test_ids_two_slots_read_are_copied_once(op, ids):
    """`doc[q_idx] == doc[kv_idx]` over int64 ids: both slots are views of one float32 copy of the
    ids, on the full path and the shortcut alike; ids much longer than the scores are copied per
    slot instead (one copy of the whole tensor would be more work than the two small ones)."""
    doc = {"per position": doc_ids()[0], "per batch": doc_ids(),
           "longer than the scores": torch.arange(100, dtype=torch.int32) // 3}[ids].long()
    mask = mods.document_mask(doc)
    q, k, v = qkv()
    for _ in range(3):  # the full path, the shortcut's first call (captured_views), its recipe (CopiedViews)
        cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
        at_q, at_kv = op.calls[-1]["mod_tensors"]
        shared = at_q.untyped_storage().data_ptr() == at_kv.untyped_storage().data_ptr()
        assert shared == (ids != "longer than the scores")
        rows = doc if doc.dim() == 2 else doc.expand(B, -1)
        assert at_q.dtype == at_kv.dtype == torch.float32
        assert torch.equal(at_q.expand(B, 1, S, S), rows[:, None, :S, None].float().expand(B, 1, S, S))
        assert torch.equal(at_kv.expand(B, 1, S, S), rows[:, None, None, :S].float().expand(B, 1, S, S))
    assert op.records == 1


def test_the_copies_recipe_refuses_slots_it_cannot_make():
    """record_call.CopiedViews makes its copies in the extension: a slot that names no tensor, more
    axes than its tensor has dimensions, or another count of tensors is a ValueError there, never
    a read out of bounds."""
    from cudnn_flex import _C
    ids = torch.arange(8)
    with pytest.raises(ValueError, match="slot tensor 1"):
        _C.CopiedViews(1, [(1, [1, 1, 8, 1], [2], True)])
    with pytest.raises(ValueError, match="axis 4"):
        _C.CopiedViews(1, [(0, [1, 1, 8, 1], [4], True)])
    too_many = _C.CopiedViews(1, [(0, [1, 1, 8, 8], [2, 3], False)])
    with pytest.raises(ValueError, match="2 axes for a 1-dim tensor"):
        too_many.make([ids])
    with pytest.raises(ValueError, match="2 tensors for 1"):
        too_many.make([ids, ids])
    view, = _C.CopiedViews(1, [(0, [1, 1, 1, 6], [3], False)]).make([ids[2:]])
    assert view.dtype == torch.float32 and torch.equal(view.view(6), ids[2:].float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32, torch.float32])
def test_a_captured_buffer_can_be_swapped_by_load_state_dict(op, dtype):
    """A module's ids buffer that the mask captures, after the shortcut has made its copies (int64,
    bool) or kept its views (int32, float32) a few times, can still be replaced by load_state_dict
    under torch's swap setting (torch.utils.swap_tensors refuses a tensor that something else
    holds a handle to, a view of it included); the next call reads the loaded values."""
    module = torch.nn.Module()
    module.register_buffer("doc", doc_ids()[0].to(dtype))
    mask = mods.document_mask(module.doc)
    q, k, v = qkv()
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
    loaded = (torch.arange(S) % 2).to(dtype)
    op.calls.clear()  # the stub's record of the full path's call holds that call's views of the buffer
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.load_state_dict({"doc": loaded})
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
    assert torch.equal(op.calls[-1]["mod_tensors"][0].flatten().float(), loaded.float())


class PlainWhenDetached(torch.Tensor):
    """A float table of a subclass whose detach() gives a plain tensor (as nn.Parameter's does),
    logging each call of the op it sees."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        if is_the_op(func):
            cls.seen.append(func)
            return op_zeros(args)
        if func is torch.Tensor.detach:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args).as_subclass(torch.Tensor)
        return super().__torch_function__(func, types_, args, kwargs)


def test_a_table_of_a_subclass_reaches_its_torch_function_on_every_call(op):
    """The views the shortcut keeps of a float table are made as the full path makes them: of a
    subclass, they stay of the subclass, whose __torch_function__ sees every call of the op."""
    PlainWhenDetached.seen = []
    mod = bias_table(torch.randn(H, S, S).as_subclass(PlainWhenDetached))
    q, k, v = qkv()
    for _ in range(3):
        cudnn_flex.flex_attention(q, k, v, mod)
    assert len(PlainWhenDetached.seen) == 3 and not op.calls


def test_a_captured_table_whose_class_changes_in_place_reaches_its_torch_function(op):
    """The shortcut calls the op without torch.ops while every tensor it hands is a plain
    torch.Tensor. A captured table made a subclass in place (`t.__class__ = Sub`) after calls
    that took the shortcut is no longer one: its __torch_function__ sees the next calls of the op,
    as on the full path."""
    PlainWhenDetached.seen = []
    table = torch.randn(H, S, S)
    mod = bias_table(table)
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, mod)
    assert len(op.calls) == 2 and op.records == 1
    table.__class__ = PlainWhenDetached
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, mod)
    assert len(PlainWhenDetached.seen) == 2 and len(op.calls) == 2


class EmptiesTheOpsList(torch.Tensor):
    """A float table of a subclass whose __torch_function__ answers the op itself, noting the mod
    tensors it was handed, and then empties the op's argument list (its own to edit)."""
    handed: list = []

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        if is_the_op(func):
            cls.handed.append(list(args[3]))
            args[3].clear()
            return op_zeros(args)
        return super().__torch_function__(func, types_, args, kwargs)


def test_a_subclass_that_edits_the_ops_arguments_changes_no_later_call(op):
    """A subclass's __torch_function__ sees the op's own argument list: what it does to it stays
    in its call, whether the shortcut made its views in that call or kept them from before."""
    EmptiesTheOpsList.handed = []
    mod = bias_table(torch.randn(H, S, S).as_subclass(EmptiesTheOpsList))
    q, k, v = qkv()
    for _ in range(4):
        cudnn_flex.flex_attention(q, k, v, mod)
    assert [len(handed) for handed in EmptiesTheOpsList.handed] == [1, 1, 1, 1]
    assert EmptiesTheOpsList.handed[2][0] is EmptiesTheOpsList.handed[3][0]  # a kept view


class EditsTheOpsTensors(torch.overrides.TorchFunctionMode):
    """A mode that hands the op bfloat16 copies of the mod tensors, by editing its argument list."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        if is_the_op(func):
            args[3][:] = [t.to(torch.bfloat16) for t in args[3]]
            return op_zeros(args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("calls_before", [1, 2])
def test_a_mode_that_edits_the_ops_arguments_changes_no_later_call(op, calls_before):
    """A TorchFunctionMode sees the op's own argument list: what it does to it stays in its call
    (which runs in full: the shortcut leaves checks to the op, which a mode may not run), whether
    the shortcut had made its views before (two calls before) or not. The next call, without the
    mode, takes the shortcut and reads the captured table as it is then."""
    table = torch.randn(H, S, S)
    mod = bias_table(table)
    q, k, v = qkv()
    for _ in range(calls_before):
        cudnn_flex.flex_attention(q, k, v, mod)
    with EditsTheOpsTensors():
        cudnn_flex.flex_attention(q, k, v, mod)
    table.add_(1)
    cudnn_flex.flex_attention(q, k, v, mod)
    got, = op.calls[-1]["mod_tensors"]
    assert got.dtype == torch.float32 and torch.equal(got[0], table) and op.records == 2


class LoggedIds(torch.Tensor):
    """Document ids of a subclass that keeps its type through ops and answers the op itself,
    logging each call it sees."""
    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        if is_the_op(func):
            cls.seen.append(func)
            return op_zeros(args)
        return super().__torch_function__(func, types_, args, kwargs)


def test_ids_of_a_subclass_reach_its_torch_function_on_every_call(op):
    """int64 ids of a tensor subclass: every call's copies are made through torch (the
    subclass's __torch_function__ sees them, and so the op), on the shortcut as on the full
    path; the extension's copies, which no handler sees, are for plain tensors only."""
    LoggedIds.seen = []
    mask = mods.document_mask(doc_ids()[0].long().as_subclass(LoggedIds))
    q, k, v = qkv()
    for call in range(1, 5):
        cudnn_flex.flex_attention(q, k, v, mask_mod=mask)
        assert len(LoggedIds.seen) == call


def test_a_kept_full_length_side_of_a_subclass_reaches_its_torch_function(op):
    """A padded call given only seq_lens_kv is handed the kept full side for its queries; made a
    subclass in place (a handler that saw the op's arguments could), the shortcut hands it through
    torch.ops, and its __torch_function__ sees the op."""
    PlainWhenDetached.seen = []
    q, k, v = qkv()
    lens = torch.full((q.shape[0],), S - 1, dtype=torch.int32)
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal, seq_lens_kv=lens)
    kept = op.calls[-1]["seq_lens"][0]
    assert kept is not lens and type(kept) is torch.Tensor
    kept.__class__ = PlainWhenDetached
    try:
        cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal, seq_lens_kv=lens)
    finally:
        kept.__class__ = torch.Tensor  # kept for the process: later tests are handed it too
    assert len(PlainWhenDetached.seen) == 1 and len(op.calls) == 2
