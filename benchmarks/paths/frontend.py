"""The cuDNN frontend Python graph path (what the reference PR does), re-stated: cudnn.pygraph +
sdpa(score_mod=) / sdpa_backward(score_mod=, score_mod_bprop=), a dict cache of built graphs keyed
by shape + mod, and an autograd.Function around them. `frontend` writes every case as a score_mod;
`frontend_native` uses cuDNN's own masks where one exists (the diagonal band for causal and sliding
windows, the padding mask for valid lengths, and for packed documents the ragged THD layout with
seq_len tensors and the padding mask): the tile-skipping baseline of the mask cases.

Its score_mods take (graph, score, tensors) like the PR's; the frontend itself calls
score_mod(graph, score), so the wrapper closes over the dict of graph tensors. Constants are
pass-by-value scalar tensors (one-element CPU tensors) in that dict, as the frontend's own tests
do, because the frontend graph takes no Python numbers as operands. Masks are one select per
condition: cuDNN refuses logical ops in these graphs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from ..cases import CASES, GEMMA_CAP, REL_C, SOFTCAP
from ..results import error_text, short_error

# Why frontend_native has no row for a case (the score_mod row `frontend` runs them all).
NATIVE_NA = {
    "nomod": "no mask: the frontend row is the native graph",
    "decode": "no mask: the frontend row is the native graph",
    "softcap": "a score_mod has no native form",
    "decode_softcap": "a score_mod has no native form",
    "relbias": "a score_mod has no native form",
    "alibi": "cuDNN's native ALiBi (use_alibi_mask) is causal only (right bound 0); this ALiBi is not causal",
    "decode_alibi": "cuDNN's native ALiBi needs a causal band and refuses the bottom-right one a decode "
                    "query needs",
    "docmask": "packed documents natively need the ragged THD layout (cu_seqlens), not an ids tensor",
    "gemma2": "cuDNN takes no native mask beside a score_mod (\"score mod enabled and hence other "
              "subgraphs are disabled\"), and the softcap needs one",
}


def na_reason(case: str, native: bool) -> Optional[str]:
    if case not in CASES:
        return f"unknown case {case}"
    return NATIVE_NA.get(case) if native else None


def _fe_types():
    import cudnn
    return cudnn.data_type


def _fe_index(g, score, axis):
    dt = _fe_types()
    t = g.gen_index(input=score, axis=axis, compute_data_type=dt.INT32)
    t.set_data_type(dt.INT32)
    return t


def _fe_float(t):
    t.set_data_type(_fe_types().FLOAT)
    return t


def _fe_keep(g, score, keep, t):
    """score where keep, else -inf."""
    keep.set_data_type(_fe_types().BOOLEAN)
    return g.binary_select(input0=score, input1=t["neg_inf"], mask=keep)


def fe_causal(g, score, t):
    dt = _fe_types()
    keep = g.cmp_ge(input=_fe_index(g, score, 2), comparison=_fe_index(g, score, 3), compute_data_type=dt.FLOAT)
    return _fe_keep(g, score, keep, t)


def fe_relbias(g, score, t):
    dt = _fe_types()
    dist = _fe_float(g.sub(a=_fe_index(g, score, 2), b=_fe_index(g, score, 3), compute_data_type=dt.FLOAT))
    bias = _fe_float(g.mul(a=dist, b=t["c"], compute_data_type=dt.FLOAT))
    return g.add(a=score, b=bias, compute_data_type=dt.FLOAT)


def fe_alibi(g, score, t):
    dt = _fe_types()
    dist = _fe_float(g.sub(a=_fe_index(g, score, 3), b=_fe_index(g, score, 2), compute_data_type=dt.FLOAT))
    bias = _fe_float(g.mul(a=dist, b=t["slopes"], compute_data_type=dt.FLOAT))
    return g.add(a=score, b=bias, compute_data_type=dt.FLOAT)


def fe_alibi_offset(g, score, t):
    """ALiBi with the query at q_idx + offset (bottom-right for decode)."""
    dt = _fe_types()
    dist = _fe_float(g.sub(a=_fe_index(g, score, 3), b=_fe_index(g, score, 2), compute_data_type=dt.FLOAT))
    dist = _fe_float(g.sub(a=dist, b=t["offset"], compute_data_type=dt.FLOAT))
    bias = _fe_float(g.mul(a=dist, b=t["slopes"], compute_data_type=dt.FLOAT))
    return g.add(a=score, b=bias, compute_data_type=dt.FLOAT)


def fe_doc_mask(g, score, t):
    # cuDNN takes no graph input as the first operand of a pointwise op: lift doc_q by adding it
    # to a virtual zero made from an index (the form the frontend's own document-mask test uses).
    dt = _fe_types()
    zero = _fe_float(g.mul(a=_fe_index(g, score, 3), b=t["zero"], compute_data_type=dt.FLOAT))
    doc_q = _fe_float(g.add(a=zero, b=t["doc_q"], compute_data_type=dt.FLOAT))
    keep = g.cmp_eq(input=doc_q, comparison=t["doc_kv"], compute_data_type=dt.FLOAT)
    return _fe_keep(g, score, keep, t)


def fe_window(g, score, t):
    """Causal, and q_idx - kv_idx < window: two selects."""
    dt = _fe_types()
    score = fe_causal(g, score, t)
    dist = _fe_float(g.sub(a=_fe_index(g, score, 2), b=_fe_index(g, score, 3), compute_data_type=dt.FLOAT))
    keep = g.cmp_lt(input=dist, comparison=t["window"], compute_data_type=dt.FLOAT)
    return _fe_keep(g, score, keep, t)


def fe_padding(g, score, t):
    """q_idx < len[b] and kv_idx < len[b] (len_f [B,1,1,1]): two selects."""
    dt = _fe_types()
    for axis in (2, 3):
        keep = g.cmp_lt(input=_fe_index(g, score, axis), comparison=t["len_f"], compute_data_type=dt.FLOAT)
        score = _fe_keep(g, score, keep, t)
    return score


class FeSoftcap:
    """cap * tanh(score / cap); the bprop reuses the tensor its forward made in the same graph."""

    def __init__(self):
        self.before_tanh = None

    def forward(self, g, score, t):
        dt = _fe_types()
        self.before_tanh = _fe_float(g.div(a=score, b=t["cap"], compute_data_type=dt.FLOAT))
        return g.mul(a=_fe_float(g.tanh(input=self.before_tanh, compute_data_type=dt.FLOAT)),
                     b=t["cap"], compute_data_type=dt.FLOAT)

    def backward(self, g, d_p, t):
        # Masked entries (a mask after the softcap) have P = 0, so their dP never matters here.
        return g.tanh_backward(loss=d_p, input=self.before_tanh, compute_data_type=_fe_types().FLOAT)


@dataclasses.dataclass
class Ragged:
    """One packed row of documents as cuDNN's THD layout: [n, H, longest, D] descriptors located by
    ragged offsets (cu_seqlens times the token stride), the lengths as seq_len tensors [n,1,1,1]."""
    lengths: tuple
    cu: torch.Tensor            # int32 [n + 1] on the device
    seq_len: torch.Tensor       # int32 [n, 1, 1, 1] on the device

    @classmethod
    def of(cls, lengths, device) -> "Ragged":
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        seq_len = torch.tensor(lengths, dtype=torch.int32).view(-1, 1, 1, 1)
        return cls(tuple(lengths), cu.to(device), seq_len.to(device))

    def place(self, g, d, t: torch.Tensor, pack: dict):
        """Gives the graph tensor d of t ([1, H, total, D], any token stride) cuDNN's packed dims
        [n, H, longest, D] and the ragged offsets of t's token stride (one offsets tensor per stride)."""
        n, st, longest = len(self.lengths), t.stride(2), max(self.lengths)
        d.set_dim([n, t.shape[1], longest, t.shape[3]]).set_stride([longest * st, t.stride(1), st, 1])
        key = ("ragged offsets", st)
        if key not in pack:
            values = (self.cu * st).view(-1, 1, 1, 1)
            pack[key] = (g.tensor_like(values), values)
        d.set_ragged_offset(pack[key][0])
        return d

    def stats_shape(self, h: int) -> tuple:
        return (len(self.lengths), h, max(self.lengths), 1)


