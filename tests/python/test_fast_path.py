"""The shortcut of a repeated call (fast_path.py), on the CPU: cuDNN's op is replaced by a stub that
records which program each call runs, so that a test sees when the shortcut is taken and that it
always runs the program the full path would."""

import math
import operator
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

import cudnn_flex
from cudnn_flex import dsl_mods, fast_path, mods
from cudnn_flex.program import guard
from stub_op import is_the_op, logged_subclass, op, op_zeros  # noqa: F401  (op: a fixture)


def qkv(s=8, layout_shape=None):
    shape = layout_shape or (1, 2, s, 16)
    return [torch.randn(shape, dtype=torch.bfloat16) for _ in range(3)]


def run_twice(op, **kw):
    """Two calls: (records of the full path, ids of each call)."""
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, **kw)
    return op.records, op.ids


def rebindable_softcap():
    """(a softcap over a closure cell holding 20.0, a function that rebinds the cell to 30.0)."""
    cap = 20.0

    def mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    def rebind():
        nonlocal cap
        cap = 30.0
    return mod, rebind


def make_softcap(cap):
    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return softcap


_CAP = dsl_mods.softcap(20.0)  # its backward reads what its forward recorded: one object for both
KINDS = {
    "no mod": {},
    "DSL function": {"score_mod": dsl_mods.causal},
    "torch-style closure": {"score_mod": mods.softcap(20.0)},
    "mask_mod": {"mask_mod": mods.causal},
    "mask_mod and score_mod": {"mask_mod": mods.sliding_window(4), "score_mod": mods.softcap(20.0)},
    "keyed object's methods": {"score_mod": _CAP.forward, "score_mod_bprop": _CAP.backward},
    "keyed callable": {"score_mod": dsl_mods.relative_bias(0.5)},
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_repeat_takes_the_shortcut_to_the_same_program(op, kind):
    records, ids = run_twice(op, **KINDS[kind])
    assert records == 1
    assert ids[0] == ids[1]


def test_each_kind_runs_its_own_program(op):
    """The shortcut's key tells the kinds apart: every kind above gets the id the full path gave it."""
    q, k, v = qkv()
    full = {}
    for kind, kw in KINDS.items():
        cudnn_flex.flex_attention(q, k, v, **kw)
        full[kind] = op.ids[-1]
    for kind, kw in KINDS.items():
        cudnn_flex.flex_attention(q, k, v, **kw)
        assert op.ids[-1] == full[kind], kind
    assert op.records == len(KINDS)


def changes():
    """(name, mod, change(mod), the mod a fresh closure of the changed values would be)."""
    out = []

    mod, change = rebindable_softcap()
    out.append(("closure cell rebound", mod, change, make_softcap(30.0)))

    def with_default(score, b, h, q_idx, kv_idx, scale=2.0):
        return score * scale
    def change_default():
        with_default.__defaults__ = (3.0,)
    out.append(("default replaced", with_default, change_default,
                lambda score, b, h, q_idx, kv_idx, scale=3.0: score * scale))

    def plus(score, b, h, q_idx, kv_idx):
        return score + 1.0
    def change_code():
        plus.__code__ = (lambda score, b, h, q_idx, kv_idx: score - 1.0).__code__
    out.append(("code replaced", plus, change_code, lambda score, b, h, q_idx, kv_idx: score - 1.0))

    def outer_factory():
        inner = make_softcap(20.0)

        def outer(score, b, h, q_idx, kv_idx):
            return inner(score, b, h, q_idx, kv_idx) * 2.0

        def change():
            nonlocal inner
            inner = make_softcap(30.0)
        return outer, change
    outer, change_inner = outer_factory()
    out.append(("a function in the closure replaced", outer, change_inner,
                (lambda f: (lambda score, b, h, q_idx, kv_idx: f(score, b, h, q_idx, kv_idx) * 2.0))(make_softcap(30.0))))

    scales = [2.0]

    def listed(score, b, h, q_idx, kv_idx):
        return score * scales[0]
    def change_list():
        scales[0] = 3.0
    out.append(("a list in the closure changed in place", listed, change_list,
                lambda score, b, h, q_idx, kv_idx: score * 3.0))

    chain = [make_softcap(20.0)]
    composed = mods.compose(*chain)  # a tuple of functions in its closure
    def change_composed():
        chain[0].__code__ = make_softcap(30.0).__code__  # the same code: nothing the program sees changes
        chain[0].__closure__[0].cell_contents = 30.0
    out.append(("a function inside a tuple in the closure changed", composed, change_composed,
                mods.compose(make_softcap(30.0))))
    return out


@pytest.mark.parametrize("name,mod,change,expected", changes(), ids=[c[0] for c in changes()])
def test_a_changed_mod_is_recorded_again(op, name, mod, change, expected):
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, mod)
    before = op.ids[-1]
    change()
    cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 2
    cudnn_flex.flex_attention(q, k, v, expected)
    assert op.ids[-2] == op.ids[-1] != before


