"""cudnn-flex against what a user would pick instead, in one run, on the same inputs (issue 5).

Paths, all on the same q, k, v in one process:
  cudnn_flex       this library: cudnn_flex.flex_attention with DSL score_mods (mods.py style)
  sdpa_cudnn       torch F.scaled_dot_product_attention, cuDNN backend (no mask / is_causal)
  sdpa_flash       torch F.scaled_dot_product_attention, flash backend (no mask / is_causal)
  torch_flex       torch flex_attention under torch.compile, torch-style score_mods and BlockMasks
  frontend         the cuDNN frontend Python graph path of the reference PR: cudnn.pygraph +
                   sdpa(score_mod=) / sdpa_backward(score_mod=, score_mod_bprop=), a dict cache
                   of built graphs keyed by shape + mod, and an autograd.Function around them
  frontend_native  the same, causal as the native diagonal band instead of a score_mod

Cases: nomod, causal, softcap (cap 30, exact bprop), alibi (slopes tensor), relbias
((q_idx - kv_idx) * c), docmask (document ids tensor, 4 equal documents per sequence).
bf16, B*S fixed (16k tokens), H=16, D in {64, 128}; forward (no_grad) and forward+backward;
median of CUDA-event timings after warm-up. Plus host time per cached call at a tiny shape and the
cold time to build a new score_mod's forward and backward graphs.

Run from the repo root on the GPU machine (extension built in place):
  PYTHONPATH=$PWD/python python3 benchmarks/bench.py --out $OUT
Writes <out>/benchmarks.md, <out>/benchmarks.png and <out>/benchmarks.json; prints a short
summary last. Order: cold build, host time, then every path but torch flex over all shapes, then
torch flex (its torch.compile per mod and shape is the slow part); within each pass the issue's
headline shapes (S in {4k, 8k}, D=128) first. Work still pending when --budget-s runs out is
skipped and marked so, never cut in the middle of a measurement. --quick: S in {4k, 8k}, D=128.

Everything above the "GPU side" marker is plain Python (flop counting, tables, figures, PNG) and is
tested on the CPU by tests/python/test_bench_helpers.py; cudnn_flex and cudnn are imported lazily.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import struct
import sys
import time
import uuid
import zlib
from typing import Callable, Optional

import torch

_T0 = time.perf_counter()   # the run's budget counts from here (after importing torch)

CASES = ("nomod", "causal", "softcap", "alibi", "relbias", "docmask")
PATHS = ("cudnn_flex", "frontend", "frontend_native", "sdpa_cudnn", "sdpa_flash", "torch_flex")
# Which paths can express which case. SDPA has no score_mod (only no mask / is_causal); the
# frontend's native causal is the diagonal band, so it only has a causal row.
CASE_PATHS = {
    "nomod": ("cudnn_flex", "frontend", "sdpa_cudnn", "sdpa_flash", "torch_flex"),
    "causal": ("cudnn_flex", "frontend", "frontend_native", "sdpa_cudnn", "sdpa_flash", "torch_flex"),
    "softcap": ("cudnn_flex", "frontend", "torch_flex"),
    "alibi": ("cudnn_flex", "frontend", "torch_flex"),
    "relbias": ("cudnn_flex", "frontend", "torch_flex"),
    "docmask": ("cudnn_flex", "frontend", "torch_flex"),
}
PATH_LABELS = {
    "cudnn_flex": "cudnn-flex (this library)",
    "frontend": "cuDNN frontend Python graph (reference PR path)",
    "frontend_native": "cuDNN frontend Python graph, native causal (diagonal band)",
    "sdpa_cudnn": "torch SDPA, cuDNN backend",
    "sdpa_flash": "torch SDPA, flash backend",
    "torch_flex": "torch flex_attention under torch.compile",
}
CASE_LABELS = {
    "nomod": "no score_mod",
    "causal": "causal (score_mod; native for SDPA / frontend_native, BlockMask for torch flex)",
    "softcap": "softcap 30 (tanh, with bprop)",
    "alibi": "ALiBi (slopes tensor [1,H,1,1])",
    "relbias": "relative bias (q_idx - kv_idx) * 0.01",
    "docmask": "document mask (ids tensor, 4 equal docs per sequence; BlockMask for torch flex)",
}
SOFTCAP = 30.0
REL_C = 0.01
DOCS_PER_SEQ = 4

# Issue 5's goals.
GOAL_OURS_VS_FRONTEND = 1.03        # GPU time within 3% of the frontend Python path
GOAL_SPEEDUP_VS_TORCH_FLEX = {"softcap": 2.0, "alibi": 1.3, "relbias": 1.3}  # fwd+bwd, S >= 4k
GOAL_CAUSAL_MOD_VS_NATIVE = 1.10    # causal by score_mod within 10% of native causal
GOAL_HOST_US = 15.0                 # host time per cached forward call
GOAL_HOST_FRACTION_OF_FRONTEND = 1.0 / 3.0

# RGB per path: used by both plotters, and listed in the markdown (the fallback PNG has no text).
PALETTE = {
    "cudnn_flex": (214, 39, 40),
    "frontend": (31, 119, 180),
    "frontend_native": (23, 190, 207),
    "sdpa_cudnn": (44, 160, 44),
    "sdpa_flash": (148, 103, 189),
    "torch_flex": (255, 127, 14),
}


# ----------------------------------------------------------------------------------------------
# Plain helpers (no GPU): flops, results, ratios, figures, markdown, PNG.
# ----------------------------------------------------------------------------------------------

def parse_seqlen(text: str) -> int:
    """'4k' -> 4096, '512' -> 512."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def seqlen_label(s: int) -> str:
    return f"{s // 1024}k" if s % 1024 == 0 else str(s)


def attn_flops(b: int, h: int, s_q: int, s_kv: int, d: int, backward: bool = False) -> float:
    """Dense attention flops: two matmuls of 2*S_q*S_kv*D each per head forward (QK^T, PV).

    The backward has five such matmuls (recomputed QK^T, dV, dP, dQ, dK): 2.5x the forward, so
    forward+backward is 3.5x. Masked cases (causal, document) are counted dense as well, so their
    TFLOP/s is "dense-equivalent": it compares times, not work done.
    """
    fwd = 4.0 * b * h * s_q * s_kv * d
    return fwd * 3.5 if backward else fwd


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


