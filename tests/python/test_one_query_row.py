"""One query row (a decode step) on the CPU, cuDNN's op replaced by a stub: which calls the op runs
as two rows (_ops.needs_two_rows; cuDNN 9.19 computes the head and key index wrongly inside a
score_mod at one row, test_gpu_one_query_row.py checks both kinds against the formula), on the
full path and on the shortcut, and that the caller gets one row either way."""

import pytest
import torch

import cudnn_flex
from cudnn_flex import dsl_mods, mods
from dsl_tensor_mods import scaled_by
from stub_op import op  # noqa: F401  (a fixture)

B, H, D = 2, 2, 16
KEYED_SOFTCAP = dsl_mods.softcap(20.0)


def batch_bias(bias: torch.Tensor):
    """A bias per batch element, captured (as users close over a tensor)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b]
    return score_mod


def key_index_bprop(graph, d_p, tensors):
    """A bprop that reads the key index (the forward reads the score only)."""
    return graph.mul(d_p, graph.gen_index(d_p, 3))


# name -> (flex_attention kwargs, whether one query row runs as two)
CASES = {
    "no mod": ({}, False),
    "softcap": (dict(score_mod=mods.softcap(20.0)), False),
    "query index": (dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.3 * q_idx), False),
    "batch bias tensor": (dict(score_mod=batch_bias(torch.tensor([0.5, -1.0]))), False),
    "dsl softcap with its bprop": (dict(score_mod=KEYED_SOFTCAP.forward, score_mod_bprop=KEYED_SOFTCAP.backward),
                                   False),
    "dsl tensor": (dict(score_mod=scaled_by, score_mod_tensors={"c": torch.full((1, H, 1, 1), 0.5)}), False),
    "key index": (dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.01 * kv_idx), True),
    "head index": (dict(score_mod=lambda s, b, h, q_idx, kv_idx: s + 0.3 * h), True),
    "alibi": (dict(score_mod=mods.alibi(mods.alibi_slopes(H))), True),
    "dsl alibi": (dict(score_mod=dsl_mods.alibi, score_mod_tensors={"slopes": mods.alibi_slopes(H).view(1, H, 1, 1)}),
                  True),
    "key index in the bprop only": (dict(score_mod=scaled_by, score_mod_bprop=key_index_bprop,
                                         score_mod_tensors={"c": torch.full((1, 1, 1, 1), 0.5)}), True),
    "mask over keys": (dict(mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 5), True),
}


@pytest.mark.parametrize("case", CASES)
def test_one_query_row_runs_as_two_only_where_an_index_is_read(op, case):
    kwargs, two_rows = CASES[case]
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):  # the full path, then the shortcut
        out, lse = cudnn_flex.flex_attention(q, k, v, **kwargs, return_lse=True)
        assert op.calls[-1]["rows"] == (2 if two_rows else 1)
        assert out.shape == (B, H, 1, D) and lse.shape == (B, H, 1)
    assert op.records == 1


def test_one_query_and_one_key_run_as_two_rows(op):
    """cuDNN refuses the backward graph of one query and one key with a score_mod, whatever it reads."""
    q, k, v = (torch.randn(B, H, 1, D, dtype=torch.bfloat16) for _ in range(3))
    for _ in range(2):
        out = cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0))
        assert op.calls[-1]["rows"] == 2 and out.shape == (B, H, 1, D)


def test_a_program_says_whether_it_reads_the_head_or_key_index():
    from cudnn_flex.record_call import record_call
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    reads = {}
    for name, (kwargs, two_rows) in CASES.items():
        if name == "no mod":
            continue
        program = record_call(kwargs.get("score_mod"), kwargs.get("score_mod_bprop"), kwargs.get("mask_mod"),
                              kwargs.get("score_mod_tensors"), None, q, 9)[0]
        reads[name] = (program.reads_head_or_key, two_rows)
    assert all(got == want for got, want in reads.values()), reads


SLOPES = mods.alibi_slopes(H).view(-1)


def softcap_score(score, b, h, q_idx, kv_idx):
    return torch.tanh(score / 20.0) * 20.0


def alibi_score(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


# Torch-style mods without closures (a module global is read where it lives): before torch 2.14
# dynamo refuses closures (record_call._DYNAMO_READS_CLOSURES).
COMPILED = {
    "softcap": (dict(score_mod=softcap_score), False),
    "dsl softcap with its bprop": CASES["dsl softcap with its bprop"],
    "key index": CASES["key index"],
    "alibi": (dict(score_mod=alibi_score), True),
    "dsl alibi": CASES["dsl alibi"],
}


@pytest.mark.parametrize("case", COMPILED)
def test_a_compiled_call_knows_whether_its_program_reads_the_head_or_key_index(monkeypatch, case):
    """Under torch.compile the op is called without the program (the compiled graph holds its
    ids): record_call's ids say whether it reads the head or key index, and cudnn_call hands that
    on, so a compiled decode step of a softcap runs one row too."""
    from cudnn_flex import _ops, api
    from cudnn_flex.record_call import record_call
    kwargs, two_rows = COMPILED[case]
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    handed = []

    def fwd(*args, **kw):
        handed.append(kw)
        return torch.zeros(B, H, 1, D, dtype=q.dtype), torch.zeros(B, H, 1)
    monkeypatch.setattr(_ops, "fwd", fwd)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    program, mod_tensors, bprop_tensors = record_call(kwargs.get("score_mod"), kwargs.get("score_mod_bprop"), None,
                                                      kwargs.get("score_mod_tensors"), None, q, 9)
    assert isinstance(program, tuple)  # (the ids, as a compiled graph holds them)
    api.cudnn_call(q, k, v, program, mod_tensors, bprop_tensors, None, False)
    assert handed[0]["reads_head_or_key"] is two_rows


@pytest.mark.parametrize("reads,rows", [(False, 1), (True, 2), (None, 2)])
def test_the_op_runs_one_row_by_what_it_is_told_of_a_program_not_at_hand(op, reads, rows):
    """_ops.fwd without the program (as under torch.compile): None says nothing is known."""
    from cudnn_flex import _ops
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    out, lse = _ops.fwd(q, k, v, None, 12345, 0, [], [], None, False, reads_head_or_key=reads)
    assert op.calls[-1]["rows"] == rows and out.shape == (B, H, 1, D) and lse.shape == (B, H, 1)


class RowsOp:
    """_C.fwd on the CPU that keeps the q it is handed and answers with q itself as out (D = Dv)
    and q's first column as lse, so that a test sees each row the caller gets back."""

    def __init__(self):
        self.handed = []

    def fwd(self, q, k, v, *args):
        self.handed.append(q.detach().clone())
        return q.detach().clone(), q.detach()[..., 0].float()


