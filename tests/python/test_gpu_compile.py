"""torch.compile, CUDA graphs and opcheck on the GPU: flex_attention inside a small model."""

import copy
import sys

import pytest
import torch

import cudnn_flex
from cudnn_flex import _registry, dsl_mods, mods
from cudnn_flex.record_call import _DYNAMO_READS_CLOSURES
from gpu_cases import check, compare, make_inputs, on_device
from mod_cases import READY_MODS

pytestmark = pytest.mark.gpu

SOFTCAP = dsl_mods.softcap(20.0)


class Block(torch.nn.Module):
    """Attention + ReLU MLP with residuals: bf16 ops whose compiled and eager forms round the same
    way (matmuls go to cuBLAS either way; add and ReLU round once), so only the attention op
    could make compiled and eager differ."""

    def __init__(self, dim, heads, score_mod, score_mod_bprop=None):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.up = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.down = torch.nn.Linear(2 * dim, dim, bias=False)
        self.attention = cudnn_flex.FlexAttention(score_mod, score_mod_bprop, layout="bshd")

    def forward(self, x, slopes):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        tensors = {"slopes": slopes} if slopes is not None else None
        x = x + self.proj(self.attention(q, k, v, tensors).reshape(b, s, d))
        return x + self.down(torch.relu(self.up(x)))


def make_model(score_mod=dsl_mods.causal, bprop=None, dim=256, heads=4, layers=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Block(dim, heads, score_mod, bprop) for _ in range(layers)])
    return model.cuda().to(torch.bfloat16)


