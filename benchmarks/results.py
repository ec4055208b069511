"""The result model: one Result per (case, path, shape), a ResultSet with the ratios the report
needs, and the JSON file that is the run's record (the markdown and plots are made from it, and
can be made again from it with --from-json)."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

MODES = ("fwd", "fwd_bwd")
MODE_LABELS = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
NA = "n/a: "                      # error text of a case a path cannot express
SKIPPED = "skipped: time budget"  # error text of a measurement the budget left out


def attn_flops(b: int, h: int, s_q: int, s_kv: int, d: int, backward: bool = False) -> float:
    """Dense attention flops: two matmuls of 2*S_q*S_kv*D each per head forward (QK^T, PV).

    The backward has five such matmuls (recomputed QK^T, dV, dP, dQ, dK): 2.5x the forward, so
    forward+backward is 3.5x. Masked cases are counted dense as well, so their TFLOP/s is
    "dense-equivalent": it compares times, not work done.
    """
    fwd = 4.0 * b * h * s_q * s_kv * d
    return fwd * 3.5 if backward else fwd


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    if ms is None or ms <= 0:
        return None
    return flops / (ms * 1e-3) / 1e12


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def short_error(msg: str, limit: int = 60) -> str:
    one_line = " ".join(str(msg).split())
    return one_line if len(one_line) <= limit else one_line[:limit - 1] + "…"


@dataclasses.dataclass
class Result:
    """One (case, path, shape) measurement. ms are medians; an error, a skip or n/a leaves ms None.
    s is the key length (and the query length unless s_q is set); h the query heads."""
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
    h_kv: Optional[int] = None                # None: h (no GQA)
    s_q: Optional[int] = None                 # None: s

    def ms(self, mode: str) -> Optional[float]:
        return self.fwd_ms if mode == "fwd" else self.fwd_bwd_ms

    def error(self, mode: str) -> Optional[str]:
        return self.fwd_error if mode == "fwd" else self.fwd_bwd_error

    def status(self, mode: str) -> str:
        """"ok", "n/a", "skipped" or "error"."""
        err = self.error(mode)
        if err is None:
            return "ok"
        return "n/a" if err.startswith(NA) else "skipped" if err.startswith("skipped") else "error"

    def tflops(self, mode: str) -> Optional[float]:
        flops = attn_flops(self.b, self.h, self.s_q or self.s, self.s, self.d, backward=(mode == "fwd_bwd"))
        return tflops(flops, self.ms(mode))


class ResultSet:
    """Results indexed by (case, path, s, d) (every case has one shape per (s, d)), with the
    ratios the tables and figures need."""

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

    def shapes(self, cases=None) -> list:
        """(s, d) pairs present (of `cases` only, if given), D descending then S ascending."""
        return sorted({(r.s, r.d) for r in self.rows if cases is None or r.case in cases},
                      key=lambda sd: (-sd[1], sd[0]))


def save_json(path: str, rs: ResultSet, meta: dict, host: dict, cold: dict, figures=()) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "host": host, "cold": cold,
                   "results": [dataclasses.asdict(r) for r in rs.rows],
                   "figures": [dataclasses.asdict(x) for x in figures]}, f, indent=1, default=str)


def load_json(path: str) -> tuple:
    """(results, meta, host, cold) of a saved run; fields a Result does not know are dropped, so
    records of older runs still load."""
    with open(path) as f:
        data = json.load(f)
    known = {f.name for f in dataclasses.fields(Result)}
    rs = ResultSet(Result(**{k: v for k, v in row.items() if k in known}) for row in data.get("results", []))
    return rs, data.get("meta", {}), data.get("host", {}), data.get("cold", {})