@pytest.mark.parametrize("grad", [False, True], ids=["no backward", "backward"])
def test_the_second_row_and_the_row_returned(op, monkeypatch, grad):
    """A one-row call run as two: the caller gets the first row's out and lse; the second row is
    a copy of the first without a backward, and zero with one (its scores then stay finite
    whatever a key it alone sees holds, so its share of the gradients is zero)."""
    from cudnn_flex import _ops
    seen = RowsOp()
    monkeypatch.setattr(_ops, "_C", seen)
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16, requires_grad=grad)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):  # the full path, then the shortcut
        out, lse = cudnn_flex.flex_attention(q, k, v, **CASES["key index"][0], return_lse=True)
        handed = seen.handed[-1]
        assert handed.shape == (B, H, 2, D) and torch.equal(handed[:, :, :1], q.detach())
        assert torch.equal(handed[:, :, 1:], torch.zeros_like(q) if grad else q.detach())
        assert torch.equal(out, q.detach()) and torch.equal(lse, q.detach()[..., 0].float())


REFUSAL = "cudnn_flex: cuDNN refused the forward attention graph at finalize for q {} ... NOT_SUPPORTED"


class RefusingOp:
    """The stub op, refusing (as the op does: ValueError, or RuntimeError past choosing a kernel)
    the forward of one query row with a score_mod, or of any row count with `everywhere`."""

    def __init__(self, stub, error=ValueError, everywhere=False, message=REFUSAL):
        self.stub, self.error, self.everywhere, self.message = stub, error, everywhere, message
        self.asked = []  # the rows of each call

    def fwd(self, q, k, v, mod_tensors, bprop_tensors, mod_id, *args):
        self.asked.append(q.shape[2])
        if mod_id != 0 and (q.shape[2] == 1 or self.everywhere):
            raise self.error(self.message.format(list(q.shape)))
        return self.stub.fwd(q, k, v, mod_tensors, bprop_tensors, mod_id, *args)


@pytest.fixture
def refusals(monkeypatch):
    from cudnn_flex import _ops
    monkeypatch.setattr(_ops, "_refused_at_one_row", set())
    return _ops


