"""Plots of a run, with matplotlib only. matplotlib is a benchmark-only dependency
(benchmarks/requirements.txt), absent on machines without network: there the run still writes
its JSON and markdown, and write_charts returns no files and one line saying why.
Plots can be made later from the JSON: python3 -m benchmarks --from-json out/benchmarks.json."""

from __future__ import annotations

import math
import os

from .cases import GRID_CASES, MASK_CASES, seqlen_label
from .paths import PATHS, paths_for
from .report import shape_label
from .results import MODE_LABELS, MODES, ResultSet

PALETTE = {
    "cudnn_flex": "#d62728",
    "frontend": "#1f77b4",
    "frontend_native": "#17becf",
    "sdpa_cudnn": "#2ca02c",
    "sdpa_flash": "#9467bd",
    "torch_flex": "#ff7f0e",
}
INSTALL_HINT = "pip install -r benchmarks/requirements.txt"
GRID_PNG, MASKS_PNG = "benchmarks.png", "benchmarks_masks.png"


def write_charts(rs: ResultSet, out_dir: str) -> tuple:
    """(names of the PNGs written in out_dir, a one-line note for the log and the markdown)."""
    try:
        import matplotlib
    except ImportError:
        return [], (f"skipped the plot: matplotlib is not installed ({INSTALL_HINT}, or plot the record "
                    f"later: python3 -m benchmarks --from-json {os.path.join(out_dir, 'benchmarks.json')})")
    matplotlib.use("Agg")   # no display on the GPU machine
    import matplotlib.pyplot as plt
    written = []
    if any(r.case in GRID_CASES and r.ms(m) for r in rs.rows for m in MODES):
        _save(plt, grid_figure(plt, rs), os.path.join(out_dir, GRID_PNG))
        written.append(GRID_PNG)
    if any(r.case in MASK_CASES for r in rs.rows):
        _save(plt, mask_figure(plt, rs), os.path.join(out_dir, MASKS_PNG))
        written.append(MASKS_PNG)
    return written, "matplotlib: " + (", ".join(written) or "nothing measured to plot")


def _save(plt, fig, path: str) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_figure(plt, rs: ResultSet):
    """Dense-equivalent TFLOP/s against S, one column per grid case, fwd above fwd+bwd; one line
    per path, solid at the largest D and dashed at the others."""
    cases = [c for c in GRID_CASES if any(r.case == c for r in rs.rows)]
    rows = [r for r in rs.rows if r.case in cases]
    fig, axes = plt.subplots(2, len(cases), figsize=(4 * len(cases), 7), sharex=True, squeeze=False)
    head_dims = sorted({r.d for r in rows}, reverse=True)
    seqs = sorted({r.s for r in rows})
    for col, case in enumerate(cases):
        for row, mode in enumerate(MODES):
            ax = axes[row][col]
            for p in paths_for(case):
                for d in head_dims:
                    pts = sorted((r.s, r.tflops(mode)) for r in rows
                                 if r.case == case and r.path == p and r.d == d and r.ms(mode))
                    if pts:
                        ax.plot([s for s, _ in pts], [t for _, t in pts], marker="o",
                                linestyle="-" if d == head_dims[0] else "--", color=PALETTE[p], label=p)
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs)
            ax.set_xticklabels([seqlen_label(s) for s in seqs])
            ax.set_ylim(bottom=0)
            ax.set_title(f"{case} {MODE_LABELS[mode]}", fontsize=9)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel("TFLOP/s (dense)")
            if row == 1:
                ax.set_xlabel("S")
    _legend(fig, axes)
    fig.suptitle("bf16, B*S fixed, H=16; dense-equivalent TFLOP/s; solid D=" + str(head_dims[0])
                 + (", dashed other D" if len(head_dims) > 1 else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return fig


def mask_figure(plt, rs: ResultSet):
    """One panel per (mask case, shape): ms per path, fwd bars solid and fwd+bwd bars hatched;
    a path that cannot express the case, or failed, is named under the axis."""
    panels = sorted({(r.case, r.s, r.d) for r in rs.rows if r.case in MASK_CASES},
                    key=lambda k: (MASK_CASES.index(k[0]), k[1], k[2]))
    ncols = min(len(panels), 4)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, (case, s, d) in zip(axes.flat, panels):
        paths = [p for p in PATHS if rs.get(case, p, s, d) is not None]
        for i, p in enumerate(paths):
            r = rs.get(case, p, s, d)
            for j, mode in enumerate(MODES):
                if r.ms(mode):
                    ax.bar(i + (j - 0.5) * 0.4, r.ms(mode), width=0.4, color=PALETTE[p],
                           hatch="//" if mode == "fwd_bwd" else None, edgecolor="white",
                           label=f"{p}" if mode == "fwd" else None)
        ax.set_xlim(-0.6, len(paths) - 0.4)   # one path alone keeps a bar's width
        ax.set_xticks(range(len(paths)))
        ax.set_xticklabels([p if rs.get(case, p, s, d).ms("fwd") else f"{p}\n({rs.get(case, p, s, d).status('fwd')})"
                            for p in paths], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{case}\n{shape_label(rs.get(case, paths[0], s, d))}", fontsize=8)
        ax.set_ylabel("ms", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _legend(fig, axes)
    fig.suptitle("mask cases: GPU time per path (solid fwd, hatched fwd+bwd; lower is faster)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def _legend(fig, axes) -> None:
    handles = {}
    for ax in axes.flat:
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, hnd)
    labels = sorted(handles, key=lambda p: PATHS.index(p) if p in PATHS else len(PATHS))
    if labels:
        fig.legend([handles[p] for p in labels], labels, loc="lower center", ncol=6, fontsize=8)
