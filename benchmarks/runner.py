"""What runs, in which order: the grid and mask cases on every path, the host-time and cold-build
side measurements, each failure kept to its own row.

Order: every path but torch flex over all shapes, then torch flex (its torch.compile per mod and
shape is the slow part, so a tight --budget-s cuts it first); within each pass the issue's
headline shapes (S in {4k, 8k}, D=128) first, then the mask cases, then the rest of the grid.
Work still pending when the budget runs out is marked skipped, never cut mid-measurement.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from .cases import CASES, SOFTCAP, Shape, make_inputs, seqlen_label
from .paths import PATHS, make_runner, na_reason, sdpa
from .results import NA, SKIPPED, Result, ResultSet, error_text, short_error
from .timing import cuda_median_ms, first_call_s, fwd_and_fwd_bwd, host_us, host_us_paired

HOST_SHAPE = Shape(1, 1, 64, 64)   # kernels far shorter than the host time per call
FORWARD_ONLY = NA + "forward only (decode is inference)"


def shape_order(seqlens: list, head_dims: list) -> list:
    """Grid (s, d) in run order: the issue's headline shapes (S in {4k, 8k}, D=128) first, so a
    run cut by the budget still has the figures; then the rest of D=128, then other D."""
    def priority(sd):
        s, d = sd
        return (d != 128, s not in (4096, 8192), -d, -s)
    return sorted({(s, d) for s in seqlens for d in head_dims}, key=priority)


def work_list(args) -> list:
    """[(shape, case names)] in run order. Grid cases share one input set per shape; each mask
    case runs at its own shapes. Shapes are scaled down by args.scale."""
    grid = [c for c in args.case_list if CASES[c].grid]
    masks = [c for c in args.case_list if not CASES[c].grid]
    head, rest = [], []
    for s, d in (shape_order(args.seqlen_list, args.head_dim_list) if grid else []):
        item = (Shape(args.tokens // s, args.heads, s, d).scaled(args.scale), grid)
        (head if d == 128 and s in (4096, 8192) else rest).append(item)
    mask_items = [(shape.scaled(args.scale), [c]) for c in masks for shape in CASES[c].shapes]
    return head + mask_items + rest


def grid_passes(path_list: list) -> list:
    """Paths in the order they run: every other path over all shapes first, then torch flex, whose
    torch.compile per mod and shape is what a tight budget should cut, not the cuDNN rows."""
    rest = [p for p in PATHS if p in path_list and p != "torch_flex"]
    return ([rest] if rest else []) + ([["torch_flex"]] if "torch_flex" in path_list else [])


def new_result(case: str, path: str, shape: Shape) -> Result:
    return Result(case, path, shape.b, shape.h, shape.s, shape.d, h_kv=shape.h_kv, s_q=shape.s_q)


def recover() -> None:
    """After a failed call: drain the stream and return cached memory, so the next path starts clean."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (a sticky CUDA error: later cells will say so)
        pass
    torch.cuda.empty_cache()


def measure(case: str, path: str, inputs: dict, args, deadline: float) -> Result:
    """One (case, path, shape): first call, then the median of timed calls, per mode."""
    r = new_result(case, path, inputs["shape"])
    backward = CASES[case].backward
    if not backward:
        r.fwd_bwd_error = FORWARD_ONLY
    if deadline and time.perf_counter() > deadline:
        r.fwd_error = SKIPPED
        r.fwd_bwd_error = SKIPPED if backward else FORWARD_ONLY
        return r
    try:
        run = make_runner(case, path, inputs, args)
    except Exception as e:  # noqa: BLE001  (one failing path must not stop the run)
        r.fwd_error = error_text(e)
        if backward:
            r.fwd_bwd_error = r.fwd_error
        return r
    fwd, fwd_bwd = fwd_and_fwd_bwd(run, inputs)
    for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)) if backward else (("fwd", fwd),):
        try:
            first = first_call_s(fn)
            ms = cuda_median_ms(fn, args.warmup, args.iters)
            setattr(r, "first_" + mode + "_s", first)
            setattr(r, mode + "_ms", ms)
        except Exception as e:  # noqa: BLE001
            setattr(r, mode + "_error", error_text(e))
            recover()
    return r


def run_grid(args, deadline: float, log=print) -> ResultSet:
    rs, said_na = ResultSet(), set()
    for paths in grid_passes(args.path_list):
        for shape, names in work_list(args):
            todo = [(c, p) for c in names for p in PATHS if p in paths]
            for c, p in todo:
                reason = na_reason(c, p)
                if reason is not None:   # recorded at every shape, said once
                    r = new_result(c, p, shape)
                    r.fwd_error = r.fwd_bwd_error = NA + reason
                    rs.add(r)
                    if (c, p) not in said_na:
                        said_na.add((c, p))
                        log(f"{c:<12} {p:<16} n/a: {reason}")
            todo = [(c, p) for c, p in todo if na_reason(c, p) is None]
            if not todo:
                continue
            try:
                inputs = make_inputs(shape, names, scale=args.scale)   # seeded: the same every pass
            except Exception as e:  # noqa: BLE001
                log(f"inputs for {shape.label()} failed: {error_text(e)}")
                continue
            for c, p in todo:
                rs.add(measure(c, p, inputs, args, deadline))
                log(log_line(rs.rows[-1]))
            del inputs
            torch.cuda.empty_cache()
    return rs