@pytest.mark.parametrize("error", [ValueError, RuntimeError])
def test_a_program_cuDNN_refuses_at_one_row_runs_two(op, monkeypatch, refusals, error):
    """cuDNN 9.19 refuses some programs at one row that it takes at two (test_gpu_random_programs):
    such a call runs two rows, and the calls after it (full path and shortcut) go there at once."""
    refusing = RefusingOp(op, error)
    monkeypatch.setattr(refusals, "_C", refusing)
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        out, lse = cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0), return_lse=True)
        assert out.shape == (B, H, 1, D) and lse.shape == (B, H, 1)
    assert refusing.asked == [1, 2, 2, 2]
    # another shape, a padded call, or a call with a backward (each another graph) asks cuDNN at
    # one row again; q requiring grad under no_grad has no backward
    with torch.no_grad():
        cudnn_flex.flex_attention(q.detach().requires_grad_(), k, v, mods.softcap(20.0))
    assert refusing.asked == [1, 2, 2, 2, 2]
    cudnn_flex.flex_attention(q.detach().requires_grad_(), k, v, mods.softcap(20.0))
    cudnn_flex.flex_attention(q[:1], k[:1], v[:1], mods.softcap(20.0))
    cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0), seq_lens_kv=torch.tensor([9, 4], dtype=torch.int32))
    assert refusing.asked == [1, 2, 2, 2, 2, 1, 2, 1, 2, 1, 2] and len(refusals._refused_at_one_row) == 4


def test_a_refusal_at_two_rows_too_is_the_callers_error(op, monkeypatch, refusals):
    """Refused at both row counts: the call raises the one-row refusal (its own shapes), and the
    next call asks again at one row."""
    refusing = RefusingOp(op, everywhere=True)
    monkeypatch.setattr(refusals, "_C", refusing)
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(2):
        with pytest.raises(ValueError, match="refused the forward") as raised:
            cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0))
        assert raised.value.__cause__ is None and str(raised.value) == REFUSAL.format([B, H, 1, D])
    assert refusing.asked == [1, 2, 1, 2] and not refusals._refused_at_one_row


@pytest.mark.parametrize("case", ["another error", "no mod"])
def test_only_a_refusal_of_a_one_row_program_runs_two_rows(op, monkeypatch, refusals, case):
    refusing = RefusingOp(op, everywhere=True, message="cudnn_flex: score_mod tensor #0 is on cpu") \
        if case == "another error" else RefusingOp(op)
    monkeypatch.setattr(refusals, "_C", refusing)
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    if case == "no mod":  # (the stub refuses programs only: no mod runs one row as is)
        cudnn_flex.flex_attention(q, k, v)
        assert refusing.asked == [1]
        return
    with pytest.raises(ValueError, match="is on cpu"):
        cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0))
    assert refusing.asked == [1] and not refusals._refused_at_one_row


def test_the_refusals_kept_are_bounded(op, monkeypatch, refusals):
    monkeypatch.setattr(refusals, "_MAX_REFUSED", 2)
    monkeypatch.setattr(refusals, "_C", RefusingOp(op))
    k, v = (torch.randn(3, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    for batch in (1, 2, 3, 3):  # the third fills a full table: it is cleared first
        q = torch.randn(batch, H, 1, D, dtype=torch.bfloat16)
        cudnn_flex.flex_attention(q, k[:batch], v[:batch], mods.softcap(20.0))
    assert len(refusals._refused_at_one_row) == 1 and refusals._C.asked == [1, 2, 1, 2, 1, 2, 2]


def test_a_tensor_over_two_rows_is_refused_where_a_refused_program_runs_two(op, monkeypatch, refusals):
    """The op checks a call's score_mod tensors against its own scores: where a program cuDNN
    refused at one row runs two, a tensor over two query rows would pass there, so the shortcut
    checks them itself, as the full path does."""
    monkeypatch.setattr(refusals, "_C", RefusingOp(op))
    q = torch.randn(B, H, 1, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, 9, D, dtype=torch.bfloat16) for _ in range(2))
    cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors={"c": torch.full((1, H, 1, 1), 0.5)})
    cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors={"c": torch.full((1, H, 1, 1), 0.5)})
    assert refusals._C.asked == [1, 2, 2]
    with pytest.raises(ValueError, match="score_mod_tensors"):
        cudnn_flex.flex_attention(q, k, v, scaled_by, score_mod_tensors={"c": torch.full((B, H, 2, 9), 0.5)})


def test_a_refusal_makes_no_compiled_call_recompile(refusals):
    """A compiled call does not read the refusals (its rows are fixed when traced): dynamo would
    guard on the whole set and recompile each compiled one-row call at every new refusal."""
    from torch._dynamo.utils import counters
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()  # (cuda tensors without a GPU: nothing runs)
    with mode:
        q = torch.empty(B, H, 1, 64, device="cuda", dtype=torch.bfloat16)
        k = v = torch.empty(B, H, 128, 64, device="cuda", dtype=torch.bfloat16)
    attend = torch.compile(lambda q, k, v: cudnn_flex.flex_attention(q, k, v, mods.softcap(20.0)), backend="eager",
                           fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    with mode:
        attend(q, k, v)
        for i in range(3):
            refusals._refused_at_one_row.add(("another program", i))
            attend(q, k, v)
    assert counters["stats"]["unique_graphs"] == 1
