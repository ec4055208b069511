"""cuDNN's op replaced by a stub on the CPU, for the tests of the shortcut (fast_path.py): it
records which program each call runs, so that a test sees when the shortcut is taken and that it
always runs the program the full path would."""

import gc
import weakref

import pytest
import torch

import cudnn_flex
from cudnn_flex import _ops, _validation, api, fast_path, varlen
from record_counter import count_records


class StubOp:
    # records: how many calls took the full path (recorded their mods)
    records = property(lambda self: self.counted[0])

    """_C.fwd on the CPU: records (mod_id, bprop_id) and returns zeros of the op's shapes."""

    def __init__(self):
        self.ids = []
        self.calls = []  # the other arguments of each call
        self.refuse = None  # an exception to raise instead, once
        self.during = None  # a function to run inside the next call, once (another thread, say)

    def fwd(self, q, k, v, mod_tensors, bprop_tensors, mod_id, bprop_id, cacheable, scale, deterministic,
            seq_lens, cu_seqlens, max_seqlens, every_row_attends=False):
        if self.refuse is not None:
            error, self.refuse = self.refuse, None
            raise error
        if self.during is not None:
            during, self.during = self.during, None
            during()
        refuse_like_the_op(q, k, list(mod_tensors) + list(bprop_tensors), cu_seqlens, max_seqlens)
        refuse_lengths_like_the_op(q, seq_lens, cu_seqlens)
        self.ids.append((mod_id, bprop_id))
        self.calls.append({"rows": q.shape[2], "mod_tensors": list(mod_tensors), "bprop_tensors": list(bprop_tensors), "seq_lens": list(seq_lens), "cu_seqlens": list(cu_seqlens), "max_seqlens": list(max_seqlens),
                           "scale": scale, "deterministic": deterministic, "every_row_attends": every_row_attends})
        out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
        if not cu_seqlens:
            return out, torch.zeros(q.shape[:3], dtype=torch.float32)
        # Packed sequences: lse per sequence and position, [n, H, max_q], as cuDNN's; numbered, so
        # that a test sees which rows reach each token.
        n = cu_seqlens[0].numel() - 1
        return out, torch.arange(n * q.shape[1] * max_seqlens[0], dtype=torch.float32).view(n, q.shape[1], -1)


def refuse_like_the_op(q, k, tensors: list, cu_seqlens, max_seqlens) -> None:
    """The refusals of score_mod tensors that the op makes itself (ops.cpp, graph_inputs) and the
    shortcut leaves to it: a tensor not on q's device (a one-element CPU tensor is passed by
    value), of more than 4 dims, or of a shape that does not broadcast against the scores (packed:
    [n, H, max_q, max_kv]). Its alignment check is the GPU tests' (on the CPU the full path does not
    check alignment either)."""
    if cu_seqlens:
        scores = (cu_seqlens[0].numel() - 1, q.shape[1], max_seqlens[0], max_seqlens[1])
    else:
        scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    for i, t in enumerate(tensors):
        host_scalar = t.device.type == "cpu" and t.numel() == 1
        if not host_scalar and t.device != q.device:
            raise ValueError(f"stub op: score_mod tensor #{i} is on {t.device} but q is on {q.device}")
        if t.dim() > 4 or not host_scalar and any(n not in (1, f) for n, f in zip(reversed(t.shape), reversed(scores))):
            raise ValueError(f"stub op: score_mod tensor #{i} of shape {tuple(t.shape)} does not broadcast against {scores}")


def refuse_lengths_like_the_op(q, seq_lens, cu_seqlens) -> None:
    """The op's own refusals of a padded batch's lengths (ops.cpp, padded_batch): each contiguous
    int32 [B] on q's device. (The shortcut leaves their metadata to it on a repeat.)"""
    batch = cu_seqlens[0].numel() - 1 if cu_seqlens else q.shape[0]
    for t in seq_lens:
        if t.dtype != torch.int32 or t.dim() != 1 or t.shape[0] != batch or t.stride(0) != 1 or t.device != q.device:
            raise ValueError(f"stub op: lengths must be a contiguous int32 [{batch}] on {q.device}, got {t.dtype} "
                             f"{tuple(t.shape)} with strides {t.stride()} on {t.device}")


def is_the_op(func) -> bool:
    """Whether a __torch_function__ handler is called for the forward op (torch.ops.cudnn_flex.fwd)."""
    return func is torch.ops.cudnn_flex.fwd.default or func is torch.ops.cudnn_flex.fwd


def op_zeros(args) -> tuple:
    """What a handler answers the op with: zeros of its out [B, H, Sq, D_v] and lse [B, H, Sq] for
    its arguments (q, k, v first; a subclass's q or v read as a plain tensor)."""
    q, v = (t if type(t) is torch.Tensor else torch.Tensor._make_subclass(torch.Tensor, t) for t in (args[0], args[2]))
    return torch.zeros(q.shape[:3] + v.shape[3:], dtype=q.dtype), torch.zeros(q.shape[:3])


def logged_subclass(seen: list) -> type:
    """A torch.Tensor subclass whose __torch_function__ records each call of the op in `seen` and
    answers it with zeros of the op's shapes; anything else runs as for a plain tensor."""
    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types_, args=(), kwargs=None):
            if is_the_op(func):
                seen.append(func)
                return op_zeros(args)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
    return Logged


@pytest.fixture
def op(monkeypatch):
    """CPU bf16 tensors take the cuDNN path, whose op is a StubOp; calls that took the full path
    are counted in op.records."""
    stub = StubOp()
    stub.counted = count_records(monkeypatch, api, varlen)
    monkeypatch.setattr(_ops, "_C", stub)
    monkeypatch.setattr(_validation, "cudnn_takes", lambda q: True)
    monkeypatch.setattr(fast_path, "cudnn_takes", lambda q: True)
    cudnn_flex.clear_cache()
    yield stub
    cudnn_flex.clear_cache()


def then_once(monkeypatch, name: str, change) -> None:
    """fast_path.<name> runs change() once, right after its next call returns: another thread
    acting between that step of a call and the next."""
    step, pending = getattr(fast_path, name), [change]

    def step_then_change(*args, **kwargs):
        result = step(*args, **kwargs)
        if pending:
            pending.pop()()
        return result
    monkeypatch.setattr(fast_path, name, step_then_change)


def assert_batches_keep_nothing(op, table: dict, make_batch, run) -> None:
    """Three batches, each with its tensor and a mod over it (make_batch() -> (tensor, mod)), each
    mod run twice (two layers): once a batch's mod goes, so do its entry in `table`, its snapshot
    and its tensor, without waiting for the cycle collector."""
    gc.disable()
    try:
        before = len(table), len(fast_path._snapshots)
        gone = []
        for _ in range(3):
            tensor, mod = make_batch()
            gone.append(weakref.ref(tensor))
            for _ in range(2):
                run(mod)
            del tensor, mod
        op.calls.clear()  # the stub keeps what it was handed
        assert [r() for r in gone] == [None] * 3
        assert (len(table), len(fast_path._snapshots)) == before
    finally:
        gc.enable()
    assert op.records == 3
