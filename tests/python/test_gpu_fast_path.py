"""The shortcut of a repeated call (fast_path.py) on cuDNN: a call that takes it computes what the
full path computes (out, lse and all three gradients against oracle.attention in float64), a
changed mod is never served its old graph, and its errors are the full path's."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, fast_path, mods
from gpu_cases import check, compare, dsl_formula, make_inputs
from oracle import NEG_INF
from record_counter import records  # noqa: F401  (a fixture)

pytestmark = pytest.mark.gpu

_CAP = dsl_mods.softcap(2.5)  # its backward reads what its forward recorded: one object for both


def _where(keep, s):
    return torch.where(keep, s, NEG_INF)


KINDS = {
    "no mod": ({}, None),
    "DSL causal": ({"score_mod": dsl_mods.causal}, dsl_formula(dsl_mods.causal)),
    "torch-style softcap": ({"score_mod": mods.softcap(2.5)}, lambda s, b, h, q, kv: 2.5 * torch.tanh(s / 2.5)),
    "mask_mod and score_mod": ({"mask_mod": mods.sliding_window(3), "score_mod": mods.relative_bias(0.5)},
                               lambda s, b, h, q, kv: _where((q - kv >= 0) & (q - kv < 3), s + 0.5 * (q - kv))),
    "keyed softcap with its bprop": ({"score_mod": _CAP.forward, "score_mod_bprop": _CAP.backward},
                                     lambda s, b, h, q, kv: 2.5 * torch.tanh(s / 2.5)),
    "keyed relative bias": ({"score_mod": dsl_mods.relative_bias(0.5)}, lambda s, b, h, q, kv: s + 0.5 * (q - kv)),
}


def with_mods(kwargs, after=None):
    """flex_attention with these mods, as compare() calls it; after(): run after the forward."""
    def attention(q, k, v, **options):
        result = cudnn_flex.flex_attention(q, k, v, **kwargs, **options)
        if after is not None:
            after()
        return result
    return attention


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("s_q,s_kv", [(1, 129), (127, 127), (129, 64)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_call_by_the_shortcut_matches_the_formula(records, kind, s_q, s_kv, layout):
    kwargs, formula = KINDS[kind]
    q, k, v = make_inputs(b=2, h=4, h_kv=2, s_q=s_q, s_kv=s_kv, layout=layout, seed=s_q)
    cudnn_flex.flex_attention(q, k, v, layout=layout, return_lse=True, **kwargs)  # the full path, remembered
    got, want = compare(q, k, v, formula, layout=layout, attention=with_mods(kwargs))
    assert records[0] == 1, "the second call did not take the shortcut"
    check(got, want, label=f"{kind} {s_q}x{s_kv} {layout}")


def test_a_changed_closure_value_is_not_served_stale(records):
    cap = 2.5

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    q, k, v = make_inputs(b=1, h=2, s_q=129, s_kv=129)
    cudnn_flex.flex_attention(q, k, v, softcap)
    cap = 0.5
    got, want = compare(q, k, v, lambda s, b, h, qi, kv: 0.5 * torch.tanh(s / 0.5), attention=with_mods({"score_mod": softcap}))
    assert records[0] == 2
    check(got, want, label="cap changed to 0.5")


def test_a_changed_key_is_not_served_stale(records):
    bias = dsl_mods.relative_bias(0.5)
    q, k, v = make_inputs(b=1, h=2, s_q=127, s_kv=127)
    cudnn_flex.flex_attention(q, k, v, bias)
    bias.scale = -1.5
    got, want = compare(q, k, v, lambda s, b, h, qi, kv: s - 1.5 * (qi - kv), attention=with_mods({"score_mod": bias}))
    assert records[0] == 2
    check(got, want, label="scale changed to -1.5")


def test_the_backward_after_clear_cache(records):
    """A forward by the shortcut keeps its program for its backward, whatever the caches do."""
    kwargs, formula = KINDS["torch-style softcap"]
    q, k, v = make_inputs(b=1, h=2, s_q=129, s_kv=127)
    cudnn_flex.flex_attention(q, k, v, **kwargs)
    got, want = compare(q, k, v, formula, attention=with_mods(kwargs, after=cudnn_flex.clear_cache))
    assert records[0] == 1
    check(got, want, label="backward after clear_cache")


def test_a_misaligned_input_gets_the_full_paths_error(records):
    q, k, v = make_inputs(b=1, h=2, s_q=64, s_kv=64)
    cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)
    flat = torch.randn(q.numel() + 1, device="cuda", dtype=q.dtype)
    shifted = flat[1:].view(q.shape)  # 2 bytes off: cuDNN needs 16
    with pytest.raises(ValueError, match=r"q's data is not 16-byte aligned .* pass q.clone\(\)"):
        cudnn_flex.flex_attention(shifted, k, v, dsl_mods.causal)


def test_remembered_calls_hold_no_tensors(records):
    q, k, v = make_inputs(b=1, h=2, s_q=64, s_kv=64)
    slopes = mods.alibi_slopes(2, device="cuda")
    for _ in range(2):
        cudnn_flex.flex_attention(q, k, v, mods.alibi(slopes))
    assert records[0] == 2 and not fast_path._entries
