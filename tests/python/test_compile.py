"""torch.compile and opcheck without a GPU.

Dynamo traces flex_attention on fake CUDA tensors (FakeTensorMode needs no GPU), so the cuDNN
path is what gets traced; the fake kernels stand in for the CUDA ones. opcheck runs the ops on meta
tensors: schema, fake kernels, autograd registration and AOT dispatch (static and dynamic).
"""

import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import cudnn_flex
from cudnn_flex import _registry, dsl_mods, mods
from cudnn_flex.record_call import _DYNAMO_READS_CLOSURES

FWD = torch.ops.cudnn_flex.fwd.default


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fake_qkv(mode, s=128, b=2, h=4, d=64):
    with mode:
        return tuple(torch.empty(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def compile_recording(fn, **kwargs):
    """fn compiled with fullgraph=True; returns (compiled, the FX graphs dynamo produced)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    return torch.compile(fn, backend=backend, fullgraph=True, **kwargs), graphs


def op_calls(gm):
    return [n for n in gm.graph.nodes if n.target in (FWD, torch.ops.cudnn_flex.fwd)]


SOFTCAP = dsl_mods.softcap(30.0)


def module_level_function(q, k, v, slopes):
    return cudnn_flex.flex_attention(q, k, v, dsl_mods.causal)


def keyed_stateful_softcap(q, k, v, slopes):
    return cudnn_flex.flex_attention(q, k, v, SOFTCAP.forward, SOFTCAP.backward)


def with_score_mod_tensors(q, k, v, slopes):
    return cudnn_flex.flex_attention(q, k, v, dsl_mods.alibi, score_mod_tensors={"slopes": slopes})


def lambda_score_mod(q, k, v, slopes):
    return cudnn_flex.flex_attention(q, k, v, lambda graph, score, tensors: score * 0.5, layout="bshd")


CASES = [module_level_function, keyed_stateful_softcap, with_score_mod_tensors, lambda_score_mod]


@pytest.mark.parametrize("fn", CASES, ids=lambda f: f.__name__)
def test_dynamo_traces_one_op_with_no_graph_break(fn):
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    with mode:
        slopes = torch.empty(1, 4, 1, 1, device="cuda")
    # fullgraph=True: any graph break raises.
    compiled, graphs = compile_recording(fn)
    with mode:
        out = compiled(q, k, v, slopes)
    assert out.shape == q.shape and out.device.type == "cuda"
    assert len(graphs) == 1
    calls = op_calls(graphs[0])
    assert len(calls) == 1
    mod_id = calls[0].args[5]
    # The id is a constant of the graph and names the program recorded while dynamo traced.
    assert isinstance(mod_id, int) and mod_id > 0
    assert _registry.lookup(mod_id).mod_id == mod_id


@pytest.mark.parametrize("fn", CASES, ids=lambda f: f.__name__)
def test_dynamic_shapes_compile_once_for_three_sequence_lengths(fn):
    mode = FakeTensorMode()
    compiled, graphs = compile_recording(fn, dynamic=True)
    with mode:
        slopes = torch.empty(1, 4, 1, 1, device="cuda")
    for s in (128, 256, 384):
        q, k, v = fake_qkv(mode, s=s)
        with mode:
            out = compiled(q, k, v, slopes)
        assert out.shape == q.shape
    assert len(graphs) == 1


def test_compiled_id_matches_eager_id():
    """A compiled call and an eager call of the same score_mod share one registry id, so they
    share the cached cuDNN graphs."""
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled, graphs = compile_recording(module_level_function)
    with mode:
        compiled(q, k, v, None)
    eager_id = _registry.record(dsl_mods.causal, None, (), ()).mod_id
    assert op_calls(graphs[0])[0].args[5] == eager_id


def test_another_keyed_object_gets_its_own_id():
    """Dynamo guards the object's identity: a new object with another key recompiles."""
    caps = [dsl_mods.softcap(30.0)]

    def fn(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, caps[0].forward, caps[0].backward)

    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled, graphs = compile_recording(fn)
    with mode:
        compiled(q, k, v)
        compiled(q, k, v)
    assert len(graphs) == 1
    caps[0] = dsl_mods.softcap(20.0)
    with mode:
        compiled(q, k, v)
    assert len(graphs) == 2
    first, second = (op_calls(g)[0].args[5] for g in graphs)
    assert first != second
    assert second == _registry.record(caps[0].forward, caps[0].backward, (), ()).mod_id


def test_closure_under_compile_records_its_program():
    """A closure is no longer refused: its program is recorded while dynamo traces."""
    factor = 0.5

    def closure(graph, score, tensors):
        return score * factor

    def fn(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, closure)

    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled, graphs = compile_recording(fn)
    with mode:
        compiled(q, k, v)
    assert op_calls(graphs[0])[0].args[5] == _registry.record(closure, None, (), ()).mod_id


def test_aot_autograd_traces_the_op_for_inference():
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled = torch.compile(module_level_function, backend="aot_eager", fullgraph=True)
    with mode:
        out = compiled(q, k, v, None)
    assert out.shape == q.shape


def meta_args(requires_grad, s_q=128, s_kv=96, h_q=4, h_kv=2, mod=dsl_mods.causal):
    def t(*shape, **kw):
        return torch.randn(*shape, device="meta", **kw).requires_grad_(requires_grad)

    q, k, v = t(2, h_q, s_q, 64, dtype=torch.bfloat16), t(2, h_kv, s_kv, 64, dtype=torch.bfloat16), \
        t(2, h_kv, s_kv, 32, dtype=torch.bfloat16)
    program = _registry.record(mod, None, (), ())
    return q, k, v, program.mod_id, program.bprop_id, True


UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
         "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_opcheck_fwd(requires_grad, scale):
    q, k, v, mod_id, bprop_id, cacheable = meta_args(requires_grad)
    with torch.device("meta"):
        bias = torch.randn(1, 4, 1, 96)
    args = (q, k, v, [bias], [], mod_id, bprop_id, cacheable, scale, False, [], [], [])
    torch.library.opcheck(FWD, args, test_utils=UTILS)


def test_opcheck_fwd_of_a_padded_batch():
    q, k, v, mod_id, bprop_id, cacheable = meta_args(True)
    with torch.device("meta"):
        lengths = [torch.zeros(q.shape[0], dtype=torch.int32) for _ in range(2)]
    args = (q, k, v, [], [], mod_id, bprop_id, cacheable, None, False, lengths, [], [])
    torch.library.opcheck(FWD, args, test_utils=UTILS)


def test_opcheck_bwd():
    q, k, v, mod_id, bprop_id, cacheable = meta_args(False)
    out, lse = FWD(q, k, v, [], [], mod_id, bprop_id, cacheable, None, False, [], [], [])
    grad_out = torch.randn_like(out)
    args = (grad_out, q, k, v, out, lse, [], [], mod_id, bprop_id, cacheable, None, True, [], [], [])
    torch.library.opcheck(torch.ops.cudnn_flex.bwd.default, args, test_utils=UTILS)


SCALE = 0.5


def reads_a_global(graph, score, tensors):
    return graph.mul(score, SCALE)


def test_a_value_the_mod_reads_is_guarded_under_compile(monkeypatch):
    """The program is recorded while dynamo traces; a global the DSL mod reads is guarded, so a
    change recompiles and records the new program instead of reusing the old graph."""
    def fn(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, reads_a_global)

    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled, graphs = compile_recording(fn)
    with mode:
        compiled(q, k, v)
        compiled(q, k, v)
    assert len(graphs) == 1
    for value in (2.0, 3.0):
        monkeypatch.setattr(sys.modules[__name__], "SCALE", value)
        with mode:
            compiled(q, k, v)
        mod_id = op_calls(graphs[-1])[0].args[5]
        assert mod_id == _registry.record(reads_a_global, None, (), ()).mod_id
    assert len(graphs) == 3
    assert len({op_calls(g)[0].args[5] for g in graphs}) == 3


def test_a_closure_default_is_guarded_under_compile():
    def make(c):
        return lambda graph, score, tensors, *, c=c: graph.mul(score, c)
    holder = [make(0.5)]

    def fn(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, holder[0])

    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled, graphs = compile_recording(fn)
    with mode:
        compiled(q, k, v)
        holder[0] = make(4.0)
        compiled(q, k, v)
    ids = [op_calls(g)[0].args[5] for g in graphs]
    assert len(set(ids)) == 2 and ids[-1] == _registry.record(holder[0], None, (), ()).mod_id


# --- torch-style mods and mask_mods under torch.compile -----------------------------------------

WINDOW = 32


def reads_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)


def eager_id(q, **mods_kwargs):
    """The id eager mode records for the same mods (the compiled graph must name the same program)."""
    from cudnn_flex.record_call import record_call
    program, _, _ = record_call(mods_kwargs.get("score_mod"), None, mods_kwargs.get("mask_mod"), None, None,
                                q, q.shape[2])
    return program.mod_id


# A mod made by a function (mods.softcap(30.0), mods.document_mask(doc)) is a closure, which the
# dynamo of torch < 2.14 cannot read: there, such a call is refused by name
# (test_the_compiled_program_is_the_eager_one).
needs_closures = pytest.mark.skipif(not _DYNAMO_READS_CLOSURES,
                                    reason=f"torch {torch.__version__} < 2.14: closures are refused under compile")
MADE_BY_A_FUNCTION = {"softcap made in the compiled code", "document mask over a tensor argument",
                      "alibi + document mask"}

TORCH_STYLE = {
    "softcap made in the compiled code": lambda q, k, v, doc, slopes: cudnn_flex.flex_attention(
        q, k, v, mods.softcap(30.0)),
    "causal mask_mod": lambda q, k, v, doc, slopes: cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal),
    "document mask over a tensor argument": lambda q, k, v, doc, slopes: cudnn_flex.flex_attention(
        q, k, v, mask_mod=mods.document_mask(doc)),
    "alibi + document mask": lambda q, k, v, doc, slopes: cudnn_flex.flex_attention(
        q, k, v, mods.alibi(slopes), mask_mod=mods.document_mask(doc)),
    "lambda over a global": lambda q, k, v, doc, slopes: cudnn_flex.flex_attention(q, k, v, mask_mod=reads_window),
}