@dataclasses.dataclass
class Result:
    """One (case, path, shape) measurement. ms are medians; an error or a skip leaves ms None."""
    case: str
    path: str
    b: int
    h: int
    s: int
    d: int
    fwd_ms: Optional[float] = None
    fwd_bwd_ms: Optional[float] = None
    fwd_error: Optional[str] = None
    fwd_bwd_error: Optional[str] = None
    first_fwd_s: Optional[float] = None       # first call: graph build / torch.compile included
    first_fwd_bwd_s: Optional[float] = None

    def ms(self, mode: str) -> Optional[float]:
        return self.fwd_ms if mode == "fwd" else self.fwd_bwd_ms

    def error(self, mode: str) -> Optional[str]:
        return self.fwd_error if mode == "fwd" else self.fwd_bwd_error

    def tflops(self, mode: str) -> Optional[float]:
        flops = attn_flops(self.b, self.h, self.s, self.s, self.d, backward=(mode == "fwd_bwd"))
        return tflops(flops, self.ms(mode))


MODES = ("fwd", "fwd_bwd")
MODE_LABELS = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}


class ResultSet:
    """Results indexed by (case, path, s, d), with the ratios the tables and figures need."""

    def __init__(self, results=()):
        self.rows: list[Result] = []
        self._by_key: dict = {}
        for r in results:
            self.add(r)

    def add(self, r: Result) -> None:
        self.rows.append(r)
        self._by_key[(r.case, r.path, r.s, r.d)] = r

    def get(self, case: str, path: str, s: int, d: int) -> Optional[Result]:
        return self._by_key.get((case, path, s, d))

    def ms(self, case: str, path: str, s: int, d: int, mode: str) -> Optional[float]:
        r = self.get(case, path, s, d)
        return r.ms(mode) if r else None

    def ratio(self, num: tuple, den: tuple, s: int, d: int, mode: str) -> Optional[float]:
        """time(num case, num path) / time(den case, den path) at one shape, or None."""
        a, b = self.ms(*num, s, d, mode), self.ms(*den, s, d, mode)
        return a / b if a is not None and b else None

    def shapes(self) -> list:
        """(s, d) pairs present, D descending then S ascending (the table order)."""
        return sorted({(r.s, r.d) for r in self.rows}, key=lambda sd: (-sd[1], sd[0]))


def fmt(x: Optional[float], digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}x"


def short_error(msg: str, limit: int = 60) -> str:
    one_line = " ".join(str(msg).split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1] + "…"


def _time_cell(r: Result, mode: str) -> str:
    err = r.error(mode)
    if err is not None:
        return "skipped" if err.startswith("skipped") else "error: " + short_error(err, 40).replace("|", "/")
    return fmt(r.ms(mode))


# ---- Figures of issue 5 -----------------------------------------------------------------------

@dataclasses.dataclass
class Figure:
    """One line of the issue's "figures reached" list."""
    name: str
    text: str
    met: Optional[bool]   # None: not measured

    def line(self) -> str:
        mark = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{self.name}: {self.text} [{mark}]"


def _extreme(pairs: list, worst_is_max: bool):
    """(value, (s, d)) with the worst value, from [(value, (s, d))] ignoring None values."""
    pairs = [p for p in pairs if p[0] is not None]
    if not pairs:
        return None
    return max(pairs, key=lambda p: p[0]) if worst_is_max else min(pairs, key=lambda p: p[0])


def _where(sd) -> str:
    return f"S={seqlen_label(sd[0])} D={sd[1]}"


def figure_ours_vs_frontend(rs: ResultSet, cases=CASES) -> list:
    """Per case: worst ours/frontend GPU-time ratio over shapes, fwd and fwd+bwd (goal <= 1.03)."""
    figures = []
    for case in cases:
        parts, met = [], None
        for mode in MODES:
            ratios = [(rs.ratio((case, "cudnn_flex"), (case, "frontend"), s, d, mode), (s, d))
                      for s, d in rs.shapes()]
            worst = _extreme(ratios, worst_is_max=True)
            if worst is None:
                parts.append(f"{MODE_LABELS[mode]} –")
                continue
            values = [v for v, _ in ratios if v is not None]
            ok = worst[0] <= GOAL_OURS_VS_FRONTEND
            met = ok if met is None else (met and ok)
            parts.append(f"{MODE_LABELS[mode]} {min(values):.3f}-{worst[0]:.3f} (worst at {_where(worst[1])}"
                         + ("" if ok else f", {100 * (worst[0] - GOAL_OURS_VS_FRONTEND):.1f}% over the goal")
                         + ")")
        figures.append(Figure(f"ours/frontend GPU time, {case}",
                              "; ".join(parts) + f"; goal <= {GOAL_OURS_VS_FRONTEND:.2f}", met))
    return figures


def figure_speedup_vs_torch_flex(rs: ResultSet, min_s: int = 4096) -> list:
    """fwd+bwd time of compiled torch flex / ours at S >= 4k, worst (smallest) over shapes."""
    figures = []
    for case, goal in GOAL_SPEEDUP_VS_TORCH_FLEX.items():
        speedups = [(rs.ratio((case, "torch_flex"), (case, "cudnn_flex"), s, d, "fwd_bwd"), (s, d))
                    for s, d in rs.shapes() if s >= min_s]
        worst = _extreme(speedups, worst_is_max=False)
        if worst is None:
            figures.append(Figure(f"fwd+bwd speedup over compiled torch flex, {case}",
                                  f"not measured at S>={seqlen_label(min_s)}; goal >= {goal:.1f}x", None))
            continue
        best = max(v for v, _ in speedups if v is not None)
        ok = worst[0] >= goal
        text = (f"{worst[0]:.2f}x-{best:.2f}x at S>={seqlen_label(min_s)} (worst at {_where(worst[1])})"
                + ("" if ok else f", short of {goal:.1f}x by {100 * (1 - worst[0] / goal):.0f}%")
                + f"; goal >= {goal:.1f}x")
        figures.append(Figure(f"fwd+bwd speedup over compiled torch flex, {case}", text, ok))
    return figures


def figure_causal_mod_vs_native(rs: ResultSet) -> list:
    """Causal by score_mod (ours) / native causal (torch SDPA cuDNN), worst over shapes; the
    frontend's own score_mod-vs-native ratio is given alongside, as the same kernels' baseline."""
    parts, met = [], None
    for mode in MODES:
        ratios = [(rs.ratio(("causal", "cudnn_flex"), ("causal", "sdpa_cudnn"), s, d, mode), (s, d))
                  for s, d in rs.shapes()]
        worst = _extreme(ratios, worst_is_max=True)
        fe = _extreme([(rs.ratio(("causal", "frontend"), ("causal", "frontend_native"), s, d, mode), (s, d))
                       for s, d in rs.shapes()], worst_is_max=True)
        if worst is None:
            parts.append(f"{MODE_LABELS[mode]} –")
            continue
        ok = worst[0] <= GOAL_CAUSAL_MOD_VS_NATIVE
        met = ok if met is None else (met and ok)
        parts.append(f"{MODE_LABELS[mode]} worst {worst[0]:.3f} at {_where(worst[1])}"
                     + ("" if ok else f" ({100 * (worst[0] - GOAL_CAUSAL_MOD_VS_NATIVE):.1f}% over)")
                     + (f" (frontend score_mod/native worst {fe[0]:.3f})" if fe else ""))
    return [Figure("causal by score_mod (ours) / native causal (SDPA cuDNN)",
                   "; ".join(parts) + f"; goal <= {GOAL_CAUSAL_MOD_VS_NATIVE:.2f}", met)]


