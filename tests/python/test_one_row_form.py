"""The one-row form of a program (one_query_row.py), on the CPU: the program's forward with its
head and key indices read from int32 tensors computes what the program computes at one query row
(against dsl_torch's formula, an evaluation independent of the library's), is made once and kept
with its program, and is not made where the call must keep two rows; and the index tensors: their
values, that they outlive a longer call, and that none is made under a CUDA graph capture."""

import pytest
import torch

import cudnn_flex
import oracle
from cudnn_flex import _ops, _registry, data_type, dsl_mods, mods, one_query_row, reference
from cudnn_flex.program.record import Recorder
from cudnn_flex.record_call import record_call
from dsl_torch import formula
from gpu_cases import errors
from random_programs import ADD_SELECT_SEEDS, program, program_tensors
from stub_op import op  # noqa: F401  (a fixture)

B, H, H_KV, D = 2, 4, 2, 8


def qkv(s_kv: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, heads, n, D, generator=g, dtype=torch.float64) for heads, n in
            ((H, 1), (H_KV, s_kv), (H_KV, s_kv))]


def form_results(kwargs: dict, s_kv: int, seed: int = 0) -> dict:
    """out and lse of the one-row form of the call's program, evaluated with its index tensors."""
    q, k, v = qkv(s_kv, seed)
    program, mod_tensors, _ = record_call(kwargs.get("score_mod"), None, kwargs.get("mask_mod"),
                                          kwargs.get("score_mod_tensors"), None, q, s_kv)
    form = one_query_row.one_row_form(program)
    assert form is not None and not form.program.reads_head_or_key
    indices = one_query_row.index_tensors(form, H, s_kv, q.device)
    out, lse = reference.attention_program(q, k, v, form.program, [*mod_tensors, *indices])
    return {"out": out, "lse": lse}


def formula_results(score_formula, s_kv: int, seed: int = 0) -> dict:
    out, lse = oracle.attention(*qkv(s_kv, seed), score_formula)
    return {"out": out, "lse": lse}


def close(got: dict, want: dict) -> bool:
    return all(e < 1e-6 for e in errors(got, want).values())  # (constants are float32 in the program)


SLOPES = mods.alibi_slopes(H).view(-1)
TABLE = torch.randn(H, 512, generator=torch.Generator().manual_seed(1))

# name -> (flex_attention kwargs, the formula of the scores)
MODS = {
    "alibi": (dict(score_mod=mods.alibi(SLOPES)), lambda s, b, h, q, kv: s + SLOPES.double()[h] * (kv - q)),
    "dsl alibi": (dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": SLOPES.view(1, H, 1, 1)}),
                  lambda s, b, h, q, kv: s + SLOPES.double()[h] * (kv - q)),
    "head index": (dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.3 * h), lambda s, b, h, q, kv: s + 0.3 * h),
    "relative table": (dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + TABLE[h, kv_idx - q_idx + 256]),
                       lambda s, b, h, q, kv: s + TABLE.double()[h, kv - q + 256]),
    "keys by head": (dict(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 3 + 20 * h),
                     lambda s, b, h, q, kv: torch.where(kv < 3 + 20 * h, s, -torch.inf)),
}


@pytest.mark.parametrize("s_kv", [2, 9, 129])
@pytest.mark.parametrize("mod", MODS)
def test_the_one_row_form_computes_what_the_program_does(mod, s_kv):
    kwargs, score_formula = MODS[mod]
    assert close(form_results(kwargs, s_kv), formula_results(score_formula, s_kv))


@pytest.mark.parametrize("seed", ADD_SELECT_SEEDS[:60])
def test_the_one_row_form_of_a_random_program_computes_what_it_does(seed):
    """Random programs over every DSL op, indices and score_mod tensors (the GPU tests run them at
    one query row on cuDNN): the tensors' first query row, as those tests pass them."""
    prog, s_kv = program(seed), 33
    tensors = {name: t[:, :, :1].double() if t.shape[2] == s_kv else t.double()
               for name, t in program_tensors(B, H, s_kv, s_kv, "cpu", seed).items()}
    got = form_results(dict(score_mod=prog, score_mod_tensors=tensors), s_kv, seed)
    assert close(got, formula_results(formula(prog, tensors), s_kv, seed)), prog.text


def test_the_form_is_made_once_kept_with_its_program_and_known_to_the_op():
    program = record_call(mods.alibi(SLOPES), None, None, None, None, qkv(9)[0], 9)[0]
    form = one_query_row.one_row_form(program)
    assert one_query_row.one_row_form(program) is form and program.one_row_form is form
    assert _registry.lookup(form.program.mod_id) is form.program
    assert form.program.mod_id not in (program.mod_id, program.bprop_id)
    assert form.program.bwd_out is None and form.program.bprop_error is not None  # forward only
    # a mod that computes the same program (another closure over other slopes) has the same form id
    again = record_call(mods.alibi(SLOPES * 2), None, None, None, None, qkv(9)[0], 9)[0]
    assert one_query_row.one_row_form(again).program.mod_id == form.program.mod_id