def fake_doc_and_slopes(mode, s=128, value=0):
    with mode:
        return torch.full((s,), value, dtype=torch.long, device="cuda"), torch.empty(4, device="cuda")


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_closures) if n in MADE_BY_A_FUNCTION else n
                                  for n in TORCH_STYLE])
def test_torch_style_mods_compile_into_one_op_with_captured_tensors_as_inputs(name):
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    doc, slopes = fake_doc_and_slopes(mode)
    compiled, graphs = compile_recording(TORCH_STYLE[name])
    with mode:
        out = compiled(q, k, v, doc, slopes)
    assert out.shape == q.shape and len(graphs) == 1
    calls = op_calls(graphs[0])
    assert len(calls) == 1
    mod_tensors = calls[0].args[3]
    # Every captured tensor reaches the op from a graph input, not as a baked constant.
    assert all(isinstance(t, torch.fx.Node) for t in mod_tensors)
    placeholders = {n.name for n in graphs[0].graph.nodes if n.op == "placeholder"}
    if "document" in name:
        assert "l_doc_" in placeholders


@needs_closures
def test_new_captured_values_reuse_the_compiled_graph():
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    compiled, graphs = compile_recording(TORCH_STYLE["alibi + document mask"])
    for value in (0, 1, 2):
        doc, slopes = fake_doc_and_slopes(mode, value=value)
        with mode:
            compiled(q, k, v, doc, slopes)
    assert len(graphs) == 1