def figure_host(host: dict) -> list:
    """host: {path: {"fwd": us, "fwd_bwd": us}} for the cached-call measurement."""
    ours = (host.get("cudnn_flex") or {}).get("fwd")
    fe = (host.get("frontend") or {}).get("fwd")
    if ours is None:
        return [Figure("host time per cached forward call", "not measured", None)]
    parts = [f"cudnn-flex {ours:.1f} us vs goal {GOAL_HOST_US:.0f} us"]
    met = ours <= GOAL_HOST_US
    if not met:
        parts.append(f"{ours - GOAL_HOST_US:.1f} us over")
    if fe is not None:
        limit = fe * GOAL_HOST_FRACTION_OF_FRONTEND
        parts.append(f"frontend path {fe:.1f} us (a third: {limit:.1f} us; ours is {ours / fe:.2f} of it)")
        met = met and ours <= limit
    return [Figure("host time per cached forward call", "; ".join(parts), met)]


def all_figures(rs: ResultSet, host: dict) -> list:
    return (figure_ours_vs_frontend(rs) + figure_speedup_vs_torch_flex(rs)
            + figure_causal_mod_vs_native(rs) + figure_host(host))


# ---- Markdown ---------------------------------------------------------------------------------

def gpu_table(rs: ResultSet) -> list:
    """Markdown lines of the full GPU-time table, one row per (shape, case, path)."""
    head = ("| S | D | B | case | path | fwd ms | fwd TFLOP/s | fwd / sdpa | fwd / fe | fwd+bwd ms "
            "| fwd+bwd TFLOP/s | f+b / sdpa | f+b / fe | first call s (fwd, f+b) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = {p: i for i, p in enumerate(PATHS)}
    rows = sorted(rs.rows, key=lambda r: (-r.d, r.s, CASES.index(r.case), order[r.path]))
    for r in rows:
        cells = [seqlen_label(r.s), str(r.d), str(r.b), r.case, r.path]
        for mode in MODES:
            base = rs.ratio((r.case, r.path), ("nomod", "sdpa_cudnn"), r.s, r.d, mode)
            vs_fe = rs.ratio((r.case, r.path), (r.case, "frontend"), r.s, r.d, mode)
            cells += [_time_cell(r, mode), fmt(r.tflops(mode), 0), fmt_ratio(base), fmt_ratio(vs_fe)]
        cells.append(f"{fmt(r.first_fwd_s, 2)}, {fmt(r.first_fwd_bwd_s, 2)}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def host_table(host: dict) -> list:
    if not host:
        return ["(not measured)"]
    lines = ["| path | fwd us/call | fwd+bwd us/call |", "|---|---|---|"]
    for name, v in host.items():
        if v.get("error"):
            error = "error: " + short_error(v["error"]).replace("|", "/")
            lines.append(f"| {name} | {error} | {error} |")
        else:
            lines.append(f"| {name} | {fmt(v.get('fwd'), 1)} | {fmt(v.get('fwd_bwd'), 1)} |")
    return lines


def cold_lines(cold: dict) -> list:
    if not cold:
        return ["(not measured)"]
    lines = []
    for label, v in cold.items():
        if v.get("error"):
            lines.append(f"- {label}: error: {short_error(v['error'], 200)}")
        else:
            lines.append(f"- {label}: forward graph {fmt(v.get('fwd_s'), 3)} s, backward graph "
                         f"{fmt(v.get('bwd_s'), 3)} s (first call, synchronized; cache "
                         f"builds +{v.get('builds', '?')})")
    return lines


def first_call_totals(rs: ResultSet) -> dict:
    """Seconds spent in first (building / compiling) calls per path: where the run's time went."""
    totals: dict = {}
    for r in rs.rows:
        spent = (r.first_fwd_s or 0.0) + (r.first_fwd_bwd_s or 0.0)
        if spent:
            totals[r.path] = totals.get(r.path, 0.0) + spent
    return totals


def markdown(rs: ResultSet, meta: dict, host: dict, cold: dict, figures: list, png_name: str) -> str:
    out = ["# cudnn-flex benchmarks", ""]
    out += [f"- device: {meta.get('device', '?')}",
            f"- versions: {meta.get('versions', '?')}",
            f"- command: `{meta.get('command', '?')}`",
            f"- wall time of the run: {fmt(meta.get('wall_s'), 0)} s"
            + (f" (budget {meta['budget_s']:.0f} s; {meta['skipped']} measurements skipped for it)"
               if meta.get("budget_s") else ""),
            f"- shapes: bf16, B*S = {meta.get('tokens', '?')} tokens, H = {meta.get('heads', '?')}, "
            f"S in {meta.get('seqlens', '?')}, D in {meta.get('head_dims', '?')}; q, k, v shared by all paths",
            f"- timing: median of {meta.get('iters', '?')} back-to-back CUDA-event timings after "
            f"{meta.get('warmup', '?')} warm-up calls (and the first, building call); forward under "
            "no_grad, forward+backward as out = f(q, k, v); autograd.grad(out, (q, k, v), dO)",
            "- TFLOP/s: dense convention, 4*B*H*S^2*D forward and 3.5x that forward+backward; causal "
            "and document-masked cases are counted dense too (dense-equivalent TFLOP/s)",
            f"- torch flex: {meta.get('torch_flex', '?')}",
            "- first calls (graph builds, torch.compile), seconds summed per path: "
            + (", ".join(f"{p} {t:.1f}" for p, t in first_call_totals(rs).items()) or "–"),
            "- frontend path: cudnn.pygraph + sdpa / sdpa_backward with score_mod (and score_mod_bprop), "
            "graphs built once per (shape, strides, dtypes, mod) and kept in a Python dict, run by an "
            "autograd.Function; score_mod tensors described as given (size-1 broadcast dims)",
            "- ratios: `/ sdpa` = time / torch SDPA cuDNN no mask at that shape; `/ fe` = time / the "
            "frontend path's time for the same case and shape (lower is faster)",
            ""]
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
    out += ["## GPU time", "", f"![benchmarks]({png_name})", ""]
    out += ["Plot colors: " + ", ".join(f"{p} #{r:02x}{g:02x}{b:02x}" for p, (r, g, b) in PALETTE.items()), ""]
    out += gpu_table(rs) + [""]
    errors = [(r, m) for r in rs.rows for m in MODES if r.error(m) and not r.error(m).startswith("skipped")]
    if errors:
        out += ["## Errors", ""]
        out += [f"- {r.case} / {r.path} / S={seqlen_label(r.s)} D={r.d} / {MODE_LABELS[m]}: "
                f"{short_error(r.error(m), 400)}" for r, m in errors]
        out += [""]
    out += ["Paths: " + "; ".join(f"`{k}` {v}" for k, v in PATH_LABELS.items()),
            "", "Cases: " + "; ".join(f"`{k}` {v}" for k, v in CASE_LABELS.items()), ""]
    return "\n".join(out)


def summary(rs: ResultSet, host: dict, figures: list, d: int = 128) -> str:
    """The short table printed last: fwd+bwd ms per case at head dim d (else the largest measured),
    ratios, then the figures."""
    head_dims = sorted({dd for _, dd in rs.shapes()}, reverse=True)
    if head_dims and d not in head_dims:
        d = head_dims[0]
    lines = [f"== summary: fwd+bwd ms at D={d} (ours / frontend; torch flex / ours) =="]
    seqs = sorted({s for s, dd in rs.shapes() if dd == d})
    lines.append(f"{'case':<9}" + "".join(f"{seqlen_label(s):>24}" for s in seqs))
    for case in CASES:
        cells = []
        for s in seqs:
            ours = rs.ms(case, "cudnn_flex", s, d, "fwd_bwd")
            fe = rs.ratio((case, "cudnn_flex"), (case, "frontend"), s, d, "fwd_bwd")
            tf = rs.ratio((case, "torch_flex"), (case, "cudnn_flex"), s, d, "fwd_bwd")
            cells.append(f"{fmt(ours, 2)} ({fmt(fe, 2)}; {fmt(tf, 2)})")
        if any(c != "– (–; –)" for c in cells):
            lines.append(f"{case:<9}" + "".join(f"{c:>24}" for c in cells))
    if host.get("cudnn_flex"):
        lines.append("host us/call fwd: " + ", ".join(f"{k} {fmt(v.get('fwd'), 1)}" for k, v in host.items()))
    lines += [f.line() for f in figures]
    return "\n".join(lines)


# ---- PNG without matplotlib -------------------------------------------------------------------

def write_png(path: str, rgb) -> None:
    """Writes an HxWx3 uint8 array as an 8-bit RGB PNG (zlib + struct, no PNG library)."""
    import numpy as np   # here, not at the top: without numpy only the fallback plot is lost
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))   # filter type 0 per scanline

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))