def test_a_global_defined_later_under_a_name_the_mod_reads(op):
    """`tanh` is no global at the first call (a name the mod's code looks up, as an attribute);
    once a module global of that name exists, the guard no longer vouches for the mod, and every
    call records it."""
    namespace = {"torch": torch}
    exec("def mod(score, b, h, q_idx, kv_idx):\n    return torch.tanh(score)\n"
         "def reads_offset(score, b, h, q_idx, kv_idx):\n    return score + offset\n", namespace)
    namespace["offset"] = 1.0
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, namespace["mod"])
    cudnn_flex.flex_attention(q, k, v, namespace["mod"])
    assert op.records == 1
    namespace["tanh"] = 5
    cudnn_flex.flex_attention(q, k, v, namespace["mod"])
    cudnn_flex.flex_attention(q, k, v, namespace["mod"])
    assert op.records == 3
    for _ in range(2):  # a mod reading a user's global is recorded on every call
        cudnn_flex.flex_attention(q, k, v, namespace["reads_offset"])
    assert op.records == 5


def test_a_keyed_object_with_a_new_key_gets_a_new_program(op):
    cap = dsl_mods.softcap(20.0)
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward)
    first = op.ids[-1]
    cap.cap = 30.0  # the key is (cap,): the object promises another program
    cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward)
    assert op.records == 2 and op.ids[-1] != first
    other = dsl_mods.softcap(30.0)
    cudnn_flex.flex_attention(q, k, v, other.forward, other.backward)
    assert op.ids[-1] == op.ids[-2] and op.records == 2  # an equal promise: the shortcut


@pytest.mark.parametrize("what", ["q length", "kv length", "heads", "layout", "backend"])
def test_another_shape_or_option_takes_the_full_path(op, what):
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    if what == "q length":
        q = torch.randn(1, 2, 9, 16, dtype=torch.bfloat16)
    elif what == "kv length":
        k, v = (torch.randn(1, 2, 9, 16, dtype=torch.bfloat16) for _ in range(2))
    elif what == "heads":
        q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
    kw = {"layout": "bshd"} if what == "layout" else {"backend": "cudnn"} if what == "backend" else {}
    if what == "layout":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, **kw)
    assert op.records == 2


def test_clear_cache_forgets_the_shortcut(op):
    run_twice(op, score_mod=dsl_mods.causal)
    cudnn_flex.clear_cache()
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    assert op.records == 2


def test_the_shortcut_keeps_the_call_options(op):
    q, k, v = (t.transpose(1, 2).contiguous() for t in qkv())  # bshd
    first = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, layout="bshd", return_lse=True)
    second = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, layout="bshd", return_lse=True)
    assert op.records == 1
    for a, b in zip(first, second):
        assert a.shape == b.shape and a.stride() == b.stride()
    assert first[0].shape == q.shape  # out in the caller's layout
    out = cudnn_flex.flex_attention(q, k, v, dsl_mods.causal, layout="bshd")
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


@pytest.mark.parametrize("scale", [0.5, 1, float("nan"), True])
def test_a_scale_the_shortcut_does_not_take_goes_the_full_path(op, scale):
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, scale=0.25)
    if isinstance(scale, bool) or (isinstance(scale, float) and math.isnan(scale)):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            cudnn_flex.flex_attention(q, k, v, scale=scale)
    else:
        cudnn_flex.flex_attention(q, k, v, scale=scale)
        assert op.records == 1  # a finite number: the shortcut


