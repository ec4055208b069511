"""Graph identity: a cached graph is reused only for a call whose mod computes the same program.

Each case is one that reused a stale graph when graphs were keyed by the callable's name (the
correctness issue): the second call must get another program id (a rebuild) and the right result.
The id is what the C++ op keys its graphs by; the result is checked on the reference path, which
evaluates the same recorded program cuDNN is given, against the formula written out here.
"""

import gc
import importlib
import sys
import types
import warnings
import weakref

import pytest
import torch

import cudnn_flex
from cudnn_flex import _registry, mods
from cudnn_flex.record_call import record_call as _record

B, H, S, D = 1, 2, 12, 8


def qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))


def program_of(score_mod=None, mask_mod=None, tensors=None):
    q = torch.empty(B, H, S, D)
    program, views, _ = _record(score_mod, None, mask_mod, tensors, None, q, S)
    return program, views


def attention(scores_fn, q, k, v):
    """Independent oracle: softmax(scores_fn(q k^T / sqrt(D))) v in float64."""
    s = scores_fn((q @ k.transpose(-1, -2)) / D ** 0.5)
    return torch.softmax(s, dim=-1) @ v


def run(score_mod=None, mask_mod=None, tensors=None):
    q, k, v = qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cudnn_flex.ReferencePathWarning)
        return cudnn_flex.flex_attention(q, k, v, score_mod, score_mod_tensors=tensors, mask_mod=mask_mod)


def scaled(c):
    return lambda s: s * c


def assert_matches(out, scores_fn):
    q, k, v = qkv()
    torch.testing.assert_close(out, attention(scores_fn, q, k, v), rtol=1e-10, atol=1e-10)


# --- defaults, redefinitions, globals, attributes --------------------------------------------------

def test_lambda_with_keyword_only_default_made_in_a_loop():
    made = [lambda g, s, t, *, c=c: g.mul(s, c) for c in (0.5, 2.0)]
    ids = [program_of(f)[0].mod_id for f in made]
    assert ids[0] != ids[1]
    for f, c in zip(made, (0.5, 2.0)):
        assert_matches(run(f), scaled(c))


def test_nested_function_with_positional_default():
    def factory(c):
        def mod(g, s, t, c=c):
            return g.mul(s, c)
        return mod
    assert program_of(factory(1.5))[0].mod_id != program_of(factory(3.0))[0].mod_id
    assert program_of(factory(1.5))[0].mod_id == program_of(factory(1.5))[0].mod_id


def _module_from_source(name, source):
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


def test_function_redefined_under_the_same_module_and_name():
    """A notebook cell run again, importlib.reload, two files loaded under one module name."""
    first = _module_from_source("cf_user_mod", "def mod(g, s, t):\n    return g.mul(s, 0.5)\n")
    second = _module_from_source("cf_user_mod", "def mod(g, s, t):\n    return g.mul(s, 4.0)\n")
    assert first.mod.__qualname__ == second.mod.__qualname__
    assert program_of(first.mod)[0].mod_id != program_of(second.mod)[0].mod_id
    assert_matches(run(first.mod), scaled(0.5))
    assert_matches(run(second.mod), scaled(4.0))


def test_importlib_reload(tmp_path, monkeypatch):
    path = tmp_path / "cf_reloaded.py"
    path.write_text("def mod(g, s, t):\n    return g.mul(s, 0.5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("cf_reloaded")
    before = program_of(module.mod)[0].mod_id
    path.write_text("def mod(g, s, t):\n    return g.mul(s, 0.25)\n")
    importlib.invalidate_caches()
    module = importlib.reload(module)
    sys.modules.pop("cf_reloaded", None)
    assert program_of(module.mod)[0].mod_id != before
    assert_matches(run(module.mod), scaled(0.25))


SCALE = 0.5


def dsl_reads_global(g, s, t):
    return g.mul(s, SCALE)


def torch_reads_global(score, b, h, q_idx, kv_idx):
    return score * SCALE


@pytest.mark.parametrize("mod", [dsl_reads_global, torch_reads_global])
def test_module_level_function_reading_a_global_that_changes(mod, monkeypatch):
    first = program_of(mod)[0].mod_id
    assert_matches(run(mod), scaled(0.5))
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    assert program_of(mod)[0].mod_id != first
    assert_matches(run(mod), scaled(3.0))


class Cfg:
    softcap = 5.0


def torch_reads_class_attribute(score, b, h, q_idx, kv_idx):
    return torch.tanh(score / Cfg.softcap) * Cfg.softcap


def test_torch_style_reading_a_class_attribute(monkeypatch):
    first = program_of(torch_reads_class_attribute)[0].mod_id
    monkeypatch.setattr(Cfg, "softcap", 0.7)
    assert program_of(torch_reads_class_attribute)[0].mod_id != first
    assert_matches(run(torch_reads_class_attribute), lambda s: torch.tanh(s / 0.7) * 0.7)


def test_torch_style_reading_an_attribute_of_an_imported_module(monkeypatch):
    config = types.ModuleType("cf_config")
    config.WINDOW = 3
    monkeypatch.setitem(sys.modules, "cf_config", config)

    def window(b, h, q_idx, kv_idx):
        import cf_config
        return (q_idx >= kv_idx) & (q_idx - kv_idx < cf_config.WINDOW)

    def expected(w):
        i = torch.arange(S)
        keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)
        return lambda s: s.masked_fill(~keep, float("-inf"))

    first = program_of(None, window)[0].mod_id
    assert_matches(run(mask_mod=window), expected(3))
    config.WINDOW = 5
    assert program_of(None, window)[0].mod_id != first
    assert_matches(run(mask_mod=window), expected(5))