def _log_cell(r: Result, mode: str) -> str:
    err = r.error(mode)
    return f"{r.ms(mode):8.3f} ms" if err is None and r.ms(mode) is not None else f"[{short_error(err, 100)}]"


def log_line(r: Result) -> str:
    first = (f"  (first call {r.first_fwd_s:.2f} s / {r.first_fwd_bwd_s:.2f} s)"
             if r.first_fwd_s is not None and r.first_fwd_bwd_s is not None else "")
    seq = f"S={seqlen_label(r.s):>3}" if r.s_q is None else f"Sq={r.s_q} Skv={seqlen_label(r.s)}"
    return (f"{seq} D={r.d:<3} B={r.b:<2} {r.case:<12} {r.path:<16} "
            f"fwd {_log_cell(r, 'fwd')}  fwd+bwd {_log_cell(r, 'fwd_bwd')}{first}")


def _packed(inputs: dict) -> dict:
    """inputs (batch 1) as flex_attention_varlen takes them: q, k, v and do [total, H, D], dense,
    made once (a packed call's users hand it packed tensors; a layout change inside the timed call
    would time three copies that are no part of it)."""
    def row(t):
        return t.detach().squeeze(0).transpose(0, 1).contiguous().requires_grad_(t.requires_grad)
    return {**inputs, **{name: row(inputs[name]) for name in ("q", "k", "v", "do")}}