def test_a_refusal_of_the_op_gets_the_full_paths_error(op):
    """The shortcut leaves q, k and v to the C++ op's checks; when it refuses them, the full path
    runs and raises its own error, which names the argument."""
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v)
    strided = torch.randn(1, 2, 8, 32, dtype=torch.bfloat16)[..., ::2]  # the same shape, a strided head dim
    op.refuse = ValueError("cudnn_flex: q, k, v must be CUDA tensors with a dense last dim")
    with pytest.raises(ValueError, match=r"q's head dim is not contiguous .* pass q.contiguous\(\)"):
        cudnn_flex.flex_attention(strided, k, v)


def test_an_op_without_a_kernel_for_the_call_takes_the_full_path(op):
    """The dispatcher raises NotImplementedError for a tensor layout the op has no kernel for (a
    sparse score_mod tensor, which the shortcut leaves to the op): the full path runs, and says
    what it says of it."""
    q, k, v = qkv()
    tensors = {"slopes": torch.ones(1, 2, 1, 1)}
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=tensors)
    op.refuse = NotImplementedError("Could not run 'cudnn_flex::fwd' with arguments from the 'SparseCUDA' backend")
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=tensors)
    assert op.records == 2 and len(op.ids) == 3


def test_a_torch_function_mode_sees_the_op(op):
    """torch.ops calls __torch_function__ handlers, _C.fwd does not: under a TorchFunctionMode the
    call goes through torch.ops."""
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            if is_the_op(func):
                seen.append(func)
                return op_zeros(args)
            return func(*args, **(kwargs or {}))

    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    with Spy():
        cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    assert len(seen) == 1 and len(op.ids) == 1


def test_a_torch_function_mode_that_answers_the_op_gets_the_full_paths_checks(op):
    """A mode may answer the op without running it, so without the op's checks of the tensors
    (which the shortcut leaves to the op): under a mode the full path runs, and refuses in Python
    a score_mod tensor that does not broadcast, as without a mode."""
    class Answering(TorchFunctionMode):
        def __torch_function__(self, func, types_, args=(), kwargs=None):
            if is_the_op(func):
                return op_zeros(args)
            return func(*args, **(kwargs or {}))

    q, k, v = qkv()
    fitting, wide = {"slopes": torch.ones(1, 2, 1, 1)}, {"slopes": torch.ones(1, 3, 1, 1)}
    cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=fitting)
    with Answering(), pytest.raises(ValueError, match=r"score_mod_tensors\['slopes'\] has shape \(1, 3, 1, 1\)"):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors=wide)


def test_entries_are_bounded(op, monkeypatch):
    monkeypatch.setattr(fast_path, "_MAX_ENTRIES", 3)
    for s in range(2, 8):
        q, k, v = qkv(s)
        cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    assert len(fast_path._entries) == 3


# ---------------------------------------------------------------------------------------------
# guard.snapshot: unchanged() holds only while key() is what it was


def test_snapshot_refuses_what_key_refuses():
    slopes = torch.ones(2)
    assert guard.snapshot(mods.alibi(slopes)) is None  # a tensor in the closure, without leaves
    leaves = []
    assert guard.snapshot(mods.alibi(slopes), leaves) is not None
    assert len(leaves) == 1 and leaves[0]._base is slopes  # alibi keeps slopes.reshape(-1)
    assert guard.snapshot(dsl_mods.softcap(2.0)) is None  # an object: no guard
    assert guard.snapshot(mods.causal) is not None


def test_unchanged_holds_exactly_while_the_same_objects_are_read():
    value = [1.0]

    def make():
        cap = 2.0

        def mod(score, b, h, q_idx, kv_idx, k=3):
            return score * cap + value[0] * k

        def rebind(x):
            nonlocal cap
            cap = x
        return mod, rebind
    mod, rebind = make()
    same_float = mod.__closure__[0].cell_contents
    reads, before = guard.snapshot(mod), guard.key(mod)
    assert guard.unchanged(reads)
    rebind(same_float)
    assert guard.unchanged(reads) and guard.key(mod) == before
    rebind(5.0)
    assert not guard.unchanged(reads) and guard.key(mod) != before
    rebind(same_float)
    assert guard.unchanged(reads)
    value[0] = 2.0  # the list in the closure, changed in place
    assert not guard.unchanged(reads) and guard.key(mod) != before
    value[0] = 1.0
    mod.__defaults__ = (4,)
    assert not guard.unchanged(reads) and guard.key(mod) != before