def score_index_as_float(graph, score, tensors):
    """score + 0.01 * kv_idx with the index computed in float: not the INT32 index a tensor stands for."""
    return graph.add(score, graph.mul(graph.gen_index(score, 3, compute_data_type=data_type.FLOAT), 0.01))


@pytest.mark.parametrize("kwargs", [dict(mask_mod=mods.causal), dict(mask_mod=mods.sliding_window(4)),
                                    dict(score_mod=score_index_as_float)],
                         ids=["causal band", "window band", "index with a compute type"])
def test_no_one_row_form_where_the_call_keeps_two_rows(kwargs):
    program = record_call(kwargs.get("score_mod"), None, kwargs.get("mask_mod"), None, None, qkv(9)[0], 9)[0]
    assert program.reads_head_or_key and one_query_row.one_row_form(program) is None


@pytest.fixture
def fresh_indices(monkeypatch):
    monkeypatch.setattr(one_query_row, "_aranges", {})
    monkeypatch.setattr(one_query_row, "_views", {})


def test_index_tensors_outlive_a_longer_call(fresh_indices):
    program = record_call(lambda s, b, h, q_idx, kv_idx: s + h * kv_idx, None, None, None, None, qkv(9)[0], 9)[0]
    form = one_query_row.one_row_form(program)
    device = torch.device("cpu")
    short = one_query_row.index_tensors(form, H, 9, device)
    assert [t.dtype for t in short] == [torch.int32] * 2 and [t.shape for t in short] == [(1, H, 1, 1), (1, 1, 1, 9)]
    assert torch.equal(short[0].view(-1), torch.arange(H, dtype=torch.int32))
    assert torch.equal(short[1].view(-1), torch.arange(9, dtype=torch.int32))
    long = one_query_row.index_tensors(form, H, 5000, device)
    assert torch.equal(long[1].view(-1), torch.arange(5000, dtype=torch.int32))
    # the shorter calls' tensors (a captured graph may read them) stay alive and unchanged
    assert any(t.untyped_storage().data_ptr() == short[1].untyped_storage().data_ptr()
               for t in one_query_row._aranges[device])
    assert torch.equal(short[1].view(-1), torch.arange(9, dtype=torch.int32))
    assert one_query_row.index_tensors(form, H, 9, device) is short  # kept for the next call


def test_no_index_tensor_is_made_under_a_capture(op, fresh_indices, monkeypatch):
    """A capture cannot wait for the arange's fill: the call runs two rows, and a call after it
    makes the tensors; one made before serves a capture."""
    capturing = [True]
    monkeypatch.setattr(one_query_row, "_capturing", lambda device: capturing[0])
    q, k, v = (t.bfloat16() for t in qkv(9))
    alibi = mods.alibi(SLOPES)
    with torch.no_grad():
        cudnn_flex.flex_attention(q, k, v, alibi)
        assert op.calls[-1]["rows"] == 2 and one_query_row._aranges == {}
        capturing[0] = False
        cudnn_flex.flex_attention(q, k, v, alibi)
        capturing[0] = True
        cudnn_flex.flex_attention(q, k, v, mods.alibi(SLOPES))
    assert op.calls[-1]["rows"] == 1 and len(op.calls[-1]["mod_tensors"]) == 2


def test_past_the_views_kept_each_call_gets_its_own(fresh_indices, monkeypatch):
    monkeypatch.setattr(one_query_row, "_MAX_VIEWS", 1)
    program = record_call(mods.alibi(SLOPES), None, None, None, None, qkv(9)[0], 9)[0]
    form = one_query_row.one_row_form(program)
    device = torch.device("cpu")
    first = one_query_row.index_tensors(form, H, 9, device)
    other = one_query_row.index_tensors(form, H, 17, device)
    assert len(one_query_row._views) == 1 and one_query_row.index_tensors(form, H, 17, device) is not other
    assert torch.equal(other[0].view(-1), torch.arange(17, dtype=torch.int32))
    assert one_query_row.index_tensors(form, H, 9, device) is first


def test_a_call_with_the_op_not_told_the_program_keeps_two_rows(op):
    """Under torch.compile the op gets ids, not the program: no form to run."""
    q, k, v = (t.bfloat16() for t in qkv(9))
    with torch.no_grad():
        _ops.fwd(q, k, v, None, 12345, 0, [], [], None, False, reads_head_or_key=True)
    assert op.calls[-1]["rows"] == 2


def test_the_form_keeps_the_recorded_order_of_the_ops():
    """Only the index nodes change: the ops stay where the mod recorded them (cuDNN's results
    depend on the order ops are added)."""
    recorder = Recorder()
    score = recorder.input("score")
    distance = recorder.sub(recorder.gen_index(score, 3), recorder.gen_index(score, 2))
    from cudnn_flex.program.record import Program
    program = Program(recorder.nodes, recorder.add(score, distance).index, None, (), ())
    form = one_query_row.one_row_form(program)
    assert [n.op for n in form.program.nodes] == ["input", "input", "gen_index", "sub", "add"]
    assert form.axes == (3,) and form.program.mod_slots == (("cudnn_flex key index", "torch.int32"),)