def test_the_compiled_program_is_the_eager_one():
    """On torch < 2.14, whose dynamo cannot read a closure, the same call is refused by name."""
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    doc, slopes = fake_doc_and_slopes(mode)
    compiled, graphs = compile_recording(TORCH_STYLE["document mask over a tensor argument"])
    if not _DYNAMO_READS_CLOSURES:
        with pytest.raises(Exception, match=r"'document' reads variables .*\(doc_ids\).*\(torch >= 2.14"):
            with mode:
                compiled(q, k, v, doc, slopes)
        return
    with mode:
        compiled(q, k, v, doc, slopes)
        want = eager_id(q, mask_mod=mods.document_mask(doc))
    assert op_calls(graphs[0])[0].args[5] == want


def test_a_global_the_torch_style_mod_reads_is_guarded(monkeypatch):
    """The mod runs inline on one-element tensors, so dynamo guards WINDOW: a new value
    recompiles and records the new program (never the old graph)."""
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    doc, slopes = fake_doc_and_slopes(mode)
    compiled, graphs = compile_recording(TORCH_STYLE["lambda over a global"])
    with mode:
        compiled(q, k, v, doc, slopes)
        compiled(q, k, v, doc, slopes)
    assert len(graphs) == 1
    monkeypatch.setattr(sys.modules[__name__], "WINDOW", 64)
    with mode:
        compiled(q, k, v, doc, slopes)
        want = eager_id(q, mask_mod=reads_window)
    assert len(graphs) == 2
    ids = [op_calls(g)[0].args[5] for g in graphs]
    assert ids[0] != ids[1] and ids[1] == want