def test_item_of_a_captured_tensor_whose_value_changes():
    temperature = torch.tensor(2.0)

    def mod(score, b, h, q_idx, kv_idx):
        return score / temperature.item()

    first = program_of(mod)[0].mod_id
    assert_matches(run(mod), scaled(0.5))
    temperature.fill_(4.0)
    assert program_of(mod)[0].mod_id != first
    assert_matches(run(mod), scaled(0.25))


@pytest.mark.parametrize("convert", [float, int])
def test_float_or_int_of_a_captured_tensor(convert):
    box = torch.tensor(2.0)

    def mod(score, b, h, q_idx, kv_idx):
        return score * convert(box)

    assert_matches(run(mod), scaled(2.0))
    box.fill_(3.0)
    assert_matches(run(mod), scaled(3.0))


def test_captured_dict_whose_keys_or_order_change():
    weights = {"a": 0.5, "b": 2.0}

    def mod(score, b, h, q_idx, kv_idx):
        first_key = next(iter(weights))
        return score * weights[first_key]

    first = program_of(mod)[0].mod_id
    assert_matches(run(mod), scaled(0.5))
    weights.pop("a")
    weights["a"] = 0.5  # now "b" comes first
    assert program_of(mod)[0].mod_id != first
    assert_matches(run(mod), scaled(2.0))


def test_captured_list_whose_order_changes():
    factors = [0.5, 3.0]

    def mod(score, b, h, q_idx, kv_idx):
        return score * factors[0]

    assert_matches(run(mod), scaled(0.5))
    factors.reverse()
    assert_matches(run(mod), scaled(3.0))


def doc_mask(q_ids, kv_ids):
    def mask(b, h, q_idx, kv_idx):
        return q_ids[q_idx] == kv_ids[kv_idx]
    return mask


def test_one_tensor_captured_twice_then_two_tensors():
    ids = torch.tensor([0] * 5 + [1] * 7)
    other = torch.tensor([0] * 8 + [1] * 4)

    def expected(q_ids, kv_ids):
        keep = q_ids[:, None] == kv_ids[None, :]
        return lambda s: s.masked_fill(~keep, float("-inf"))

    assert_matches(run(mask_mod=doc_mask(ids, ids)), expected(ids, ids))
    # Same positions, two different tensors: each must be read where it is indexed.
    assert_matches(run(mask_mod=doc_mask(ids, other)), expected(ids, other))
    _, views = program_of(None, doc_mask(ids, other))
    assert len(views) == 2  # one slot per (tensor, index variable), both read at run time


def test_same_program_same_id_and_tensor_values_are_inputs():
    a = program_of(mods.alibi(torch.rand(H)))[0]
    b = program_of(mods.alibi(torch.rand(H)))[0]
    assert a.mod_id == b.mod_id and a is b


# --- keyed objects: an explicit promise --------------------------------------------------------------

class Keyed:
    def __init__(self, c):
        self.c = c

    def score_mod_graph_cache_key(self):
        return ("keyed",)  # a promise the user breaks below

    def __call__(self, g, s, t):
        return g.mul(s, self.c)


def test_explicit_key_is_a_promise_that_skips_recording():
    first = program_of(Keyed(0.5))[0]
    # Same key: the program recorded under it is reused (the user promised it is the same).
    assert program_of(Keyed(2.0))[0] is first


def test_key_with_a_tensor_is_refused():
    class Bad(Keyed):
        def score_mod_graph_cache_key(self):
            return (torch.zeros(1),)

    with pytest.raises(TypeError, match="contains a torch.Tensor"):
        program_of(Bad(1.0))


# --- clear_cache and memory ---------------------------------------------------------------------------

def test_clear_cache_forgets_every_program_and_derived_decision():
    program_of(mods.softcap(3.0))
    assert _registry._by_recording
    cudnn_flex.clear_cache()
    assert not _registry._by_recording and not _registry._by_promise
    assert cudnn_flex.cache_stats()["size"] == 0