def test_a_deleted_cell_is_a_change():
    def make():
        cap = 2.0

        def mod(score, b, h, q_idx, kv_idx):
            return score * cap

        def forget():
            nonlocal cap
            del cap
        return mod, forget
    mod, forget = make()
    reads = guard.snapshot(mod)
    forget()
    assert not guard.unchanged(reads)


def test_a_library_global_rebound_or_deleted_is_a_change():
    """The globals a mod's code names: those that were library modules must stay the very same
    objects, and those that were absent must stay absent (each read its own way)."""
    namespace = {"torch": torch, "math": math}
    exec("def mod(score, b, h, q_idx, kv_idx):\n    return torch.tanh(score) * math.pi\n", namespace)
    mod = namespace["mod"]
    reads = guard.snapshot(mod)
    assert reads is not None and guard.unchanged(reads)
    namespace["math"] = operator  # another library module under the same name
    assert not guard.unchanged(reads)
    namespace["math"] = math
    assert guard.unchanged(reads)
    del namespace["torch"]
    assert not guard.unchanged(reads)
    namespace["torch"] = torch
    assert guard.unchanged(reads)
    namespace["pi"] = 3.0  # absent before: an attribute name the code looks up
    assert not guard.unchanged(reads)


class KeysCopied(dict):
    """Globals whose keys() is a copy: CPython reads a dict subclass's globals by __getitem__."""

    def keys(self):
        return frozenset(dict.keys(self))


def test_globals_of_a_dict_subclass_are_looked_up_name_by_name():
    namespace = KeysCopied(torch=torch)
    exec("def mod(score, b, h, q_idx, kv_idx):\n    return score - abs(q_idx - kv_idx)\n", namespace)
    reads = guard.snapshot(namespace["mod"])
    assert reads is not None and guard.unchanged(reads)
    namespace["abs"] = lambda x: x * 0  # shadows the builtin: the mod computes another program
    assert not guard.unchanged(reads)


def test_the_binding_translates_errors():
    """_C.fwd raises what torch.ops raises: the op's own exception types, not RuntimeError."""
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(NotImplementedError, match="cudnn_flex::fwd"):
        cudnn_flex._C.fwd(q, q, q, [], [], 0, 0, True, None, False, [], [], [])
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        qc = torch.empty(1, 2, 4, 8, device="cuda", dtype=torch.float16)
        kc = torch.empty(1, 3, 4, 8, device="cuda", dtype=torch.float16)
        with pytest.raises(ValueError, match="cudnn_flex: k and v need the same number of heads"):
            cudnn_flex._C.fwd(qc, kc, qc, [], [], 0, 0, True, None, False, [], [], [])
        out, lse = cudnn_flex._C.fwd(qc, qc, qc, [], [], 0, 0, True, None, False, [], [], [])
        assert out.shape == qc.shape and lse.shape == qc.shape[:3]


def test_the_bprop_is_part_of_the_key(op):
    """One score_mod with its hand-written bprop, then with the derived one: two programs."""
    cap = dsl_mods.softcap(20.0)
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward)
        cudnn_flex.flex_attention(q, k, v, cap.forward)
    assert op.ids[0] == op.ids[2] != op.ids[1] == op.ids[3]
    assert op.records == 2


def _tenfold(graph, score, tensors):
    return graph.mul(score, 10.0)


def _tenfold_bprop(graph, d_p, tensors):
    return graph.mul(d_p, 10.0)


def _tenfold_bprop_wrong(graph, d_p, tensors):
    return graph.mul(d_p, 0.1)


def test_each_bprop_function_is_part_of_the_key(op):
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, _tenfold, _tenfold_bprop)
        cudnn_flex.flex_attention(q, k, v, _tenfold, _tenfold_bprop_wrong)
    assert op.ids[0] == op.ids[2] != op.ids[1] == op.ids[3]
    assert op.records == 2