def bar_chart(panels: list, series: list, width: int = 960, panel_height: int = 300):
    """Grouped bars rasterized with numpy, one panel per entry of `panels`.

    panels: [(groups, values)] where values[g][i] is the bar of series i in group g (None: none).
    series: the series keys (paths), colored by PALETTE. Light grid lines every 100 units; a
    legend of colored squares, in series order, top right. No text: the markdown names colors.
    """
    import numpy as np
    margin, legend_h = 40, 24
    height = legend_h + len(panels) * panel_height
    img = np.full((height, width, 3), 255, np.uint8)
    for i, key in enumerate(series):                      # legend squares, right to left
        x0 = width - margin - (len(series) - i) * 22
        img[6:18, x0:x0 + 14] = PALETTE.get(key, (0, 0, 0))
    for p, (groups, values) in enumerate(panels):
        top = legend_h + p * panel_height + 10
        bottom = legend_h + (p + 1) * panel_height - 20
        vmax = max([v for row in values for v in row if v is not None] + [1e-9])
        scale = (bottom - top) / (math.ceil(vmax / 100.0) * 100.0 if vmax > 0 else 1.0)
        for level in range(100, int(vmax) + 100, 100):   # grid every 100 (TFLOP/s)
            y = int(bottom - level * scale)
            if top <= y < bottom:
                img[y, margin:width - margin] = (225, 225, 225)
        img[top:bottom + 1, margin] = 0                  # y axis
        img[bottom, margin:width - margin] = 0            # x axis
        n_groups = max(len(groups), 1)
        group_w = (width - 2 * margin) / n_groups
        bar_w = max(int(group_w * 0.8 / max(len(series), 1)), 1)
        for g in range(len(groups)):
            for i, key in enumerate(series):
                v = values[g][i] if i < len(values[g]) else None
                if v is None or v <= 0:
                    continue
                x0 = int(margin + g * group_w + group_w * 0.1 + i * bar_w)
                y0 = int(round(bottom - v * scale))
                img[max(y0, top):bottom, x0:x0 + max(bar_w - 1, 1)] = PALETTE.get(key, (0, 0, 0))
    return img


def headline_shape(rs: ResultSet):
    """The shape the fallback plot shows: S=8k D=128 if measured, else the first measured one."""
    shapes = rs.shapes()
    if (8192, 128) in shapes:
        return 8192, 128
    return shapes[0] if shapes else None


def plot(rs: ResultSet, path: str, use_matplotlib: bool = True) -> str:
    """Writes the PNG; returns how ("matplotlib" or "numpy fallback")."""
    if use_matplotlib:
        try:
            _plot_matplotlib(rs, path)
            return "matplotlib"
        except ImportError:
            pass
    shape = headline_shape(rs)
    series = [p for p in PATHS if any(r.path == p for r in rs.rows)]
    panels = []
    for mode in MODES:
        values = []
        for case in CASES:
            row = []
            for p in series:
                r = rs.get(case, p, *shape) if shape else None
                row.append(r.tflops(mode) if r else None)
            values.append(row)
        panels.append((list(CASES), values))
    write_png(path, bar_chart(panels, series))
    return "numpy fallback: grouped bars of TFLOP/s at " + (
        f"S={seqlen_label(shape[0])} D={shape[1]}" if shape else "no shape") + \
        ", top fwd, bottom fwd+bwd, groups " + ", ".join(CASES)


