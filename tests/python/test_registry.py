"""Graph-cache rules of the score_mod registry (ported from the semantics of the reference PR)."""

import gc
import warnings

import pytest
import torch

import cudnn_flex
from cudnn_flex import _registry


def module_level_mod(graph, score, tensors):
    return score


class KeyedSoftcap:
    def __init__(self, cap):
        self.cap = cap

    def score_mod_graph_cache_key(self):
        return ("softcap", self.cap)

    def forward(self, graph, score, tensors):
        return score

    def backward(self, graph, dp, tensors):
        return dp


class Unkeyed:
    def forward(self, graph, score, tensors):
        return score


class KeyedCallable:
    def __init__(self, k):
        self.k = k

    def score_mod_graph_cache_key(self):
        return (self.k,)

    def __call__(self, graph, score, tensors):
        return score


def test_none_has_id_zero():
    assert _registry.resolve(None, "score_mod") == (0, True)


def test_module_function_keyed_by_module_and_qualname():
    assert _registry.structural_key(module_level_mod) == ("function", __name__, "module_level_mod")
    a = _registry.resolve(module_level_mod, "score_mod")
    b = _registry.resolve(module_level_mod, "score_mod")
    assert a == b and a[1] is True


def test_lambdas_keyed_by_code_object():
    fns = [lambda g, s, t: s for _ in range(3)]  # one code object, three function objects
    ids = {_registry.resolve(f, "score_mod") for f in fns}
    assert len(ids) == 1 and next(iter(ids))[1] is True
    other = lambda g, s, t: s * 2  # noqa: E731
    assert _registry.resolve(other, "score_mod")[0] not in {i for i, _ in ids}


def test_closures_never_cached_and_warn_once():
    def make(cap):
        def mod(graph, score, tensors):
            return score * cap
        return mod

    _registry._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = _registry.resolve(make(1.0), "score_mod")
        b = _registry.resolve(make(2.0), "score_mod")
    assert a[1] is False and b[1] is False
    assert a[0] != b[0], "an uncached callable gets a fresh id every call"
    messages = [str(w.message) for w in caught if "cannot be cached" in str(w.message)]
    assert len(messages) == 1 and "score_mod_graph_cache_key" in messages[0]


def test_ids_of_dead_closures_are_not_reused():
    seen = set()
    for i in range(50):
        def mod(graph, score, tensors, i=i):
            return score
        cap = [i]
        closure = (lambda c: (lambda g, s, t: s * c[0]))(cap)
        fid, cacheable = _registry.resolve(closure, "score_mod")
        assert not cacheable and fid not in seen
        seen.add(fid)
        del closure
        gc.collect()


def test_keyed_bound_methods_share_an_id_per_key():
    a, b, c = KeyedSoftcap(30.0), KeyedSoftcap(30.0), KeyedSoftcap(50.0)
    ia = _registry.resolve(a.forward, "score_mod")
    ib = _registry.resolve(b.forward, "score_mod")
    ic = _registry.resolve(c.forward, "score_mod")
    assert ia == ib and ia[1] is True
    assert ic[0] != ia[0]
    assert _registry.resolve(a.backward, "score_mod_bprop")[0] != ia[0], "method name is in the key"


def test_latest_object_with_a_key_is_the_one_called():
    a, b = KeyedSoftcap(30.0), KeyedSoftcap(30.0)
    fid, _ = _registry.resolve(a.forward, "score_mod")
    _registry.resolve(b.forward, "score_mod")
    assert _registry._callable_by_id[fid][0].__self__ is b


def test_unkeyed_bound_method_is_not_cached():
    fid, cacheable = _registry.resolve(Unkeyed().forward, "score_mod")
    assert cacheable is False


def test_keyed_callable_object():
    assert _registry.resolve(KeyedCallable(1), "score_mod") == _registry.resolve(KeyedCallable(1), "score_mod")
    assert _registry.resolve(KeyedCallable(1), "score_mod") != _registry.resolve(KeyedCallable(2), "score_mod")


def test_tensor_inside_key_is_an_error():
    class Bad(KeyedSoftcap):
        def score_mod_graph_cache_key(self):
            return ("x", (1, torch.ones(2)))

    with pytest.raises(TypeError, match="contains a torch.Tensor"):
        _registry.resolve(Bad(1.0).forward, "score_mod")


def test_unhashable_key_is_an_error():
    class Bad(KeyedSoftcap):
        def score_mod_graph_cache_key(self):
            return ["not", "hashable"]

    with pytest.raises(TypeError, match="unhashable list"):
        _registry.resolve(Bad(1.0).forward, "score_mod")


def test_not_callable_is_an_error():
    with pytest.raises(TypeError, match="score_mod must be a callable"):
        _registry.resolve(3, "score_mod")


def test_dispatch_rejects_non_tensor_result():
    def returns_number(graph, score, tensors):
        return 1.0

    fid, _ = _registry.resolve(returns_number, "score_mod")
    with pytest.raises(TypeError, match="returned float"):
        _registry.dispatch(fid, None, None, [])


def test_tensor_names_are_part_of_the_id():
    a = _registry.resolve(module_level_mod, "score_mod", ["bias"])
    b = _registry.resolve(module_level_mod, "score_mod", ["slopes"])
    assert a[0] != b[0] and a == _registry.resolve(module_level_mod, "score_mod", ["bias"])


def test_dispatch_names_the_tensors_by_position():
    seen = {}

    def records(graph, score, tensors):
        seen.update(tensors)
        return 1.0

    fid, _ = _registry.resolve(records, "score_mod", ["x", "y"])
    with pytest.raises(TypeError):
        _registry.dispatch(fid, None, None, ["first", "second"])
    assert seen == {"x": "first", "y": "second"}


def test_public_cache_controls():
    stats = cudnn_flex.cache_stats()
    assert set(stats) == {"hits", "misses", "builds", "evictions", "size", "capacity"}
    cudnn_flex.set_cache_capacity(10)
    assert cudnn_flex.cache_stats()["capacity"] == 10
    with pytest.raises(ValueError):
        cudnn_flex.set_cache_capacity(-1)
    cudnn_flex.set_cache_capacity(1024)