def _host_kinds(inputs: dict) -> dict:
    """label -> (attention(q, k, v), the inputs it takes): one cudnn-flex call of each kind of mod
    issue 15 names; packed calls take packed inputs of their own."""
    import cudnn_flex
    from cudnn_flex import dsl_mods, mods
    cap, torch_cap = dsl_mods.softcap(SOFTCAP), mods.softcap(SOFTCAP)
    s, device = inputs["q"].shape[2], inputs["q"].device
    cu = torch.tensor([0, s // 3, s], dtype=torch.int32, device=device)  # two sequences: ragged
    packed = _packed(inputs)
    alibi = mods.alibi(mods.alibi_slopes(inputs["q"].shape[1]).to(device))  # torch-style closures over tensors
    document = mods.document_mask((torch.arange(s, device=device) // max(s // 4, 1)).to(torch.int32))
    slopes = {"slopes": mods.alibi_slopes(inputs["q"].shape[1]).view(1, -1, 1, 1).to(device)}
    lengths = torch.full((inputs["q"].shape[0],), max(s - 3, 1), dtype=torch.int32, device=device)
    kinds = {
        "cudnn_flex no mod": lambda q, k, v: cudnn_flex.flex_attention(q, k, v),
        "cudnn_flex keyed DSL softcap": lambda q, k, v: cudnn_flex.flex_attention(q, k, v, cap.forward, cap.backward),
        "cudnn_flex torch-style softcap": lambda q, k, v: cudnn_flex.flex_attention(q, k, v, torch_cap),
        "cudnn_flex mask_mod causal": lambda q, k, v: cudnn_flex.flex_attention(q, k, v, mask_mod=mods.causal),
        "cudnn_flex torch-style alibi (captured slopes)": lambda q, k, v: cudnn_flex.flex_attention(q, k, v, alibi),
        "cudnn_flex document mask (captured ids)": lambda q, k, v: cudnn_flex.flex_attention(q, k, v,
                                                                                            mask_mod=document),
        "cudnn_flex DSL alibi (score_mod_tensors)": lambda q, k, v: cudnn_flex.flex_attention(
            q, k, v, dsl_mods.alibi, score_mod_tensors=slopes),
        "cudnn_flex padded keys (seq_lens_kv)": lambda q, k, v: cudnn_flex.flex_attention(q, k, v,
                                                                                         seq_lens_kv=lengths),
    }
    varlen = {
        "cudnn_flex varlen causal": lambda q, k, v: cudnn_flex.flex_attention_varlen(
            q, k, v, cu, cu, mask_mod=mods.causal, max_seqlen_q=s, max_seqlen_kv=s),
        "cudnn_flex varlen alibi (captured slopes)": lambda q, k, v: cudnn_flex.flex_attention_varlen(
            q, k, v, cu, cu, alibi, max_seqlen_q=s, max_seqlen_kv=s),
    }
    return {**{label: (run, inputs) for label, run in kinds.items()},
            **{label: (run, packed) for label, run in varlen.items()}}


def measure_host(args, log=print) -> dict:
    """Host us per cached call at a tiny shape: the causal and softcap score_mods on this library
    and the frontend path, each kind of mod on this library (issue 15), and torch SDPA (cuDNN,
    is_causal) as the reference point."""
    inputs = make_inputs(HOST_SHAPE)
    out = {}
    kinds = _host_kinds(inputs) if "cudnn_flex" in args.path_list else {}
    anchor = sdpa.call("causal", inputs) if "sdpa_cudnn" in args.path_list else None
    for label, case, path in (("cudnn_flex", "causal", "cudnn_flex"), ("frontend", "causal", "frontend"),
                              ("sdpa_cudnn", "causal", "sdpa_cudnn"),
                              ("cudnn_flex softcap", "softcap", "cudnn_flex"),
                              ("frontend softcap", "softcap", "frontend"),
                              *((name, None, "cudnn_flex") for name in kinds)):
        if path not in args.path_list:
            continue
        try:
            # A new context per loop (sdpa_kernel's can be entered once).
            if path == "sdpa_cudnn":
                # The backend is chosen once, around the loops: torch's sdpa_kernel context manager
                # is no part of an SDPA call's host time (held per call, it flattered every ratio
                # against SDPA).
                run, own, context = sdpa.call(case, inputs), inputs, lambda: sdpa.backend(flash=False)
            else:
                run, own = kinds[label] if case is None else (make_runner(case, path, inputs, args), inputs)
                context = contextlib.nullcontext
            if anchor is not None and label.startswith("cudnn_flex"):
                out[label] = _paired_with_sdpa(run, own, anchor, inputs, args.host_calls)
                log(f"host {label:<20} {out[label]}")
                continue
            qkv = (own["q"], own["k"], own["v"])  # a packed call's own packed inputs
            with context(), torch.no_grad():   # around the loop, so that its cost is not counted per call
                fwd_us = host_us(lambda: run(*qkv), args.host_calls)
            with context():
                fwd_bwd_us = host_us(lambda: torch.autograd.grad(run(*qkv), qkv, own["do"]),
                                     max(args.host_calls // 3, 1))
            out[label] = {"fwd": fwd_us, "fwd_bwd": fwd_bwd_us}
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": error_text(e)}
            recover()
        log(f"host {label:<20} {out[label]}")
    return out


def _paired_with_sdpa(run: Callable, own: dict, anchor: Callable, inputs: dict, calls: int) -> dict:
    """A cudnn-flex call's host us per call (on its own inputs), forward and forward+backward,
    each timed in rounds alternating with SDPA's (on `inputs`; timing.host_us_paired): {"fwd",
    "fwd_bwd", "vs_sdpa": {mode: its median ratio to SDPA's}}. The ratio is the issue's figure;
    the us are this run's host."""
    def forward(attend, x):
        return lambda: attend(x["q"], x["k"], x["v"])

    def step(attend, x):
        qkv = (x["q"], x["k"], x["v"])
        return lambda: torch.autograd.grad(attend(*qkv), qkv, x["do"])

    with sdpa.backend(flash=False), torch.no_grad():  # SDPA's backend chosen once, around the loops
        fwd_us, _, fwd_ratio = host_us_paired(forward(run, own), forward(anchor, inputs), calls)
    with sdpa.backend(flash=False):
        fwd_bwd_us, _, fwd_bwd_ratio = host_us_paired(step(run, own), step(anchor, inputs), max(calls // 3, 1))
    return {"fwd": fwd_us, "fwd_bwd": fwd_bwd_us, "vs_sdpa": {"fwd": fwd_ratio, "fwd_bwd": fwd_bwd_ratio}}


def measure_cold(args, log=print) -> dict:
    """First forward and first backward call of score_mods the cache has never seen: the first
    one's structure is new to the process (cuDNN compiles its kernels); the second has the same
    structure under a new key (the cache misses; cuDNN may reuse its compiled kernels)."""
    import cudnn_flex
    from .paths.ours import ColdMod
    inputs = make_inputs(Shape(1, args.heads, 1024, 128))
    q, k, v, do = inputs["q"], inputs["k"], inputs["v"], inputs["do"]
    out = {}
    for label, mod in (("new score_mod structure", ColdMod(0.013)),
                       ("same structure, new cache key", ColdMod(0.017))):
        try:
            before = cudnn_flex.cache_stats()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = cudnn_flex.flex_attention(q, k, v, mod)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            torch.autograd.grad(o, (q, k, v), do)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            after = cudnn_flex.cache_stats()
            out[label] = {"fwd_s": t1 - t0, "bwd_s": t2 - t1,
                          "builds": after.get("builds", 0) - before.get("builds", 0)}
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": error_text(e)}
            recover()
        log(f"cold {label}: {out[label]}")
    return out


def warm_up(args, log) -> None:
    """Loads the CUDA context, cuBLAS and cuDNN before anything is timed."""
    warm = make_inputs(Shape(1, args.heads, 1024, 128))
    try:
        with torch.no_grad():
            make_runner("nomod", "sdpa_cudnn", warm, args)(warm["q"], warm["k"], warm["v"])
    except Exception as e:  # noqa: BLE001  (its own row will show the error)
        log(f"warm-up with torch SDPA (cuDNN) failed: {error_text(e)}")
    recover()


def guarded(measurement: Callable, label: str, args, log) -> dict:
    """A whole side measurement that failed becomes one error entry, and the run goes on."""
    try:
        return measurement(args, log)
    except Exception as e:  # noqa: BLE001
        log(f"{label} failed: {error_text(e)}")
        recover()
        return {label: {"error": error_text(e)}}