class _SoftcapTwoBackwards(dsl_mods.Softcap):
    """One keyed object with two bprops: its key is read once per call for both of its methods."""

    def backward_halved(self, graph, d_p, tensors):
        return graph.mul(graph.tanh_backward(d_p, self._before_tanh), 0.5)


def test_each_method_of_one_keyed_object_is_its_own_bprop(op):
    cap = _SoftcapTwoBackwards(20.0)
    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward)
        cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward_halved)
    assert op.ids[0] == op.ids[2] != op.ids[1] == op.ids[3]
    assert op.records == 2


def _halved(self, graph, d_p, tensors):
    return graph.mul(d_p, 0.5)


def _doubled(self, graph, d_p, tensors):
    return graph.mul(d_p, 2.0)


def test_unnamed_bprop_methods_of_one_keyed_object_are_not_one_bprop(op):
    """A method whose function has no name does not read its object's promise (explicit_key):
    two such bprops of one object are recorded each call, not served each other's program."""
    cap = dsl_mods.softcap(20.0)
    unnamed = [types.MethodType(types.FunctionType(fn.__code__, globals(), ""), cap) for fn in (_halved, _doubled)]
    q, k, v = qkv()
    for _ in range(2):
        for bprop in unnamed:
            cudnn_flex.flex_attention(q, k, v, cap.forward, bprop)
    assert op.records == 4 and op.ids[0] != op.ids[1]


def test_a_tensor_made_inside_the_mod_is_read_every_call(op):
    """No closure tensor, but the mod makes one: an input slot the full path fills every call."""
    def per_head_bias(score, b, h, q_idx, kv_idx):
        return score + torch.tensor([0.5, -0.5])[h]

    q, k, v = qkv()
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, per_head_bias)
    assert op.records == 2 and not fast_path._entries


def test_a_tensor_subclass_gets_torch_ops(op):
    """A subclass's __torch_function__ sees the op, as it did through torch.ops."""
    seen = []
    Logged = logged_subclass(seen)

    q, k, v = (t.as_subclass(Logged) for t in qkv())
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    assert len(seen) == 2 and not op.ids


def test_a_mod_that_changes_its_closure_while_recorded_is_never_served_stale(op):
    """An annealing mod advances its own step each time it is recorded: what its guard read
    before the call is not what the recorded program used, so no call takes the shortcut."""
    def annealed():
        step = 0

        def mod(score, b, h, q_idx, kv_idx):
            nonlocal step
            step += 1
            return score * (step / 4)
        return mod
    mod = annealed()
    q, k, v = qkv()
    for _ in range(4):
        cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 4 and len(set(op.ids)) == 4


def test_a_closure_changed_while_the_op_ran_is_not_remembered(op):
    """Another thread rebinds a closure value while the first call's graph is built (the GIL is
    released then): the program of the old value must not be remembered under the new one."""
    mod, rebind = rebindable_softcap()
    real_fwd = op.fwd

    def fwd_while_another_thread_rebinds(*args):
        rebind()
        op.fwd = real_fwd
        return real_fwd(*args)

    op.fwd = fwd_while_another_thread_rebinds
    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, mod)
    cudnn_flex.flex_attention(q, k, v, mod)
    cudnn_flex.flex_attention(q, k, v, make_softcap(30.0))
    assert op.ids[1] == op.ids[2] != op.ids[0]


def test_marking_a_mod_torch_style_later_takes_the_full_path(op):
    def mod(*args):  # the signature says nothing: a DSL mod until marked
        if len(args) == 3:
            graph, score, _ = args
            return graph.mul(score, 2.0)
        return args[0] * 2.0

    q, k, v = qkv()
    cudnn_flex.flex_attention(q, k, v, mod)
    cudnn_flex.torch_score_mod(mod)
    cudnn_flex.flex_attention(q, k, v, mod)
    assert op.records == 2


def test_a_subclass_among_the_lengths_gets_torch_ops(op):
    seen = []
    Logged = logged_subclass(seen)

    q, k, v = qkv()
    lengths = torch.tensor([5], dtype=torch.int32).as_subclass(Logged)
    cudnn_flex.flex_attention(q, k, v, seq_lens_kv=lengths)
    assert len(seen) == 1 and not op.ids