def test_programs_hold_no_captured_tensor():
    big = torch.randn(S)
    ref = weakref.ref(big)
    program, views = program_of(None, doc_mask(big, big))
    del views, big
    gc.collect()
    assert ref() is None, "a recorded program kept a captured tensor alive"
    assert program.mod_id


def test_program_table_is_bounded(monkeypatch):
    monkeypatch.setattr(_registry, "_CAPACITY", 8)
    for w in range(1, 40):
        program_of(None, mods.sliding_window(w))
    assert len(_registry._by_recording) <= 8


def test_a_held_program_is_found_after_clear_cache():
    """The forward's autograd node holds its program: the backward finds it whatever ran."""
    program = program_of(mods.softcap(2.0))[0]
    cudnn_flex.clear_cache()
    assert _registry.lookup(program.mod_id) is program
    assert _registry.lookup(program.bprop_id) is program
    gone = program.mod_id
    del program
    gc.collect()
    with pytest.raises(RuntimeError, match="no recorded score_mod program"):
        _registry.lookup(gone)


class Block(torch.nn.Module):
    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return torch.tanh(score / self.cap) * self.cap


def test_nn_module_method_is_cacheable():
    block = Block(4.0)
    assert program_of(block.score_mod)[0] is program_of(block.score_mod)[0]
    block.cap = 6.0
    assert program_of(block.score_mod)[0].mod_id != program_of(Block(4.0).score_mod)[0].mod_id


def test_op_attributes_are_part_of_the_program():
    slope = [0.1, 0.3]
    mods_ = [lambda g, s, t, a=a: g.leaky_relu(s, negative_slope=a) for a in slope]
    first, second = (program_of(m)[0] for m in mods_)
    assert first.mod_id != second.mod_id
    axis = [lambda g, s, t, a=a: g.add(s, g.gen_index(s, a)) for a in (2, 3)]
    assert program_of(axis[0])[0].mod_id != program_of(axis[1])[0].mod_id


def test_unhashable_key_is_refused():
    class Unhashable(Keyed):
        def score_mod_graph_cache_key(self):
            return [1, 2]

    with pytest.raises(TypeError, match="unhashable list"):
        program_of(Unhashable(1.0))


# --- the guard: a mod that can read nothing that changes is not recorded again -----------------------

def test_a_mod_that_reads_nothing_changing_is_recorded_once(monkeypatch):
    from cudnn_flex.program.record import Recorder
    recorded = []
    real = Recorder.record
    monkeypatch.setattr(Recorder, "record", lambda self, *a: recorded.append(a[0]) or real(self, *a))

    def counted(c):
        def mod(graph, score, tensors):
            return graph.mul(score, c)
        return mod

    q = torch.empty(B, H, S, D)
    first, _, _ = _record(counted(0.5), None, None, None, None, q, S)
    after_first = len(recorded)  # the mod's mul and its derived bprop's
    assert after_first >= 1
    # Another function object with the same code and cell values: found by the guard, not run.
    assert _record(counted(0.5), None, None, None, None, q, S)[0] is first
    assert len(recorded) == after_first, "the guarded program was recorded again"
    # Another value in the cell: recorded, another program.
    assert _record(counted(0.25), None, None, None, None, q, S)[0].mod_id != first.mod_id
    assert len(recorded) > after_first


def test_the_guard_includes_the_shapes():
    def by_length(graph, score, tensors):
        return graph.mul(score, 1.0 if score.get_dim()[2] > 8 else 2.0)

    long_, _, _ = _record(by_length, None, None, None, None, torch.empty(1, 1, 16, 8), 16)
    short, _, _ = _record(by_length, None, None, None, None, torch.empty(1, 1, 4, 8), 4)
    assert long_.mod_id != short.mod_id


def test_mods_reading_a_global_or_an_object_are_recorded_every_call():
    from cudnn_flex.program import guard
    assert guard.key(dsl_reads_global) is None
    assert guard.key(torch_reads_class_attribute) is None
    assert guard.key(mods.document_mask(torch.zeros(S, dtype=torch.long))) is None
    assert guard.key(mods.softcap(3.0)) is not None  # torch.tanh: a library module
    assert guard.key(mods.compose(mods.softcap(3.0), mods.relative_bias(0.5))) is not None


def test_a_keyed_object_with_two_bprops_gets_two_programs():
    class Scaled:
        def score_mod_graph_cache_key(self):
            return ("scaled",)

        def forward(self, graph, score, tensors):
            return graph.mul(score, 2.0)

        def exact(self, graph, d_p, tensors):
            return graph.mul(d_p, 2.0)

        def wrong(self, graph, d_p, tensors):
            return graph.mul(d_p, 3.0)

    obj = Scaled()
    from cudnn_flex import _registry as registry
    a = registry.record(obj.forward, obj.exact, (), ())
    b = registry.record(obj.forward, obj.wrong, (), ())
    assert a.mod_id == b.mod_id and a.bprop_id != b.bprop_id