class TwoLayer(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.layers = model

    def forward(self, x, slopes=None):
        for layer in self.layers:
            x = layer(x, slopes)
        return x


def run_step(model, x, slopes=None):
    out = model(x, slopes)
    loss = out.float().square().mean()
    loss.backward()
    return out.detach(), [p.grad.detach().clone() for p in model.parameters()]


def assert_within_one_bf16_ulp(got, want):
    # One bf16 ulp at |want| is 2^(exponent - 7).
    ulp = torch.pow(2.0, torch.floor(torch.log2(want.float().abs().clamp_min(1e-30))) - 7)
    excess = ((got.float() - want.float()).abs() - ulp).max().item()
    assert excess <= 0, f"differs by more than one bf16 ulp (excess {excess})"


CASES = {
    "causal": (dsl_mods.causal, None, False),
    "softcap": (SOFTCAP.forward, SOFTCAP.backward, False),
    "alibi": (dsl_mods.alibi, None, True),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_two_layer_block_matches_eager(case):
    score_mod, bprop, with_slopes = CASES[case]
    eager = TwoLayer(make_model(score_mod, bprop))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    slopes = mods.alibi_slopes(4, device="cuda") if with_slopes else None
    out_e, grads_e = run_step(eager, x, slopes)
    out_c, grads_c = run_step(compiled, x, slopes)
    assert_within_one_bf16_ulp(out_c, out_e)
    for g_c, g_e in zip(grads_c, grads_e):
        assert_within_one_bf16_ulp(g_c, g_e)


def test_dynamic_sequence_lengths_compile_once():
    torch._dynamo.reset()
    frames = []

    def counting_inductor(gm, example_inputs):
        frames.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    model = TwoLayer(make_model())
    compiled = torch.compile(model, backend=counting_inductor, dynamic=True, fullgraph=True)
    for s in (128, 192, 320):
        x = torch.randn(2, s, 256, device="cuda", dtype=torch.bfloat16)
        out_c, grads_c = run_step(compiled, x)
        model.zero_grad(set_to_none=True)
        out_e, grads_e = run_step(model, x)
        model.zero_grad(set_to_none=True)
        assert_within_one_bf16_ulp(out_c, out_e)
    assert len(frames) == 1


def test_training_step_in_a_cuda_graph_replays_like_eager():
    eager = TwoLayer(make_model(SOFTCAP.forward, SOFTCAP.backward))
    captured = copy.deepcopy(eager)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(captured.parameters(), lr=0.1)
    static_x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)

    def step(model, opt, x):
        opt.zero_grad(set_to_none=False)
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        return loss

    # Warm-up on a side stream builds and caches the cuDNN graphs (no parameter update: lr 0).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for group in opt_c.param_groups:
            group["lr"] = 0.0
        step(captured, opt_c, static_x)
        for group in opt_c.param_groups:
            group["lr"] = 0.1
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(captured, opt_c, static_x)

    builds = cudnn_flex._C.cache_stats()["builds"]
    for i in range(10):
        x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        loss_e = step(eager, opt_e, x)
        assert torch.equal(static_loss, loss_e), f"step {i}"
    for p_c, p_e in zip(captured.parameters(), eager.parameters()):
        assert torch.equal(p_c, p_e)
    assert cudnn_flex._C.cache_stats()["builds"] == builds


def test_reduce_overhead_mode_matches_eager():
    model = TwoLayer(make_model())
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, then replays
        x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
        out_c, grads_c = run_step(compiled, x)
        model.zero_grad(set_to_none=True)
        out_e, grads_e = run_step(model, x)
        model.zero_grad(set_to_none=True)
        assert_within_one_bf16_ulp(out_c, out_e)
        for g_c, g_e in zip(grads_c, grads_e):
            assert_within_one_bf16_ulp(g_c, g_e)


def scaled_by_three(graph, score, tensors):
    return score * 3.0


def test_a_captured_plan_outlives_eviction_and_clear_cache():
    """cuDNN 9.19 frees a plan's runtime-compiled kernels with the plan: a plan a CUDA graph
    captured is kept (csrc/ops.cpp pin_if_captured), so replays after the cache evicted it and
    other graphs were built and freed give the same bits."""
    q, k, v = (torch.randn(1, 2, 136, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    mod = mods.softcap(7.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cudnn_flex.flex_attention(q, k, v, mod)  # builds and caches the plan
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cudnn_flex.flex_attention(q, k, v, mod)
    graph.replay()
    torch.cuda.synchronize()
    want = out.clone()
    capacity = cudnn_flex.cache_stats()["capacity"]
    try:
        cudnn_flex.clear_cache()
        cudnn_flex.set_cache_capacity(1)
        for cap in (3.0, 4.0, 5.0, 6.0):  # other plans built, evicted and freed
            cudnn_flex.flex_attention(q, k, v, mods.softcap(cap))
        torch.cuda.synchronize()
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want)
    finally:
        cudnn_flex.set_cache_capacity(capacity)


def test_building_during_capture_is_a_clear_error():
    q = torch.randn(1, 2, 136, 64, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="while a CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            cudnn_flex.flex_attention(q, q, q, scaled_by_three)  # never built for this shape
    # The process and the cache are fine: the same call works outside capture, and is right. Fresh
    # q, k, v: with q = k the diagonal scores (|q|^2 * 3 / 8 ~ 24) saturate the softmax, and float16
    # gradients of a saturated softmax are no test of correctness.
    q, k, v = make_inputs(b=1, h=2, s_q=136, dtype=torch.float16, seed=5)
    got, want = compare(q, k, v, lambda s, b, h, q_idx, kv_idx: s * 3.0, score_mod=scaled_by_three)
    check(got, want, torch.float16, label="after a refused capture")


@pytest.mark.parametrize("case", ["dsl_causal", "dsl_softcap", "dsl_alibi"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_flex_attention_matches_the_formula(case, dynamic):
    """Compiled, the op's result is right (not only the same as eager): out, lse, dq, dk, dv."""
    torch._dynamo.reset()
    b, h, s = 2, 4, 160
    kwargs, formula = READY_MODS[case](b, h, s, s)
    score_mod, bprop = kwargs.pop("score_mod"), kwargs.pop("score_mod_bprop", None)

    @torch.compile(fullgraph=True, dynamic=dynamic)
    def attention(q, k, v, score_mod_tensors=None, **options):
        return cudnn_flex.flex_attention(q, k, v, score_mod, bprop, score_mod_tensors, **options)

    q, k, v = make_inputs(b=b, h=h, s_q=s, seed=3)
    got, want = compare(q, k, v, formula, attention=attention, **kwargs)
    check(got, want, label=f"compiled {case}")


# Each of these mods is made by a function (a closure), which the dynamo of torch < 2.14 cannot read:
# there the call is refused by name (test_compile.py).
@pytest.mark.skipif(not _DYNAMO_READS_CLOSURES, reason=f"torch {torch.__version__} < 2.14 refuses closures under compile")
@pytest.mark.parametrize("case", ["softcap", "alibi", "document_mask", "and_masks", "softcap_causal"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_torch_style_mods_match_the_formula(case, dynamic):
    """torch-style mods and mask_mods under torch.compile: out, lse, dq, dk, dv against the
    formula (their captured tensors are inputs of the compiled graph)."""
    torch._dynamo.reset()
    b, h, s = 2, 4, 40  # mod_cases' document ids cover 40 positions
    kwargs, formula = READY_MODS[case](b, h, s, s)
    kwargs = on_device(kwargs)
    score_mod, mask_mod = kwargs.pop("score_mod", None), kwargs.pop("mask_mod", None)

    @torch.compile(fullgraph=True, dynamic=dynamic)
    def attention(q, k, v, **options):
        return cudnn_flex.flex_attention(q, k, v, score_mod, mask_mod=mask_mod, **options)

    q, k, v = make_inputs(b=b, h=h, s_q=s, seed=5)
    got, want = compare(q, k, v, formula, attention=attention, **kwargs)
    check(got, want, label=f"compiled torch-style {case}")


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_on_cuda(requires_grad):
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(requires_grad)

    q, k, v = t(2, 4, 128, 64), t(2, 2, 96, 64), t(2, 2, 96, 64)
    slopes = mods.alibi_slopes(4, device="cuda")
    program = _registry.record(dsl_mods.alibi, None, ("slopes",), (slopes.dtype,))
    mod_id, bprop_id, cacheable = program.mod_id, program.bprop_id, True
    args = (q, k, v, [slopes], [], mod_id, bprop_id, cacheable, None, True, [], [], [])
    # With gradients, opcheck's AOT tests backpropagate through every output, lse included.
    torch.library.opcheck(torch.ops.cudnn_flex.fwd.default, args)
    out, lse = torch.ops.cudnn_flex.fwd(*args)
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), [slopes], [],
                mod_id, bprop_id, cacheable, None, True, [], [], [])
    torch.library.opcheck(torch.ops.cudnn_flex.bwd.default, bwd_args)


# A model's attention as flex users write it: a torch-style softcap, ALiBi over the slopes it
# captures, a document mask and a sliding window, in one call. Module-level mods reading globals
# (what the dynamo of torch 2.11-2.13 can read), and the same made by cudnn_flex.mods' factories
# inside the compiled forward (closures: torch >= 2.14).
CAP, WINDOW = 30.0, 48
SLOPES = None  # [H] float32, set by the test
DOC_IDS = None  # [S] int64, set by the test before each step


def softcap_alibi(score, b, h, q_idx, kv_idx):
    score = torch.tanh(score / CAP) * CAP
    return score + SLOPES[h] * (kv_idx - q_idx)


def document_window(b, h, q_idx, kv_idx):
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def attend_through_globals(q, k, v, doc):
    return cudnn_flex.flex_attention(q, k, v, softcap_alibi, mask_mod=document_window, layout="bshd")


def attend_through_closures(q, k, v, doc):
    score_mod = mods.compose(mods.softcap(CAP), mods.alibi(SLOPES))
    mask_mod = mods.and_masks(mods.document_mask(doc), mods.sliding_window(WINDOW))
    return cudnn_flex.flex_attention(q, k, v, score_mod, mask_mod=mask_mod, layout="bshd")


class ModBlock(torch.nn.Module):
    """Attention (through `attend`) + ReLU MLP with residuals, q, k, v as views of one projection."""

    def __init__(self, dim, heads, attend):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.up = torch.nn.Linear(dim, 2 * dim, bias=False)
        self.down = torch.nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x, doc):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        x = x + self.proj(self.attend(q, k, v, doc).reshape(b, s, d))
        return x + self.down(torch.relu(self.up(x)))


class ModModel(torch.nn.Module):
    def __init__(self, attend, dim=256, heads=4, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(ModBlock(dim, heads, attend) for _ in range(layers))

    def forward(self, x, doc):
        for layer in self.layers:
            x = layer(x, doc)
        return x


def mod_step(model, x, doc):
    out = model(x, doc)
    out.float().square().mean().backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("attend", [
    attend_through_globals,
    pytest.param(attend_through_closures, marks=pytest.mark.skipif(
        not _DYNAMO_READS_CLOSURES, reason=f"torch {torch.__version__} < 2.14 refuses closures under compile")),
], ids=["globals", "closures"])
def test_compiled_block_with_torch_style_mods_matches_eager(attend, monkeypatch):
    """fullgraph=True, compiled once for two steps whose document boundaries and slopes differ
    (captured tensors are inputs of the compiled graph); out and every parameter's gradient
    within one bf16 ulp of eager. S = 200: no multiple of the kernel's tile."""
    torch._dynamo.reset()
    frames = []

    def counting_inductor(gm, example_inputs):
        frames.append(gm)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)

    eager = ModModel(attend).cuda().to(torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(eager), backend=counting_inductor, fullgraph=True)
    s = 200
    monkeypatch.setattr(sys.modules[__name__], "SLOPES", mods.alibi_slopes(4, device="cuda").reshape(-1))
    for step, first_doc in enumerate((70, 151)):
        doc = (torch.arange(s, device="cuda") >= first_doc).to(torch.int64)
        monkeypatch.setattr(sys.modules[__name__], "DOC_IDS", doc)
        SLOPES.mul_(0.5)  # new values in the captured tensor
        x = torch.randn(2, s, 256, device="cuda", dtype=torch.bfloat16)
        out_e, grads_e = mod_step(eager, x, doc)
        out_c, grads_c = mod_step(compiled, x, doc)
        assert_within_one_bf16_ulp(out_c, out_e)
        for g_c, g_e in zip(grads_c, grads_e):
            assert_within_one_bf16_ulp(g_c, g_e)
    assert len(frames) == 1