@dataclasses.dataclass
class FeMod:
    key: str                             # cache key of the mod (the PR keys named fns by qualname)
    fwd: Optional[Callable] = None       # (graph, score, tensors) -> score
    bwd: Optional[Callable] = None       # (graph, dP, tensors) -> dP
    tensors: Optional[dict] = None       # name -> torch tensor (one-element CPU: pass by value)
    native: Optional[dict] = None        # cuDNN's own mask: constant sdpa / sdpa_backward kwargs
    native_inputs: tuple = ()            # names in `tensors` passed as sdpa kwargs of that name
    ragged: Optional[Ragged] = None      # packed documents: q, k, v, o and grads in the THD layout


def _scalar(x: float) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), x, dtype=torch.float32)


def frontend_mod(case: str, inputs: dict, native: bool = False) -> FeMod:
    if native and NATIVE_NA.get(case):
        raise ValueError(f"frontend_native: {NATIVE_NA[case]}")
    neg_inf = {"neg_inf": _scalar(float("-inf"))}
    if case in ("nomod", "decode"):
        return FeMod("nomod")
    if case == "causal":
        if native:
            return FeMod("causal_native", native={"diagonal_band_right_bound": 0})   # top-left
        return FeMod("causal", fe_causal, None, neg_inf)
    if case == "softcap":
        cap = FeSoftcap()
        return FeMod(f"softcap{SOFTCAP}", cap.forward, cap.backward, {"cap": _scalar(SOFTCAP)})
    if case == "alibi":
        return FeMod("alibi", fe_alibi, None, {"slopes": inputs["slopes"]})
    if case == "relbias":
        return FeMod("relbias", fe_relbias, None, {"c": _scalar(REL_C)})
    if case in ("docs8x2k", "docsmix") and native:
        ragged = Ragged.of(inputs["doc_lengths"], inputs["doc_ids"].device)
        return FeMod(f"docs_ragged{hash(ragged.lengths)}", native={"use_padding_mask": True}, ragged=ragged)
    if case in ("docmask", "docs8x2k", "docsmix"):
        return FeMod("docmask", fe_doc_mask, None, {**neg_inf, "zero": _scalar(0.0),
                                                    "doc_q": inputs["doc_q"], "doc_kv": inputs["doc_kv"]})
    if case == "window1k":
        w = inputs["window"]
        if native:   # kv in (q - w, q]: cuDNN's band, left bound w, right bound 0
            return FeMod(f"window{w}_native", native={"diagonal_band_left_bound": w, "diagonal_band_right_bound": 0})
        return FeMod("window", fe_window, None, {**neg_inf, "window": _scalar(w)})
    if case == "decode_softcap":
        cap = FeSoftcap()
        return FeMod(f"softcap{GEMMA_CAP}", cap.forward, cap.backward, {"cap": _scalar(GEMMA_CAP)})
    if case == "gemma2":
        cap = FeSoftcap()
        return FeMod(f"softcap{GEMMA_CAP}_window", lambda g, s, t: fe_window(g, cap.forward(g, s, t), t), cap.backward,
                     {**neg_inf, "cap": _scalar(GEMMA_CAP), "window": _scalar(inputs["window"])})
    if case == "padded":
        if native:
            return FeMod("padding_native", None, None,
                         {"seq_len_q": inputs["seq_len_q"], "seq_len_kv": inputs["seq_len_kv"]},
                         native={"use_padding_mask": True}, native_inputs=("seq_len_q", "seq_len_kv"))
        return FeMod("padding", fe_padding, None, {**neg_inf, "len_f": inputs["len_f"]})
    if case == "decode_alibi":
        return FeMod("alibi_offset", fe_alibi_offset, None,
                     {"slopes": inputs["slopes"], "offset": _scalar(float(inputs["offset"]))})
    raise ValueError(case)


