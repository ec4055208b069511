"""Issue 5's goals and the "figures reached" lines: how far each measured ratio is from its goal.

Read from the grid cases only (the mask cases have their own table and summary lines)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .cases import GRID_CASES, seqlen_label
from .results import MODE_LABELS, MODES, ResultSet

GOAL_OURS_VS_FRONTEND = 1.03        # GPU time within 3% of the frontend Python path
GOAL_SPEEDUP_VS_TORCH_FLEX = {"softcap": 2.0, "alibi": 1.3, "relbias": 1.3}  # fwd+bwd, S >= 4k
GOAL_CAUSAL_MOD_VS_NATIVE = 1.10    # causal by score_mod within 10% of native causal
GOAL_HOST_US = 15.0                 # host time per cached forward call
GOAL_HOST_FRACTION_OF_FRONTEND = 1.0 / 3.0
GOAL_HOST_VS_SDPA = 1.3             # issue 15: every kind of cached call within 1.3x of SDPA's host time
HOST_ANCHOR = "sdpa_cudnn"


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


def figure_ours_vs_frontend(rs: ResultSet, cases=GRID_CASES) -> list:
    """Per case: worst ours/frontend GPU-time ratio over shapes, fwd and fwd+bwd (goal <= 1.03)."""
    figures = []
    for case in cases:
        parts, met = [], None
        for mode in MODES:
            ratios = [(rs.ratio((case, "cudnn_flex"), (case, "frontend"), s, d, mode), (s, d))
                      for s, d in rs.shapes(GRID_CASES)]
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
                    for s, d in rs.shapes(GRID_CASES) if s >= min_s]
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
                  for s, d in rs.shapes(GRID_CASES)]
        worst = _extreme(ratios, worst_is_max=True)
        fe = _extreme([(rs.ratio(("causal", "frontend"), ("causal", "frontend_native"), s, d, mode), (s, d))
                       for s, d in rs.shapes(GRID_CASES)], worst_is_max=True)
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


def figure_host_vs_sdpa(host: dict) -> list:
    """Issue 15: each kind of cudnn-flex call (rows named "cudnn_flex ...") over SDPA's host
    time in the same run, forward and forward+backward; the worst kind names the figure. A row
    timed in rounds alternating with SDPA's gives its own ratio ("vs_sdpa", runner's
    _paired_with_sdpa); else SDPA's row of the run is the anchor."""
    anchor = host.get(HOST_ANCHOR) or {}
    ratios = []
    for name, v in host.items():
        if not name.startswith("cudnn_flex") or v.get("error"):
            continue
        paired = v.get("vs_sdpa") or {}
        for mode in ("fwd", "fwd_bwd"):
            if paired.get(mode) is not None:
                ratios.append((paired[mode], name, mode))
            elif v.get(mode) is not None and anchor.get(mode):
                ratios.append((v[mode] / anchor[mode], name, mode))
    if not ratios:
        return [Figure("host time per cached call / SDPA's", "not measured", None)]
    worst = max(ratios)
    over = [f"{name} {MODE_LABELS[mode]} {r:.2f}" for r, name, mode in sorted(ratios, reverse=True)
            if r > GOAL_HOST_VS_SDPA]
    text = (f"worst {worst[0]:.2f} ({worst[1]}, {MODE_LABELS[worst[2]]}); goal <= {GOAL_HOST_VS_SDPA}"
            + (f"; over: {', '.join(over)}" if over else ""))
    return [Figure("host time per cached call / SDPA's", text, worst[0] <= GOAL_HOST_VS_SDPA)]


def all_figures(rs: ResultSet, host: dict) -> list:
    return (figure_ours_vs_frontend(rs) + figure_speedup_vs_torch_flex(rs)
            + figure_causal_mod_vs_native(rs) + figure_host(host) + figure_host_vs_sdpa(host))