@needs_closures
def test_torch_style_mods_compile_once_for_three_sequence_lengths():
    mode = FakeTensorMode()
    compiled, graphs = compile_recording(TORCH_STYLE["alibi + document mask"], dynamic=True)
    for s in (128, 256, 384):
        q, k, v = fake_qkv(mode, s=s)
        doc, slopes = fake_doc_and_slopes(mode, s=s)
        with mode:
            assert compiled(q, k, v, doc, slopes).shape == q.shape
    assert len(graphs) == 1


CAPTURED = None  # set by the test below: a module global, as a model's tables usually are


def relative_bias_by_gather(s, b, h, q_idx, kv_idx):
    return s + CAPTURED[q_idx - kv_idx + 127]


def scales_by_unindexed_weights(s, b, h, q_idx, kv_idx):
    return s * CAPTURED


@pytest.mark.parametrize("mod,captured,match", [
    (relative_bias_by_gather, lambda: torch.zeros(255, device="cuda"), "gather by a computed index"),
    # a rank-1 tensor used without indexing: refused, as in eager
    (scales_by_unindexed_weights, lambda: torch.ones(128, device="cuda"), "without indexing"),
], ids=["gather", "unindexed"])
def test_what_a_compiled_torch_style_mod_cannot_do_is_named(monkeypatch, mod, captured, match):
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    with mode:
        monkeypatch.setattr(sys.modules[__name__], "CAPTURED", captured())

    def fn(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, mod)

    compiled, _ = compile_recording(fn)
    with pytest.raises(Exception, match=match):
        with mode:
            compiled(q, k, v)


def learned_slopes_bias(s, b, h, q_idx, kv_idx):
    return s + CAPTURED[h] * (kv_idx - q_idx)


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph break allowed"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_a_compiled_mod_over_a_tensor_that_requires_grad_is_refused_as_in_eager(monkeypatch, grad, fullgraph):
    """A learned tensor the mod captures (an nn.Parameter of per-head slopes) would get no
    gradient from cuDNN: compiled, as in eager, that is an error naming the fix, never a
    parameter that silently stops learning. With graph breaks allowed, the call runs eagerly and
    raises the ValueError itself; with fullgraph=True, dynamo raises its own error, which carries
    the message. Under no_grad nothing is trained: it compiles."""
    mode = FakeTensorMode()
    q, k, v = fake_qkv(mode)
    with mode:
        monkeypatch.setattr(sys.modules[__name__], "CAPTURED", torch.ones(4, device="cuda", requires_grad=True))

    def fn(q, k, v):
        return cudnn_flex.flex_attention(q, k, v, learned_slopes_bias)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(fn, backend=backend, fullgraph=fullgraph)
    with mode, torch.set_grad_enabled(grad):
        if grad:
            with pytest.raises(torch._dynamo.exc.Unsupported if fullgraph else ValueError,
                               match="captures a tensor that requires grad"):
                compiled(q, k, v)
        else:
            assert compiled(q, k, v).shape == q.shape
            assert len(graphs) == 1 and len(op_calls(graphs[0])) == 1


def torch_style_closures(q, k, v, doc):
    return cudnn_flex.flex_attention(q, k, v, mods.softcap(30.0), mask_mod=mods.document_mask(doc))


def dsl_keyed_object(q, k, v, doc):
    return cudnn_flex.flex_attention(q, k, v, SOFTCAP.forward, SOFTCAP.backward)


@pytest.mark.parametrize("attend", [torch_style_closures, dsl_keyed_object], ids=lambda f: f.__name__)
def test_compile_with_graph_breaks_on_the_reference_path_matches_eager(attend):
    """torch.compile without fullgraph on CPU tensors: the reference path is a graph break, and a
    graph break in a loop makes dynamo run the loop's frame as Python and compile each callee
    frame on its own, the recording of the mods among them (it failed with dynamo's internal
    TypeError). The result is eager's."""
    def two_layers(q, k, v, doc):
        for _ in range(2):
            q = attend(q, k, v, doc)
        return q

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    doc = (torch.arange(40) >= 17).long()
    want = two_layers(q, k, v, doc)
    got = torch.compile(two_layers)(q, k, v, doc)
    torch.testing.assert_close(got, want)


def test_varlen_inside_a_compiled_function_runs_eagerly_and_matches():
    """flex_attention_varlen reads its lengths on the host: under torch.compile it is a graph
    break that runs eagerly, with the compiled code around it."""
    def packed_block(q, k, v, cu):
        out = cudnn_flex.flex_attention_varlen(q * 2, k, v, cu, cu, mask_mod=mods.causal)
        return out.relu()

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(23, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    torch.testing.assert_close(torch.compile(packed_block)(q, k, v, cu), packed_block(q, k, v, cu))