def _plot_matplotlib(rs: ResultSet, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(CASES), figsize=(4 * len(CASES), 7), sharex=True, squeeze=False)
    head_dims = sorted({r.d for r in rs.rows}, reverse=True)
    for col, case in enumerate(CASES):
        for row, mode in enumerate(MODES):
            ax = axes[row][col]
            for p in CASE_PATHS[case]:
                for d in head_dims:
                    pts = sorted((r.s, r.tflops(mode)) for r in rs.rows
                                 if r.case == case and r.path == p and r.d == d and r.ms(mode))
                    if pts:
                        ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o",
                                linestyle="-" if d == head_dims[0] else "--",
                                color=[c / 255 for c in PALETTE[p]], label=p)
            ax.set_xscale("log", base=2)
            seqs = sorted({r.s for r in rs.rows})
            ax.set_xticks(seqs)
            ax.set_xticklabels([seqlen_label(s) for s in seqs])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{case} {MODE_LABELS[mode]}", fontsize=9)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("TFLOP/s (dense)")
            if row == 1:
                ax.set_xlabel("S")
    handles, labels = {}, {}
    for ax in axes.flat:
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, hnd)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=6, fontsize=8)
    fig.suptitle("bf16, B*S fixed, H=16; dense-equivalent TFLOP/s; solid D=" + str(head_dims[0])
                 + (", dashed other D" if len(head_dims) > 1 else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir: str, rs: ResultSet, meta: dict, host: dict, cold: dict,
                  use_matplotlib: bool = True) -> tuple:
    """benchmarks.md, benchmarks.png, benchmarks.json under out_dir; returns (md path, figures)."""
    os.makedirs(out_dir, exist_ok=True)
    figures = all_figures(rs, host)
    png = os.path.join(out_dir, "benchmarks.png")
    try:
        meta["plot"] = plot(rs, png, use_matplotlib)
    except Exception as e:  # noqa: BLE001  (a plot failure must not lose the tables)
        meta["plot"] = f"error: {e}"
    md_path = os.path.join(out_dir, "benchmarks.md")
    with open(md_path, "w") as f:
        f.write(markdown(rs, meta, host, cold, figures, "benchmarks.png"))
        f.write(f"\nPlot: {meta['plot']}\n")
    with open(os.path.join(out_dir, "benchmarks.json"), "w") as f:
        json.dump({"meta": meta, "host": host, "cold": cold,
                   "results": [dataclasses.asdict(r) for r in rs.rows],
                   "figures": [dataclasses.asdict(x) for x in figures]}, f, indent=1, default=str)
    return md_path, figures


# ---- Arguments --------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="cudnn-flex vs torch SDPA, compiled torch flex_attention and the cuDNN frontend "
                    "Python graph path, on the same inputs; writes benchmarks.md/.png/.json.")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join("benchmarks", "out"),
                    help="output folder (default: $OUT if set, else benchmarks/out)")
    ap.add_argument("--quick", action="store_true", help="only S in {4k, 8k}, D=128")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    ap.add_argument("--seqlens", default="1k,2k,4k,8k,16k", help="comma list, e.g. 4k,8k")
    ap.add_argument("--head-dims", default="128,64", help="comma list of head dims")
    ap.add_argument("--tokens", type=int, default=16384, help="B*S, fixed (default 16384)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after the first one")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="start no new GPU-time measurement after this many seconds of the run "
                         "(the rest is marked skipped); 0 = no limit")
    ap.add_argument("--host-calls", type=int, default=300, help="calls per host-time repeat")
    ap.add_argument("--no-host", action="store_true", help="skip the host-time measurement")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-build measurement")
    ap.add_argument("--flex-compile", choices=("static", "auto"), default="static",
                    help="torch.compile(flex_attention, dynamic=False) compiles per mod and shape, "
                         "each shape's best kernels (default); 'auto' is torch's automatic dynamic "
                         "shapes: fewer compiles, but shapes after the first get dynamic kernels")
    ap.add_argument("--no-matplotlib", action="store_true", help="always use the numpy PNG writer")
    args = ap.parse_args(argv)
    if args.quick:
        args.seqlens, args.head_dims = "4k,8k", "128"
    args.case_list = _checked_list(ap, args.cases, CASES, "--cases")
    args.path_list = _checked_list(ap, args.paths, PATHS, "--paths")
    args.seqlen_list = [parse_seqlen(x) for x in args.seqlens.split(",") if x.strip()]
    args.head_dim_list = [int(x) for x in args.head_dims.split(",") if x.strip()]
    for s in args.seqlen_list:
        if args.tokens % s:
            ap.error(f"--tokens {args.tokens} is not a multiple of S={s}")
    return args


