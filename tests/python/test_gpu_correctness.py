"""On cuDNN: never a stale graph, operators as in torch, finite fills, no crash, bounded memory.

Every result is compared with a float32 torch computation of the formula written out here (out,
lse and all three gradients), on bf16 inputs with lengths that are not multiples of the tile.
"""

import gc
import sys
import warnings

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods

pytestmark = pytest.mark.gpu

B, H, SQ, SKV, D = 2, 4, 129, 127, 64
TOL = 2e-2       # bf16 inputs against float32: max |err| / max |ref|
LSE_ATOL = 5e-3  # LSE is float32 in both; bf16 rounding of q and k is shared by both sides


def inputs(seed=0, s_q=SQ, s_kv=SKV, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def t(s):
        return torch.randn(B, H, s, D, device="cuda", generator=g).to(dtype).requires_grad_()
    return t(s_q), t(s_kv), t(s_kv)


def grids(s_q, s_kv):
    return (torch.arange(B, device="cuda").view(B, 1, 1, 1), torch.arange(H, device="cuda").view(1, H, 1, 1),
            torch.arange(s_q, device="cuda").view(1, 1, s_q, 1), torch.arange(s_kv, device="cuda").view(1, 1, 1, s_kv))


def oracle(q, k, v, scores_fn):
    """float32 attention with scores_fn(scores, b, h, q_idx, kv_idx) on broadcast index grids."""
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = (qf @ kf.transpose(-1, -2)) / D ** 0.5
    s = scores_fn(s, *grids(q.shape[2], k.shape[2])).float().expand(s.shape)
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1).nan_to_num(0.0) @ vf
    return out, lse, (qf, kf, vf)


def check(score_mod=None, mask_mod=None, scores_fn=None, seed=0, tensors=None, check_lse=True,
          dtype=torch.bfloat16, s_q=SQ, s_kv=SKV):
    q, k, v = inputs(seed, s_q, s_kv, dtype)
    out, lse = cudnn_flex.flex_attention(q, k, v, score_mod, score_mod_tensors=tensors, mask_mod=mask_mod,
                                         return_lse=True)
    want, want_lse, leaves = oracle(q, k, v, scores_fn)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    exp = torch.autograd.grad(want, leaves, g)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out,) + got, (want,) + exp):
        err = ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        assert err < TOL, f"{name}: relative error {err:.3g}"
    if check_lse:
        finite = torch.isfinite(want_lse)
        assert torch.equal(finite, torch.isfinite(lse))
        assert (lse[finite] - want_lse[finite]).abs().max().item() < LSE_ATOL


def scaled(c):
    return lambda s, *idx: s * c


# --- never a stale graph -----------------------------------------------------------------------------

def test_defaults_made_in_a_loop_each_get_their_graph():
    for c in (0.5, 2.0, 0.5):
        check(lambda g, s, t, *, c=c: g.mul(s, c), scores_fn=scaled(c))


SCALE = 0.5


def reads_global(score, b, h, q_idx, kv_idx):
    return score * SCALE


def test_global_that_changes(monkeypatch):
    check(reads_global, scores_fn=scaled(0.5))
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 3.0)
    check(reads_global, scores_fn=scaled(3.0))


def test_item_of_a_captured_tensor():
    t = torch.tensor(2.0)

    def mod(score, b, h, q_idx, kv_idx):
        return score / t.item()
    check(mod, scores_fn=scaled(0.5))
    t.fill_(0.25)
    check(mod, scores_fn=scaled(4.0))