def _meta(t: torch.Tensor) -> tuple:
    return tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type


# Substrings of the frontend's own (python, JIT-compiled) SDPA engines; only used to retry a build
# that failed with the frontend's default plan choice (see FrontendPath._build).
FE_PYTHON_ENGINES = ("sdpa_fwd_prefill", "sdpa_bwd_sm")


class FrontendPath:
    """Built cuDNN frontend graphs in a dict keyed by (pass, tensor metadata, mod key), like the PR."""

    def __init__(self):
        import cudnn
        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        self.graphs: dict = {}
        self.plans: dict = {}     # "mod pass D" -> plans the frontend chose (for the report)

    def _new_graph(self, q: torch.Tensor, bar_python_engines: bool):
        dt = self.cudnn.data_type
        io = dt.BFLOAT16 if q.dtype == torch.bfloat16 else dt.HALF
        g = self.cudnn.pygraph(io_data_type=io, intermediate_data_type=dt.FLOAT,
                               compute_data_type=dt.FLOAT, handle=self.handle)
        if bar_python_engines:
            g.deselect_engines(list(FE_PYTHON_ENGINES))
        return g

    def _finish(self, g) -> int:
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([self.cudnn.heur_mode.A, self.cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        return g.get_workspace_size()

    def _build(self, builder: Callable, label: str):
        """builder(bar_python_engines) -> entry. The frontend's default plan choice first; if that
        fails (this frontend also ranks its own JIT-compiled python SDPA engines), once more with
        them deselected, so the row measures the cuDNN backend rather than showing an error."""
        try:
            entry = builder(False)
            note = ""
        except Exception as first:  # noqa: BLE001
            try:
                entry = builder(True)
            except Exception:  # noqa: BLE001
                raise first
            note = f" (python engines deselected after: {short_error(error_text(first), 120)})"
        self.plans.setdefault(label, set()).add(self._plan_name(entry[0]) + note)
        return entry

    @staticmethod
    def _plan_name(g) -> str:
        try:
            eng = g.selected_engine
            name = g.get_plan_name_at_index(g._plan_index)
            return f"python engine {name}" if eng is not None else f"cuDNN backend {name}"
        except Exception:  # noqa: BLE001  (diagnostic only)
            return "?"

    @staticmethod
    def _callbacks(mod: FeMod, gt: dict) -> dict:
        kw = {}
        if mod.fwd is not None:
            kw["score_mod"] = lambda graph, score: mod.fwd(graph, score, gt)
        kw.update(mod.native or {})
        kw.update({name: gt[name] for name in mod.native_inputs})
        return kw

    @staticmethod
    def _placer(g, mod: FeMod, gt: dict):
        """(graph tensor, buffer) -> graph tensor with the buffer's layout: its own dims and strides,
        or for packed documents the ragged layout (whose offsets and lengths join gt)."""
        if mod.ragged is None:
            return lambda d, t: d.set_dim(list(t.shape)).set_stride(list(t.stride()))
        return lambda d, t: mod.ragged.place(g, d, t, gt)

    def _inputs(self, g, mod: FeMod, gt: dict, *buffers):
        place = self._placer(g, mod, gt)
        return tuple(place(g.tensor_like(t), t) for t in buffers)

    def _ragged_kwargs(self, g, mod: FeMod, gt: dict) -> dict:
        if mod.ragged is None:
            return {}
        lengths = g.tensor_like(mod.ragged.seq_len)
        gt[("seq_len",)] = (lengths, mod.ragged.seq_len)
        return {"seq_len_q": lengths, "seq_len_kv": lengths}

    def _build_fwd(self, q, k, v, o, stats, mod: FeMod, scale: float, bar_python_engines=False):
        g = self._new_graph(q, bar_python_engines)
        gt = {n: g.tensor_like(x) for n, x in (mod.tensors or {}).items()}
        tq, tk, tv = self._inputs(g, mod, gt, q, k, v)
        to, tstats = g.sdpa(q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                            **self._callbacks(mod, gt), **self._ragged_kwargs(g, mod, gt))
        self._placer(g, mod, gt)(to.set_output(True), o)
        tstats.set_output(True).set_data_type(self.cudnn.data_type.FLOAT)
        if mod.ragged is not None:
            tstats.set_dim(list(stats.shape)).set_stride(list(stats.stride()))
        ws = self._finish(g)
        return g, ws, (tq, tk, tv, to, tstats), gt

    def _build_bwd(self, q, k, v, o, do, stats, dq, dk, dv, mod: FeMod, scale: float,
                   bar_python_engines=False):
        g = self._new_graph(q, bar_python_engines)
        gt = {n: g.tensor_like(x) for n, x in (mod.tensors or {}).items()}
        ins = self._inputs(g, mod, gt, q, k, v, o, do) + (g.tensor_like(stats),)
        kw = {**self._callbacks(mod, gt), **self._ragged_kwargs(g, mod, gt)}
        if mod.bwd is not None:
            kw["score_mod_bprop"] = lambda graph, d_p: mod.bwd(graph, d_p, gt)
        tdq, tdk, tdv = g.sdpa_backward(q=ins[0], k=ins[1], v=ins[2], o=ins[3], dO=ins[4], stats=ins[5],
                                        attn_scale=scale, **kw)
        place = self._placer(g, mod, gt)
        for t, buf in ((tdq, dq), (tdk, dk), (tdv, dv)):
            place(t.set_output(True), buf)
        ws = self._finish(g)
        return g, ws, ins + (tdq, tdk, tdv), gt

    def _execute(self, g, ws: int, graph_tensors: tuple, buffers: tuple, gt: dict, mod: FeMod, dev):
        pack = dict(zip(graph_tensors, buffers))
        pack.update({gt[n]: x for n, x in (mod.tensors or {}).items()})
        pack.update(dict(v for n, v in gt.items() if isinstance(n, tuple)))  # ragged offsets, lengths
        workspace = torch.empty(ws, dtype=torch.uint8, device=dev)
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(dev).cuda_stream)
        g.execute(pack, workspace, handle=self.handle)

    def forward(self, q, k, v, mod: FeMod, scale: float):
        o = torch.empty_like(q)
        if mod.ragged is not None:  # the documents fill the row: every row of o is written
            stats = torch.empty(mod.ragged.stats_shape(q.shape[1]), dtype=torch.float32, device=q.device)
        else:
            stats = torch.empty(*q.shape[:-1], 1, dtype=torch.float32, device=q.device)
        key = ("fwd", mod.key, scale) + tuple(_meta(x) for x in (q, k, v)) + \
            tuple((n,) + _meta(x) for n, x in (mod.tensors or {}).items())
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._build(
                lambda bar: self._build_fwd(q, k, v, o, stats, mod, scale, bar), f"{mod.key} fwd D={q.shape[-1]}")
        g, ws, tensors, gt = entry
        self._execute(g, ws, tensors, (q, k, v, o, stats), gt, mod, q.device)
        return o, stats

    def backward(self, q, k, v, o, do, stats, mod: FeMod, scale: float):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        key = ("bwd", mod.key, scale) + tuple(_meta(x) for x in (q, k, v, o, do, stats)) + \
            tuple((n,) + _meta(x) for n, x in (mod.tensors or {}).items())
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._build(
                lambda bar: self._build_bwd(q, k, v, o, do, stats, dq, dk, dv, mod, scale, bar),
                f"{mod.key} bwd D={q.shape[-1]}")
        g, ws, tensors, gt = entry
        self._execute(g, ws, tensors, (q, k, v, o, do, stats, dq, dk, dv), gt, mod, q.device)
        return dq, dk, dv


class _FrontendAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fe: FrontendPath, mod: FeMod, scale: float):
        o, stats = fe.forward(q, k, v, mod, scale)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.fe, ctx.mod, ctx.scale = fe, mod, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats = ctx.saved_tensors
        dq, dk, dv = ctx.fe.backward(q, k, v, o, do.contiguous(), stats, ctx.mod, ctx.scale)
        return dq, dk, dv, None, None, None


_frontend = None


def frontend_path() -> FrontendPath:
    global _frontend
    if _frontend is None:
        _frontend = FrontendPath()
    return _frontend



def plans() -> dict:
    """"mod pass D" -> the plans the frontend chose (for the report); empty if it never ran."""
    return {k: sorted(v) for k, v in sorted(_frontend.plans.items())} if _frontend is not None else {}


def runner(case: str, inputs: dict, native: bool) -> Callable:
    fe = frontend_path()
    mod = frontend_mod(case, inputs, native=native)
    scale = 1.0 / math.sqrt(inputs["shape"].d)
    return lambda q, k, v: _FrontendAttention.apply(q, k, v, fe, mod, scale)