def _checked_list(ap, text: str, allowed: tuple, flag: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        ap.error(f"{flag}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def shape_order(seqlens: list, head_dims: list) -> list:
    """(s, d) in the order they run: the issue's headline shapes (S in {4k, 8k}, D=128) first, so
    a run cut by the budget still has the figures; then the rest of D=128, then other D."""
    def priority(sd):
        s, d = sd
        return (d != 128, s not in (4096, 8192), -d, -s)
    return sorted({(s, d) for s in seqlens for d in head_dims}, key=priority)


# ================================================================================================
# GPU side: score_mods in three dialects, the frontend path, runners and measurements.
# ================================================================================================

# ---- cudnn-flex DSL score_mods (graph, score, tensors) -> score --------------------------------

class RelativeBias:
    """(q_idx - kv_idx) * c added to the score; keyed by c so its graph is cached."""

    def __init__(self, c: float):
        self.c = float(c)

    def score_mod_graph_cache_key(self):
        return (self.c,)

    def __call__(self, graph, score, tensors):
        dist = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        return graph.add(score, graph.mul(dist, self.c))


def doc_mask(graph, score, tensors):
    """Keeps keys in the query's document: doc_q [B,1,S,1] == doc_kv [B,1,1,S]."""
    same = graph.cmp_eq(tensors["doc_q"], tensors["doc_kv"])
    return graph.binary_select(score, float("-inf"), same)


class ColdMod:
    """A score_mod no other part of the run uses, with a fresh cache key per object, so its first
    call misses the cache: score + 0.5 * sin((q_idx - kv_idx) * c)."""

    def __init__(self, c: float):
        self.c = float(c)
        self.token = uuid.uuid4().hex

    def score_mod_graph_cache_key(self):
        return (self.token, self.c)

    def __call__(self, graph, score, tensors):
        dist = graph.sub(graph.gen_index(score, 2), graph.gen_index(score, 3))
        return graph.add(score, graph.mul(graph.sin(graph.mul(dist, self.c)), 0.5))


def ours_mod(case: str, inputs: dict):
    """(score_mod, score_mod_bprop, score_mod_tensors) for cudnn_flex.flex_attention."""
    from cudnn_flex import dsl_mods, mods
    if case == "nomod":
        return None, None, None
    if case == "causal":
        return dsl_mods.causal, None, None
    if case == "softcap":
        cap = dsl_mods.Softcap(SOFTCAP)
        return cap.forward, cap.backward, None
    if case == "alibi":
        return dsl_mods.alibi, None, {"slopes": inputs["slopes"]}
    if case == "relbias":
        return RelativeBias(REL_C), None, None
    if case == "docmask":
        return doc_mask, None, {"doc_q": inputs["doc_q"], "doc_kv": inputs["doc_kv"]}
    raise ValueError(case)


# ---- torch flex_attention score_mods (score, b, h, q_idx, kv_idx) and mask_mods ----------------

def tf_softcap(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def tf_relbias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx) * REL_C


def tf_causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def tf_alibi(slopes_1d: torch.Tensor):
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes_1d[h] * (kv_idx - q_idx)
    return alibi


def tf_doc_mask(doc: torch.Tensor):
    def same_doc(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]
    return same_doc


def torch_flex_mod(case: str, inputs: dict):
    """(score_mod, block_mask) for torch's flex_attention; block masks are built here, untimed."""
    from torch.nn.attention.flex_attention import create_block_mask
    b, s, dev = inputs["b"], inputs["s"], inputs["q"].device
    if case == "nomod":
        return None, None
    if case == "causal":
        return None, create_block_mask(tf_causal_mask, None, None, s, s, device=dev)
    if case == "softcap":
        return tf_softcap, None
    if case == "alibi":
        return tf_alibi(inputs["slopes"].view(-1)), None
    if case == "relbias":
        return tf_relbias, None
    if case == "docmask":
        return None, create_block_mask(tf_doc_mask(inputs["doc"]), b, None, s, s, device=dev)
    raise ValueError(case)


_compiled_flex = {}


def compiled_flex(mode: str):
    """One torch.compile'd flex_attention for the whole run (compiled per new mod/shape on first
    use, which the runners do outside the timed region). mode: "static" or "auto"."""
    key = mode
    if key not in _compiled_flex:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dcfg
        # Many mods x shapes: the default recompile limit (8) would silently fall back to the
        # eager, score-materializing flex_attention. Raise it, and fail loudly if still hit.
        for name, value in (("recompile_limit", 1000), ("cache_size_limit", 1000),
                            ("accumulated_recompile_limit", 10000), ("accumulated_cache_size_limit", 10000),
                            ("fail_on_recompile_limit_hit", True)):
            if hasattr(dcfg, name):
                setattr(dcfg, name, value)
        _compiled_flex[key] = torch.compile(flex_attention, dynamic=False if mode == "static" else None)
    return _compiled_flex[key]


# ---- The cuDNN frontend Python graph path (what the reference PR does), re-stated -------------
#
# Its score_mods take (graph, score, tensors) like the PR's; the frontend itself calls
# score_mod(graph, score), so the wrapper closes over the dict of graph tensors. Constants are
# pass-by-value scalar tensors (one-element CPU tensors) in that dict, as the frontend's own tests
# do, because the frontend graph takes no Python numbers as operands.

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


def fe_doc_mask(g, score, t):
    # cuDNN takes no graph input as the first operand of a pointwise op: lift doc_q by adding it
    # to a virtual zero made from an index (the form the frontend's own document-mask test uses).
    dt = _fe_types()
    zero = _fe_float(g.mul(a=_fe_index(g, score, 3), b=t["zero"], compute_data_type=dt.FLOAT))
    doc_q = _fe_float(g.add(a=zero, b=t["doc_q"], compute_data_type=dt.FLOAT))
    keep = g.cmp_eq(input=doc_q, comparison=t["doc_kv"], compute_data_type=dt.FLOAT)
    return _fe_keep(g, score, keep, t)


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
        return g.tanh_backward(loss=d_p, input=self.before_tanh, compute_data_type=_fe_types().FLOAT)


@dataclasses.dataclass
class FeMod:
    key: str                             # cache key of the mod (the PR keys named fns by qualname)
    fwd: Optional[Callable] = None       # (graph, score, tensors) -> score
    bwd: Optional[Callable] = None       # (graph, dP, tensors) -> dP
    tensors: Optional[dict] = None       # name -> torch tensor (one-element CPU: pass by value)
    native_causal: bool = False


def _scalar(x: float) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), x, dtype=torch.float32)


def frontend_mod(case: str, inputs: dict, native_causal: bool = False) -> FeMod:
    neg_inf = {"neg_inf": _scalar(float("-inf"))}
    if case == "nomod":
        return FeMod("nomod")
    if case == "causal":
        if native_causal:
            return FeMod("causal_native", native_causal=True)
        return FeMod("causal", fe_causal, None, neg_inf)
    if case == "softcap":
        cap = FeSoftcap()
        return FeMod(f"softcap{SOFTCAP}", cap.forward, cap.backward, {"cap": _scalar(SOFTCAP)})
    if case == "alibi":
        return FeMod("alibi", fe_alibi, None, {"slopes": inputs["slopes"]})
    if case == "relbias":
        return FeMod("relbias", fe_relbias, None, {"c": _scalar(REL_C)})
    if case == "docmask":
        return FeMod("docmask", fe_doc_mask, None, {**neg_inf, "zero": _scalar(0.0),
                                                    "doc_q": inputs["doc_q"], "doc_kv": inputs["doc_kv"]})
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
            note = f" (python engines deselected after: {short_error(_error_text(first), 120)})"
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
        if mod.native_causal:
            kw["diagonal_band_right_bound"] = 0   # causal, top-left aligned (the default)
        return kw

    def _build_fwd(self, q, k, v, o, stats, mod: FeMod, scale: float, bar_python_engines=False):
        g = self._new_graph(q, bar_python_engines)
        tq, tk, tv = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
        gt = {n: g.tensor_like(x) for n, x in (mod.tensors or {}).items()}
        to, tstats = g.sdpa(q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale,
                            **self._callbacks(mod, gt))
        to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
        tstats.set_output(True).set_data_type(self.cudnn.data_type.FLOAT)
        ws = self._finish(g)
        return g, ws, (tq, tk, tv, to, tstats), gt

    def _build_bwd(self, q, k, v, o, do, stats, dq, dk, dv, mod: FeMod, scale: float,
                   bar_python_engines=False):
        g = self._new_graph(q, bar_python_engines)
        ins = tuple(g.tensor_like(x) for x in (q, k, v, o, do, stats))
        gt = {n: g.tensor_like(x) for n, x in (mod.tensors or {}).items()}
        kw = self._callbacks(mod, gt)
        if mod.bwd is not None:
            kw["score_mod_bprop"] = lambda graph, d_p: mod.bwd(graph, d_p, gt)
        tdq, tdk, tdv = g.sdpa_backward(q=ins[0], k=ins[1], v=ins[2], o=ins[3], dO=ins[4], stats=ins[5],
                                        attn_scale=scale, **kw)
        for t, buf in ((tdq, dq), (tdk, dk), (tdv, dv)):
            t.set_output(True).set_dim(list(buf.shape)).set_stride(list(buf.stride()))
        ws = self._finish(g)
        return g, ws, ins + (tdq, tdk, tdv), gt

    def _execute(self, g, ws: int, graph_tensors: tuple, buffers: tuple, gt: dict, mod: FeMod, dev):
        pack = dict(zip(graph_tensors, buffers))
        pack.update({gt[n]: x for n, x in (mod.tensors or {}).items()})
        workspace = torch.empty(ws, dtype=torch.uint8, device=dev)
        self.cudnn.set_stream(self.handle, torch.cuda.current_stream(dev).cuda_stream)
        g.execute(pack, workspace, handle=self.handle)

    def forward(self, q, k, v, mod: FeMod, scale: float):
        o = torch.empty_like(q)
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


