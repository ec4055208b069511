"""The run as markdown (benchmarks.md) and as the short summary printed last: tables of GPU time,
the mask cases against cudnn-flex, host time, cold builds, what each path cannot express."""

from __future__ import annotations

from typing import Optional

from .cases import CASE_NAMES, CASES, GRID_CASES, MASK_CASES, seqlen_label
from .paths import PATH_LABELS, PATHS
from .results import MODE_LABELS, MODES, NA, Result, ResultSet, short_error


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}x"


def time_cell(r: Result, mode: str) -> str:
    status = r.status(mode)
    if status == "ok":
        return fmt(r.ms(mode))
    if status in ("n/a", "skipped"):
        return status
    return "error: " + short_error(r.error(mode), 40).replace("|", "/")


def _row_order(r: Result) -> tuple:
    return (CASE_NAMES.index(r.case) if r.case in CASE_NAMES else len(CASE_NAMES), r.s, r.b,
            PATHS.index(r.path) if r.path in PATHS else len(PATHS))


def gpu_table(rs: ResultSet) -> list:
    """Markdown lines of the grid's GPU-time table, one row per (shape, case, path) it ran."""
    head = ("| S | D | B | case | path | fwd ms | fwd TFLOP/s | fwd / sdpa | fwd / fe | fwd+bwd ms "
            "| fwd+bwd TFLOP/s | f+b / sdpa | f+b / fe | first call s (fwd, f+b) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    rows = [r for r in rs.rows if r.case in GRID_CASES and r.status("fwd") != "n/a"]
    for r in sorted(rows, key=lambda r: (-r.d, r.s) + _row_order(r)):
        cells = [seqlen_label(r.s), str(r.d), str(r.b), r.case, r.path]
        for mode in MODES:
            base = rs.ratio((r.case, r.path), ("nomod", "sdpa_cudnn"), r.s, r.d, mode)
            vs_fe = rs.ratio((r.case, r.path), (r.case, "frontend"), r.s, r.d, mode)
            cells += [time_cell(r, mode), fmt(r.tflops(mode), 0), fmt_ratio(base), fmt_ratio(vs_fe)]
        cells.append(f"{fmt(r.first_fwd_s, 2)}, {fmt(r.first_fwd_bwd_s, 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def shape_label(r: Result) -> str:
    heads = f"H={r.h}" + (f"/{r.h_kv}" if r.h_kv else "")
    seq = f"Sq={r.s_q} Skv={seqlen_label(r.s)}" if r.s_q else f"S={seqlen_label(r.s)}"
    return f"B={r.b} {heads} {seq} D={r.d}"


def mask_table(rs: ResultSet) -> list:
    """Markdown lines of the mask cases: every path's time, n/a included, and time / cudnn-flex's."""
    head = "| case | shape | path | fwd ms | fwd / ours | fwd+bwd ms | f+b / ours | first call s (fwd, f+b) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted((r for r in rs.rows if r.case in MASK_CASES), key=_row_order):
        cells = [r.case, shape_label(r), r.path]
        for mode in MODES:
            vs_ours = rs.ratio((r.case, r.path), (r.case, "cudnn_flex"), r.s, r.d, mode)
            cells += [time_cell(r, mode), fmt_ratio(vs_ours)]
        cells.append(f"{fmt(r.first_fwd_s, 2)}, {fmt(r.first_fwd_bwd_s, 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def not_expressible(rs: ResultSet) -> list:
    """"- case / path: reason", once per (case, path) whatever the shapes."""
    seen = {}
    for r in sorted(rs.rows, key=_row_order):
        if r.status("fwd") == "n/a":
            seen.setdefault((r.case, r.path), r.fwd_error[len(NA):])
        elif r.status("fwd_bwd") == "n/a":   # a forward-only case: one line for all its paths
            seen.setdefault((r.case, "fwd+bwd on every path"), r.fwd_bwd_error[len(NA):])
    return [f"- {case} / {path}: {reason}" for (case, path), reason in seen.items()]


def host_table(host: dict) -> list:
    if not host:
        return ["(not measured)"]
    # x SDPA: the ratio to SDPA's host time, timed in rounds alternating with it (runner's
    # _paired_with_sdpa), which a busy host moves less than the us.
    lines = ["| path | fwd us/call | fwd+bwd us/call | fwd x SDPA | fwd+bwd x SDPA |", "|---|---|---|---|---|"]
    for name, v in host.items():
        if v.get("error"):
            error = "error: " + short_error(v["error"]).replace("|", "/")
            lines.append(f"| {name} | {error} | {error} | – | – |")
        else:
            paired = v.get("vs_sdpa") or {}
            lines.append(f"| {name} | {fmt(v.get('fwd'), 1)} | {fmt(v.get('fwd_bwd'), 1)} | "
                         f"{fmt_ratio(paired.get('fwd'))} | {fmt_ratio(paired.get('fwd_bwd'))} |")
    return lines


def cold_lines(cold: dict) -> list:
    if not cold:
        return ["(not measured)"]
    lines = []
    for label, v in cold.items():
        if v.get("error"):
            lines.append(f"- {label}: error: {short_error(v['error'], 200)}")
        else:
            where = (f"plans loaded {v['plan_loads']}, stored {v['plan_stores']}" if "plan_loads" in v
                     else f"cache builds +{v.get('builds', '?')}")
            same = {True: "; bitwise the result of the process that built them",
                    False: "; NOT the result of the process that built them"}.get(v.get("same_bits"), "")
            lines.append(f"- {label}: forward graph {fmt(v.get('fwd_s'), 3)} s, backward graph "
                         f"{fmt(v.get('bwd_s'), 3)} s (first call, synchronized; {where}{same})")
    return lines


def first_call_totals(rs: ResultSet) -> dict:
    """Seconds spent in first (building / compiling) calls per path: where the run's time went."""
    totals: dict = {}
    for r in rs.rows:
        spent = (r.first_fwd_s or 0.0) + (r.first_fwd_bwd_s or 0.0)
        if spent:
            totals[r.path] = totals.get(r.path, 0.0) + spent
    return totals


def _header(rs: ResultSet, meta: dict) -> list:
    return [
        f"- device: {meta.get('device', '?')}",
        f"- versions: {meta.get('versions', '?')}",
        f"- command: `{meta.get('command', '?')}`",
        f"- wall time of the run: {fmt(meta.get('wall_s'), 0)} s"
        + (f" (budget {meta['budget_s']:.0f} s; {meta['skipped']} measurements skipped for it)"
           if meta.get("budget_s") else ""),
        f"- shapes: bf16, B*S = {meta.get('tokens', '?')} tokens, H = {meta.get('heads', '?')}, "
        f"S in {meta.get('seqlens', '?')}, D in {meta.get('head_dims', '?')}; q, k, v shared by all paths; "
        "mask cases at the shapes of their table"
        + (f"; every length divided by {meta['scale']} (--scale)" if meta.get("scale", 1) > 1 else ""),
        f"- timing: median of {meta.get('iters', '?')} back-to-back CUDA-event timings after "
        f"{meta.get('warmup', '?')} warm-up calls (and the first, building call); forward under "
        "no_grad, forward+backward as out = f(q, k, v); autograd.grad(out, (q, k, v), dO)",
        "- TFLOP/s: dense convention, 4*B*H*Sq*Skv*D forward and 3.5x that forward+backward; masked "
        "cases (causal, windows, documents, padding) are counted dense too (dense-equivalent TFLOP/s)",
        f"- torch flex: {meta.get('torch_flex', '?')}",
        "- first calls (graph builds, torch.compile), seconds summed per path: "
        + (", ".join(f"{p} {t:.1f}" for p, t in first_call_totals(rs).items()) or "–"),
        "- frontend path: cudnn.pygraph + sdpa / sdpa_backward with score_mod (and score_mod_bprop), "
        "graphs built once per (shape, strides, dtypes, mod) and kept in a Python dict, run by an "
        "autograd.Function; score_mod tensors described as given (size-1 broadcast dims)",
        "- ratios: `/ sdpa` = time / torch SDPA cuDNN no mask at that shape; `/ fe` = time / the "
        "frontend path's time for the same case and shape; `/ ours` = time / cudnn-flex's time "
        "(lower is faster)",
    ]


def markdown(rs: ResultSet, meta: dict, host: dict, cold: dict, figures: list, plots: list) -> str:
    """plots: file names of the written plots, beside the markdown (none when skipped)."""
    out = ["# cudnn-flex benchmarks", ""] + _header(rs, meta) + [""]
    out += ["## Figures (issue 5)", ""] + [f"- {f.line()}" for f in figures] + [""]
    out += ["## Host time per cached call", "",
            f"Shape {meta.get('host_shape', '?')}; time for the Python call to return (launches are "
            "asynchronous), median over repeats of a loop of cached calls.", ""]
    out += host_table(host) + [""]
    out += ["## Cold build of a new score_mod (cudnn-flex)", ""] + cold_lines(cold) + [""]
    if meta.get("frontend_plans"):
        out += ["## Plans the frontend path chose", ""]
        out += [f"- {k}: {'; '.join(v)}" for k, v in meta["frontend_plans"].items()] + [""]
    if meta.get("cudnn_flex_cache"):
        out += [f"cudnn-flex graph cache at the end: {meta['cudnn_flex_cache']}", ""]
    out += ["## GPU time", ""]
    out += [f"![benchmarks]({name})" for name in plots] or [f"(no plot: {meta.get('plot', 'not made')})"]
    out += [""] + gpu_table(rs) + [""]
    if any(r.case in MASK_CASES for r in rs.rows):
        out += ["## Mask cases", "", "Each case at its own shapes; `n/a`: the path cannot express it "
                "(reasons below).", ""] + mask_table(rs) + [""]
    na = not_expressible(rs)
    if na:
        out += ["## Not expressible (n/a)", ""] + na + [""]
    errors = [(r, m) for r in rs.rows for m in MODES if r.status(m) == "error"]
    if errors:
        out += ["## Errors", ""]
        out += [f"- {r.case} / {r.path} / {shape_label(r)} / {MODE_LABELS[m]}: "
                f"{short_error(r.error(m), 400)}" for r, m in errors]
        out += [""]
    out += ["Paths: " + "; ".join(f"`{k}` {v}" for k, v in PATH_LABELS.items()),
            "", "Cases: " + "; ".join(f"`{k}` {c.label}" for k, c in CASES.items()), ""]
    return "\n".join(out)


def _mask_summary(rs: ResultSet) -> list:
    lines = []
    for case in MASK_CASES:
        mode = "fwd_bwd" if CASES[case].backward else "fwd"
        for r in sorted((r for r in rs.rows if r.case == case and r.path == "cudnn_flex"), key=_row_order):
            others = []
            for p in PATHS:
                o = rs.get(case, p, r.s, r.d)
                if p == "cudnn_flex" or o is None or o.status(mode) == "n/a":
                    continue
                ratio = rs.ratio((case, p), (case, "cudnn_flex"), r.s, r.d, mode)
                others.append(f"{p} {fmt_ratio(ratio) if ratio is not None else o.status(mode)}")
            lines.append(f"{case:<12} {shape_label(r):<30} {MODE_LABELS[mode]:<7} "
                         f"{time_cell(r, mode):>8}  " + ", ".join(others))
    return (["== mask cases: cudnn-flex ms, other paths as time / ours =="] + lines) if lines else []


def summary(rs: ResultSet, host: dict, figures: list, d: int = 128) -> str:
    """The short table printed last: grid fwd+bwd ms per case at head dim d (else the largest
    measured), ratios, the mask cases, then the figures."""
    head_dims = sorted({dd for _, dd in rs.shapes(GRID_CASES)}, reverse=True)
    if head_dims and d not in head_dims:
        d = head_dims[0]
    lines = [f"== summary: fwd+bwd ms at D={d} (ours / frontend; torch flex / ours) =="]
    seqs = sorted({s for s, dd in rs.shapes(GRID_CASES) if dd == d})
    lines.append(f"{'case':<9}" + "".join(f"{seqlen_label(s):>24}" for s in seqs))
    for case in GRID_CASES:
        cells = []
        for s in seqs:
            ours = rs.ms(case, "cudnn_flex", s, d, "fwd_bwd")
            fe = rs.ratio((case, "cudnn_flex"), (case, "frontend"), s, d, "fwd_bwd")
            tf = rs.ratio((case, "torch_flex"), (case, "cudnn_flex"), s, d, "fwd_bwd")
            cells.append(f"{fmt(ours, 2)} ({fmt(fe, 2)}; {fmt(tf, 2)})")
        if any(c != "– (–; –)" for c in cells):
            lines.append(f"{case:<9}" + "".join(f"{c:>24}" for c in cells))
    lines += _mask_summary(rs)
    if host.get("cudnn_flex"):
        lines.append("host us/call fwd: " + ", ".join(f"{k} {fmt(v.get('fwd'), 1)}" for k, v in host.items()))
    lines += [f.line() for f in figures]
    return "\n".join(lines)