def test_one_tensor_twice_then_two_tensors():
    ids = (torch.arange(SQ, device="cuda") // 40)
    kv_ids = (torch.arange(SKV, device="cuda") // 40)
    other = (torch.arange(SKV, device="cuda") // 25)

    def doc(q_ids, k_ids):
        return lambda b, h, q_idx, kv_idx: q_ids[q_idx] == k_ids[kv_idx]

    def masked(q_ids, k_ids):
        keep = q_ids.view(1, 1, -1, 1) == k_ids.view(1, 1, 1, -1)
        return lambda s, *idx: s.masked_fill(~keep, float("-inf"))
    check(mask_mod=doc(ids, kv_ids), scores_fn=masked(ids, kv_ids))
    check(mask_mod=doc(ids, other), scores_fn=masked(ids, other))


def test_clear_cache_rebuilds_forward_and_backward():
    soft = mods.softcap(3.0)
    check(soft, scores_fn=lambda s, *i: torch.tanh(s / 3.0) * 3.0)
    cudnn_flex.clear_cache()
    check(lambda s, b, h, q, kv: s * 1.7, scores_fn=scaled(1.7))
    check(soft, scores_fn=lambda s, *i: torch.tanh(s / 3.0) * 3.0)


def test_forward_finds_its_backward_after_clear_cache_and_other_programs():
    q, k, v = inputs(3)
    out = cudnn_flex.flex_attention(q, k, v, lambda s, b, h, qi, kv: torch.tanh(s * 0.5) * 2.0)
    cudnn_flex.clear_cache()
    for c in range(5):
        cudnn_flex.flex_attention(q.detach(), k.detach(), v.detach(), lambda g, s, t, *, c=c: g.mul(s, c + 1.0))
    got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want, _, leaves = oracle(q, k, v, lambda s, *i: torch.tanh(s * 0.5) * 2.0)
    exp = torch.autograd.grad(want, leaves, torch.ones_like(want))
    for a, b in zip(got, exp):
        assert ((a.float() - b).abs().max() / b.abs().max()).item() < TOL


# --- derived bprops, and the backward forms cuDNN 9.19 got wrong until the lowering fixed them ------------

DERIVED = {
    "softcap": lambda s, *i: torch.tanh(s / 3.0) * 3.0,
    "exp_log_chain": lambda s, *i: torch.log(torch.exp(s * 0.5) + 1.0),
    "abs_reciprocal": lambda s, *i: 1.0 / (s.abs() + 2.0),
    "rsqrt": lambda s, *i: torch.rsqrt(s.abs() + 1.0),
    "erf": lambda s, *i: torch.erf(s),
    "clamp_min": lambda s, *i: s.clamp(min=0.0),
    "finite_fill_and_softcap": lambda s, b, h, q, kv: torch.where(q >= kv, torch.tanh(s / 5.0) * 5.0, -1e9),
}


@pytest.mark.parametrize("name", DERIVED)
def test_derived_bprops_match_float32(name):
    fn = DERIVED[name]

    def mod(score, b, h, q_idx, kv_idx):
        return fn(score, b, h, q_idx, kv_idx)
    check(mod, scores_fn=fn, check_lse=name != "finite_fill_and_softcap")


# cuDNN 9.19 gave NaN dV for these at lengths that fill no tile (129, 127), until the backward
# graph masked the tile's padding itself (csrc/score_mod_bridge.h); `1 - s/2` and a select with
# -inf first were wrong even on whole tiles until the computed operand came first (replay.py).
BACKWARD_FORMS = {
    "sin": lambda s, b, h, q, kv: torch.sin(s),
    "square": lambda s, b, h, q, kv: s * s * 0.1,
    "power": lambda s, b, h, q, kv: s ** 2 * 0.1,
    "gelu": lambda s, b, h, q, kv: torch.nn.functional.gelu(s),
    "sqrt_abs": lambda s, b, h, q, kv: torch.sqrt(s.abs() + 1.0),
    "constant_minus_score": lambda s, b, h, q, kv: 1.0 - s * 0.5,
    "minus_inf_first": lambda s, b, h, q, kv: torch.where(kv > q, float("-inf"), s),
}


@pytest.mark.parametrize("name", BACKWARD_FORMS)
def test_backward_forms_cudnn_got_wrong_are_right(name):
    fn = BACKWARD_FORMS[name]
    check(fn, scores_fn=fn)


# fmod(s, 1.5) has a pass-through bprop, so its backward graph does not mask the tile padding;
# test_derived_bprop_rule_on_cudnn[mod_score_first] (S = 5 x 7) gave infinite gradients on the
# H100. fmod of a padded -inf score is NaN: at a whole tile there is no padding, which tells.
@pytest.mark.parametrize("s_q,s_kv", [(128, 128), (129, 127)], ids=["whole_tile", "partial_tile"])
def test_fmod_gradients_on_whole_and_partial_tiles(s_q, s_kv):
    check(lambda g, s, t: g.mod(s, 1.5), scores_fn=lambda s, b, h, q, kv: torch.fmod(s, 1.5), seed=6,
          s_q=s_q, s_kv=s_kv)


def _kv_minus_q(s, b, h, q, kv):
    return s + 0.5 * (kv - q)


# A score_mod that grows past the last row or column scores the padding of the last tile highest:
# `s + 0.5 * (q_idx - kv_idx)` at Sq = 129, Skv = 64 reached exp(127) = inf in the backward's
# padding rows and made dK and dV NaN (H100), with its pass-through bprop as with any other.
@pytest.mark.parametrize("mod,scores_fn,s_q,s_kv", [
    (mods.relative_bias(0.5), lambda s, b, h, q, kv: s + 0.5 * (q - kv), 129, 64),
    (dsl_mods.relative_bias(0.5), lambda s, b, h, q, kv: s + 0.5 * (q - kv), 129, 64),
    (mods.relative_bias(0.5), lambda s, b, h, q, kv: s + 0.5 * (q - kv), 257, 3),
    (_kv_minus_q, _kv_minus_q, 64, 200),
], ids=["torch_style_129x64", "dsl_129x64", "torch_style_257x3", "kv_side_64x200"])
def test_scores_growing_past_the_last_row_or_column(mod, scores_fn, s_q, s_kv):
    check(mod, scores_fn=scores_fn, s_q=s_q, s_kv=s_kv)


# The same in float16, with `s * 3` (a bprop of one mul): on the H100 `s * 3.0` in float16 at
# S=136 gave dq and dk 14% and 20% off (test_gpu_compile's refused-capture test); the bf16 forms
# above were right. This says whether float16 is the cause.
@pytest.mark.parametrize("name", list(BACKWARD_FORMS) + ["times_three"])
def test_backward_forms_in_float16(name):
    fn = BACKWARD_FORMS.get(name, lambda s, b, h, q, kv: s * 3.0)
    check(fn, scores_fn=fn, dtype=torch.float16)


@pytest.mark.parametrize("score_mod", [None, mods.softcap(20.0)], ids=["plain", "softcap"])
def test_gradient_through_lse(score_mod):
    """A loss that reads lse (ring attention, merging partial attention) gets lse's gradient too
    (csrc/autograd.cpp folds it into the backward)."""
    q, k, v = inputs(seed=4)
    out, lse = cudnn_flex.flex_attention(q, k, v, score_mod, return_lse=True)
    fn = (lambda s, b, h, q_, kv: s) if score_mod is None else (lambda s, b, h, q_, kv: 20.0 * torch.tanh(s / 20.0))
    want, want_lse, leaves = oracle(q, k, v, fn)
    g = torch.Generator(device="cuda").manual_seed(9)
    g_out = torch.randn(want.shape, device="cuda", generator=g)
    g_lse = torch.randn(want_lse.shape, device="cuda", generator=g)
    got = torch.autograd.grad((out.float() * g_out).sum() + (lse * g_lse).sum(), (q, k, v))
    exp = torch.autograd.grad((want * g_out).sum() + (want_lse * g_lse).sum(), leaves)
    for name, a, b in zip(("dq", "dk", "dv"), got, exp):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < TOL, f"{name}: relative error {err:.3g}"


# --- operators as in torch ------------------------------------------------------------------------------

OPERATOR_MASKS = {
    "bitwise_and": lambda b, h, q, kv: (kv & 3) == (q & 3),
    "bitwise_and_bits": lambda b, h, q, kv: ((kv - q) & 5) != 1,
    "remainder_negative": lambda b, h, q, kv: (kv - q) % 4 != 1,
    "floor_divide": lambda b, h, q, kv: (q // 16) == (kv // 16),
    "shift": lambda b, h, q, kv: (q >> 3) >= (kv >> 3),
    "xor_bool": lambda b, h, q, kv: (q >= kv) ^ (kv % 2 == 0),
}


@pytest.mark.parametrize("name", OPERATOR_MASKS)
def test_operators_follow_torch_on_cudnn(name):
    mask = OPERATOR_MASKS[name]
    check(mask_mod=mask, scores_fn=lambda s, b, h, q, kv: s.masked_fill(~mask(b, h, q, kv), float("-inf")))


# --- finite fills, bool tensors, bad input -----------------------------------------------------------------

def test_finite_fill_with_fully_masked_rows():
    fill = torch.finfo(torch.float32).min

    def hf_style(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx >= kv_idx + 5, score, fill)
    # Rows q < 5 are fully masked: torch gives uniform attention and 0 gradient at masked places.
    # Their LSE differs (cuDNN computes with a smaller fill), so it is checked on the other rows.
    check(hf_style, scores_fn=lambda s, b, h, q, kv: torch.where(q >= kv + 5, s, fill), check_lse=False)


def test_captured_bool_mask_and_bool_scalar():
    g = torch.Generator(device="cuda").manual_seed(1)
    dense = torch.rand(B, H, SQ, SKV, device="cuda", generator=g) > 0.3
    dense[..., 0] = True
    check(mask_mod=lambda b, h, q, kv: dense[b, h, q, kv],
          scores_fn=lambda s, *i: s.masked_fill(~dense, float("-inf")))
    flag = torch.tensor(True)

    def with_flag(graph, score, tensors):
        return graph.binary_select(graph.mul(score, 0.5), score, tensors["flag"])
    check(with_flag, scores_fn=scaled(0.5), tensors={"flag": flag})


def test_public_op_refuses_a_host_tensor_instead_of_crashing():
    q, k, v = (t.detach() for t in inputs())
    with pytest.raises(ValueError, match="is on cpu but q is on cuda"):
        torch.ops.cudnn_flex.fwd(q, k, v, [torch.zeros(1, 1, SQ, SKV)], [], 0, 0, True, None, False, [], [], [])
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.cudnn_flex.fwd(q, k.half(), v, [], [], 0, 0, True, None, False, [], [], [])
    with pytest.raises(RuntimeError, match="no recorded score_mod program"):
        torch.ops.cudnn_flex.fwd(q, k, v, [], [], 12345, 0, True, None, False, [], [], [])
    out = cudnn_flex.flex_attention(q, k, v)  # the CUDA context is fine
    assert torch.isfinite(out).all()


# --- bounded memory -------------------------------------------------------------------------------------

def test_distinct_mods_do_not_keep_captured_tensors_alive():
    q, k, v = (t.detach() for t in inputs())
    cudnn_flex.set_cache_capacity(16)
    try:
        torch.cuda.synchronize()
        gc.collect()
        before = torch.cuda.memory_allocated()
        for w in range(1, 60):
            doc_ids = torch.randint(0, 3, (1 << 20,), device="cuda")[:SKV]  # a view of 8 MiB
            mask = mods.and_masks(mods.sliding_window(w), mods.document_mask(doc_ids))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cudnn_flex.flex_attention(q[:, :, :SKV], k, v, mask_mod=mask)
            del doc_ids, mask
        gc.collect()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - before < 8 << 20
        cudnn_flex.clear_cache()
    finally:
        cudnn_flex.set_cache_capacity(1024)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.cap = 5.0

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return torch.tanh(score / self.cap) * self.cap

    def forward(self, q, k, v):
        return cudnn_flex.flex_attention(q, k, v, self.score_mod)


def test_module_method_builds_once():
    block = Block()
    q, k, v = inputs()
    block(q, k, v).sum().backward()
    builds = cudnn_flex.cache_stats()["builds"]
    for _ in range(3):
        block(q, k, v).sum().backward()
    assert cudnn_flex.cache_stats()["builds"] == builds