# ---- Runners: (q, k, v) -> out, per (case, path) -----------------------------------------------

def make_runner(case: str, path: str, inputs: dict, args) -> Callable:
    """A function (q, k, v) -> out for one case on one path. Setup (block masks, mod objects)
    happens here, outside any timing."""
    import torch.nn.functional as F
    if path == "cudnn_flex":
        import cudnn_flex
        mod, bprop, tensors = ours_mod(case, inputs)
        return lambda q, k, v: cudnn_flex.flex_attention(q, k, v, mod, bprop, score_mod_tensors=tensors)
    if path in ("sdpa_cudnn", "sdpa_flash"):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = SDPBackend.CUDNN_ATTENTION if path == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
        causal = case == "causal"

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa
    if path == "torch_flex":
        fn = compiled_flex(args.flex_compile)
        score_mod, block_mask = torch_flex_mod(case, inputs)
        return lambda q, k, v: fn(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if path in ("frontend", "frontend_native"):
        fe = frontend_path()
        mod = frontend_mod(case, inputs, native_causal=(path == "frontend_native"))
        scale = 1.0 / math.sqrt(inputs["d"])
        return lambda q, k, v: _FrontendAttention.apply(q, k, v, fe, mod, scale)
    raise ValueError(path)


def alibi_slopes(h: int, device) -> torch.Tensor:
    """cudnn_flex.mods.alibi_slopes, or the same formula when the extension does not import (the
    other paths still run then)."""
    try:
        from cudnn_flex import mods
        return mods.alibi_slopes(h, device)
    except ImportError:
        exponents = torch.arange(1, h + 1, dtype=torch.float64) * (-8.0 / h)
        return torch.pow(2.0, exponents).to(device=device, dtype=torch.float32).view(1, h, 1, 1)


def make_inputs(b: int, h: int, s: int, d: int, device="cuda") -> dict:
    """q, k, v (requires grad), dO, ALiBi slopes and document ids for one shape, seeded."""
    gen = torch.Generator(device=device).manual_seed(1234 + s + d)
    q, k, v, do = (torch.randn(b, h, s, d, device=device, dtype=torch.bfloat16, generator=gen)
                   for _ in range(4))
    doc = (torch.arange(s, device=device) * DOCS_PER_SEQ // s).to(torch.float32).expand(b, s).contiguous()
    return {"b": b, "h": h, "s": s, "d": d,
            "q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_(), "do": do,
            "slopes": alibi_slopes(h, device),
            "doc": doc, "doc_q": doc.view(b, 1, s, 1), "doc_kv": doc.view(b, 1, 1, s)}


# ---- Measurements -----------------------------------------------------------------------------

def cuda_median_ms(fn: Callable, warmup: int, iters: int) -> float:
    """Median GPU time of fn over `iters` back-to-back calls (events around each), after warm-up.
    Back to back, so the GPU never waits on the host between calls and host time stays out."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def first_call_s(fn: Callable) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def fwd_and_fwd_bwd(run: Callable, inputs: dict):
    q, k, v, do = inputs["q"], inputs["k"], inputs["v"], inputs["do"]

    def fwd():
        with torch.no_grad():
            run(q, k, v)

    def fwd_bwd():
        out = run(q, k, v)
        torch.autograd.grad(out, (q, k, v), do)
    return fwd, fwd_bwd


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def measure(case: str, path: str, inputs: dict, args, deadline: float) -> Result:
    r = Result(case, path, inputs["b"], inputs["h"], inputs["s"], inputs["d"])
    if deadline and time.perf_counter() > deadline:
        r.fwd_error = r.fwd_bwd_error = "skipped: time budget"
        return r
    try:
        run = make_runner(case, path, inputs, args)
    except Exception as e:  # noqa: BLE001  (one failing path must not stop the run)
        r.fwd_error = r.fwd_bwd_error = _error_text(e)
        return r
    fwd, fwd_bwd = fwd_and_fwd_bwd(run, inputs)
    for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
        try:
            first = first_call_s(fn)
            ms = cuda_median_ms(fn, args.warmup, args.iters)
            setattr(r, "first_" + mode + "_s", first)
            setattr(r, mode + "_ms", ms)
        except Exception as e:  # noqa: BLE001
            setattr(r, mode + "_error", _error_text(e))
            _recover()
    return r


def _recover() -> None:
    """After a failed call: drain the stream and return cached memory, so the next path starts clean."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001  (a sticky CUDA error: later cells will say so)
        pass
    torch.cuda.empty_cache()


def _log_cell(r: Result, mode: str) -> str:
    err = r.error(mode)
    return f"{r.ms(mode):8.3f} ms" if err is None and r.ms(mode) is not None else f"[{short_error(err, 100)}]"


def grid_passes(path_list: list) -> list:
    """Paths in the order they run: every other path over all shapes first, then torch flex, whose
    torch.compile per mod and shape is what a tight budget should cut, not the cuDNN rows."""
    rest = [p for p in PATHS if p in path_list and p != "torch_flex"]
    return ([rest] if rest else []) + ([["torch_flex"]] if "torch_flex" in path_list else [])


def run_grid(args, deadline: float, log=print) -> ResultSet:
    rs = ResultSet()
    for paths in grid_passes(args.path_list):
        for s, d in shape_order(args.seqlen_list, args.head_dim_list):
            b = args.tokens // s
            try:
                inputs = make_inputs(b, args.heads, s, d)   # seeded: the same values every pass
            except Exception as e:  # noqa: BLE001
                log(f"inputs for S={s} D={d} failed: {_error_text(e)}")
                continue
            for case in args.case_list:
                for path in CASE_PATHS[case]:
                    if path in paths:
                        rs.add(measure(case, path, inputs, args, deadline))
                        log(_log_line(rs.rows[-1]))
            del inputs
            torch.cuda.empty_cache()
    return rs


def _log_line(r: Result) -> str:
    first = (f"  (first call {r.first_fwd_s:.2f} s / {r.first_fwd_bwd_s:.2f} s)"
             if r.first_fwd_s is not None and r.first_fwd_bwd_s is not None else "")
    return (f"S={seqlen_label(r.s):>3} D={r.d:<3} B={r.b:<2} {r.case:<8} {r.path:<16} "
            f"fwd {_log_cell(r, 'fwd')}  fwd+bwd {_log_cell(r, 'fwd_bwd')}{first}")


def host_us(fn: Callable, calls: int, repeats: int = 5, warmup: int = 20) -> float:
    """Host time per call: wall time for `calls` calls to return, without waiting for the GPU
    (launches are asynchronous; `calls` stays far below the launch queue's depth), median of
    `repeats` loops."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


HOST_SHAPE = (1, 1, 64, 64)   # B, H, S, D: kernels far shorter than the host time per call


def measure_host(args, log=print) -> dict:
    """Host us per cached call at a tiny shape: the causal and softcap score_mods on this library
    and the frontend path, and torch SDPA (cuDNN, is_causal) as the reference point."""
    b, h, s, d = HOST_SHAPE
    inputs = make_inputs(b, h, s, d)
    q, k, v, do = inputs["q"], inputs["k"], inputs["v"], inputs["do"]
    out = {}
    for label, case, path in (("cudnn_flex", "causal", "cudnn_flex"), ("frontend", "causal", "frontend"),
                              ("sdpa_cudnn", "causal", "sdpa_cudnn"),
                              ("cudnn_flex softcap", "softcap", "cudnn_flex"),
                              ("frontend softcap", "softcap", "frontend")):
        if path not in args.path_list:
            continue
        try:
            run = make_runner(case, path, inputs, args)
            with torch.no_grad():   # around the loop, so that its cost is not counted per call
                fwd_us = host_us(lambda: run(q, k, v), args.host_calls)
            fwd_bwd_us = host_us(lambda: torch.autograd.grad(run(q, k, v), (q, k, v), do),
                                 max(args.host_calls // 3, 1))
            out[label] = {"fwd": fwd_us, "fwd_bwd": fwd_bwd_us}
        except Exception as e:  # noqa: BLE001
            out[label] = {"error": _error_text(e)}
            _recover()
        log(f"host {label:<20} {out[label]}")
    return out


def measure_cold(args, log=print) -> dict:
    """First forward and first backward call of score_mods the cache has never seen: the first
    one's structure is new to the process (cuDNN compiles its kernels); the second has the same
    structure under a new key (the cache misses; cuDNN may reuse its compiled kernels)."""
    import cudnn_flex
    inputs = make_inputs(1, args.heads, 1024, 128)
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
            out[label] = {"error": _error_text(e)}
            _recover()
        log(f"cold {label}: {out[label]}")
    return out


def warm_up(args, log) -> None:
    """Loads the CUDA context, cuBLAS and cuDNN before anything is timed."""
    warm = make_inputs(1, args.heads, 1024, 128)
    try:
        with torch.no_grad():
            make_runner("nomod", "sdpa_cudnn", warm, args)(warm["q"], warm["k"], warm["v"])
    except Exception as e:  # noqa: BLE001  (its own row will show the error)
        log(f"warm-up with torch SDPA (cuDNN) failed: {_error_text(e)}")
    _recover()


def guarded(measurement: Callable, label: str, args, log) -> dict:
    """A whole side measurement that failed becomes one error entry, and the run goes on."""
    try:
        return measurement(args, log)
    except Exception as e:  # noqa: BLE001
        log(f"{label} failed: {_error_text(e)}")
        _recover()
        return {label: {"error": _error_text(e)}}


def environment(args) -> dict:
    meta = {"device": "?", "versions": "?"}
    try:
        torch_cudnn = torch.backends.cudnn.version()
    except Exception as e:  # noqa: BLE001
        torch_cudnn = f"? ({e})"
    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch_cudnn})"]
    try:
        props = torch.cuda.get_device_properties(0)
        meta["device"] = f"{props.name} (sm{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    except Exception as e:  # noqa: BLE001
        meta["device"] = f"? ({e})"
    try:
        import cudnn_flex
        parts.append(f"cudnn_flex {cudnn_flex.__version__} {cudnn_flex.versions()}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"cudnn_flex: {_error_text(e)}")
    try:
        import cudnn
        parts.append(f"cudnn frontend (Python) {getattr(cudnn, '__version__', '?')}, "
                     f"backend {cudnn.backend_version_string()}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"cudnn frontend (Python): {_error_text(e)}")
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001
        pass
    meta["versions"] = "; ".join(parts)
    meta["command"] = " ".join(["python3"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    meta.update(tokens=args.tokens, heads=args.heads, iters=args.iters, warmup=args.warmup,
                seqlens=", ".join(seqlen_label(s) for s in args.seqlen_list),
                head_dims=", ".join(str(d) for d in args.head_dim_list),
                host_shape="B={} H={} S={} D={}".format(*HOST_SHAPE),
                torch_flex="torch.compile(flex_attention" + (", dynamic=False)" if args.flex_compile == "static"
                                                            else ") with automatic dynamic shapes")
                + ", one compiled function for the run; the first call of each mod/shape compiles, "
                  "outside the timed region; causal and document masks as create_block_mask BlockMasks; "
                  "measured after all other paths (same seeded inputs), so a tight budget cuts its rows first")
    return meta


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = _T0 if __name__ == "__main__" else time.perf_counter()
    deadline = t_start + args.budget_s if args.budget_s > 0 else 0.0
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    meta = environment(args)
    print(meta["device"], "|", meta["versions"], flush=True)
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    warm_up(args, log)
    cold = {} if args.no_cold or "cudnn_flex" not in args.path_list else \
        guarded(measure_cold, "cold build", args, log)
    host = {} if args.no_host else guarded(measure_host, "host time", args, log)
    rs = run_grid(args, deadline, log)

    meta["wall_s"] = time.perf_counter() - t_start
    meta["budget_s"] = args.budget_s
    meta["skipped"] = sum(1 for r in rs.rows for m in MODES if (r.error(m) or "").startswith("skipped"))
    try:
        import cudnn_flex
        meta["cudnn_flex_cache"] = str(cudnn_flex.cache_stats())
    except Exception:  # noqa: BLE001
        pass
    if _frontend is not None:
        meta["frontend_plans"] = {k: sorted(v) for k, v in sorted(_frontend.plans.items())}
    md_path, figures = write_outputs(args.out, rs, meta, host, cold, use_matplotlib=not args.no_matplotlib)
    print(f"\nwrote {md_path} ({meta['plot']})", flush=True)
    print("\n" + summary(rs, host, figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
