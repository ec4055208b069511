"""The case table: what each case computes, at which shapes, and the inputs it runs on.

A case names one attention (a score_mod, a mask, or both) and its shapes; how each framework
writes it is in paths/. Grid cases (the six of issue 5) run over --seqlens x --head-dims with
B*S = --tokens fixed; mask cases (the masks issue) run at fixed shapes of their own.

`scale` divides every length (S, windows, document lengths, valid lengths), so that the CPU tests
(and --tiny) build every case at a small shape with the same structure as the full one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

SOFTCAP = 30.0          # grid softcap
REL_C = 0.01            # grid relative bias (q_idx - kv_idx) * c
DOCS_PER_SEQ = 4        # grid document mask: equal documents per sequence
GEMMA_CAP = 50.0        # Gemma 2: attention logit softcap 50, sliding window 4096
GEMMA_WINDOW = 4096
WINDOW = 1024
DOC_MIX = (300, 4000)   # packed-documents mix: lengths drawn from this range (the last takes the rest)


def parse_seqlen(text: str) -> int:
    """'4k' -> 4096, '512' -> 512."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def seqlen_label(s: int) -> str:
    return f"{s // 1024}k" if s % 1024 == 0 else str(s)


@dataclasses.dataclass(frozen=True)
class Shape:
    """B, query heads, key/value length, head dim; GQA and a shorter query (decode) optional."""
    b: int
    h: int
    s: int
    d: int
    h_kv: Optional[int] = None   # None: h
    s_q: Optional[int] = None    # None: s

    @property
    def hkv(self) -> int:
        return self.h_kv or self.h

    @property
    def sq(self) -> int:
        return self.s_q or self.s

    def scaled(self, scale: int) -> "Shape":
        # A one-token query (decode) stays one token.
        s_q = None if self.s_q is None else max(self.s_q // scale, 1)
        return dataclasses.replace(self, s=self.s // scale, s_q=s_q)

    def label(self) -> str:
        heads = f"H={self.h}" + (f"/{self.h_kv}" if self.h_kv else "")
        seq = (f"Sq={seqlen_label(self.sq)} Skv={seqlen_label(self.s)}" if self.s_q
               else f"S={seqlen_label(self.s)}")
        return f"B={self.b} {heads} {seq} D={self.d}"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    label: str
    shapes: tuple = ()                  # full-size shapes; () = the grid
    backward: bool = True               # decode is inference: forward only
    tensors: Optional[Callable] = None  # (shape, scale, device) -> the case's own inputs

    @property
    def grid(self) -> bool:
        return not self.shapes


# ---- The case's own inputs --------------------------------------------------------------------

def alibi_slopes(h: int, device="cpu") -> torch.Tensor:
    """The standard slopes 2^(-8 (i + 1) / H) as [1, H, 1, 1] (cudnn_flex.mods.alibi_slopes's
    formula, written here so that the other paths run when the extension does not import)."""
    exponents = torch.arange(1, h + 1, dtype=torch.float64) * (-8.0 / h)
    return torch.pow(2.0, exponents).to(device=device, dtype=torch.float32).view(1, h, 1, 1)


def _slopes(shape, scale, device) -> dict:
    return {"slopes": alibi_slopes(shape.h, device)}


def _doc_views(doc_ids: torch.Tensor, b: int) -> dict:
    """doc_ids [S] (one packed sequence per batch row) in every form a path wants: the ids, float
    ids [B, S], and the [B,1,S,1] / [B,1,1,S] views the DSL and frontend score_mods compare."""
    s = doc_ids.shape[-1]
    doc = doc_ids.to(torch.float32).expand(b, s).contiguous()
    return {"doc_ids": doc_ids, "doc": doc, "doc_q": doc.view(b, 1, s, 1), "doc_kv": doc.view(b, 1, 1, s)}


def _grid_docs(shape, scale, device) -> dict:
    views = _doc_views(torch.arange(shape.s, device=device) * DOCS_PER_SEQ // shape.s, shape.b)
    return {k: views[k] for k in ("doc", "doc_q", "doc_kv")}   # the grid's ids are float (DSL)


def doc_mix_lengths(total: int, lo: int, hi: int, seed: int = 0) -> list:
    """Document lengths drawn uniformly from [lo, hi] (seeded) until they fill `total`; the last
    document takes what is left, so it may be shorter than lo."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(lo, hi + 1, (1,), generator=gen)))
    lengths[-1] -= sum(lengths) - total
    return lengths


def scale_lengths(lengths: list, scale: int) -> list:
    """Each length divided by scale (at least 1); the last absorbs the rounding, so the sum stays
    sum(lengths) // scale."""
    out = [max(n // scale, 1) for n in lengths]
    out[-1] += sum(lengths) // scale - sum(out)
    return out


def _packed(full_lengths: Callable) -> Callable:
    def tensors(shape, scale, device) -> dict:
        lengths = scale_lengths(full_lengths(shape.s * scale), scale)
        doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
        return {**_doc_views(doc_ids, shape.b), "doc_lengths": lengths}
    return tensors


def _window(full: int) -> Callable:
    return lambda shape, scale, device: {"window": max(full // scale, 1)}


def padded_lengths(b: int, s: int, seed: int = 0) -> torch.Tensor:
    """Valid lengths of a padded batch: seeded in [S/8, S], the first row full (the batch is
    padded to its longest sequence)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(s // 8, 1), s + 1, (b,), generator=gen)
    lengths[0] = s
    return lengths


def _padded(shape, scale, device) -> dict:
    lengths = padded_lengths(shape.b, shape.s).to(device)
    # int32 [B,1,1,1]: cuDNN's native padding mask; float [B,1,1,1]: the frontend score_mod's.
    seq_len = lengths.to(torch.int32).view(-1, 1, 1, 1)
    return {"lengths": lengths, "len_f": lengths.to(torch.float32).view(-1, 1, 1, 1),
            "seq_len_q": seq_len.clone(), "seq_len_kv": seq_len.clone()}


def _decode(shape, scale, device) -> dict:
    # Bottom-right alignment: query i sits at cache position i + (Skv - Sq) (the last for Sq=1).
    return {**_slopes(shape, scale, device), "offset": shape.s - shape.sq}


# ---- The table --------------------------------------------------------------------------------

_LONG = Shape(1, 16, 16384, 128)
_DECODE = Shape(8, 32, 8192, 128, h_kv=8, s_q=1)

CASES = {c.name: c for c in (
    Case("nomod", "no score_mod"),
    Case("causal", "causal (score_mod; native for SDPA / frontend_native, BlockMask for torch flex)"),
    Case("softcap", "softcap 30 (tanh, with bprop)"),
    Case("alibi", "ALiBi (slopes tensor [1,H,1,1])", tensors=_slopes),
    Case("relbias", "relative bias (q_idx - kv_idx) * 0.01"),
    Case("docmask", "document mask (ids tensor, 4 equal docs per sequence; BlockMask for torch flex)",
         tensors=_grid_docs),
    Case("window1k", "sliding window 1024, causal (mods.sliding_window)",
         shapes=(Shape(1, 16, 8192, 128), _LONG), tensors=_window(WINDOW)),
    Case("docs8x2k", "packed documents 8 x 2048 (mods.document_mask of an ids tensor)",
         shapes=(_LONG,), tensors=_packed(lambda s: [s // 8] * 8)),
    Case("docsmix", "packed documents, seeded mix of lengths 300-4000 summing to S (mods.document_mask)",
         shapes=(_LONG,), tensors=_packed(lambda s: doc_mix_lengths(s, *DOC_MIX))),
    Case("gemma2", "Gemma 2: softcap 50 + causal sliding window 4096 (score_mod and mask_mod)",
         shapes=(Shape(2, 16, 8192, 128),), tensors=_window(GEMMA_WINDOW)),
    Case("padded", "padded batch: seeded valid lengths per row, q and kv past them masked (mask_mod "
         "on a [B] lengths tensor)", shapes=(Shape(8, 16, 4096, 128),), tensors=_padded),
    Case("decode", "decode: one query against an 8k cache, GQA 32/8, no mask (forward only)",
         shapes=(_DECODE,), backward=False, tensors=_decode),
    Case("decode_alibi", "decode with ALiBi, bottom-right (the query at position Skv-1; forward only)",
         shapes=(_DECODE,), backward=False, tensors=_decode),
    Case("decode_softcap", "decode with Gemma 2's logit softcap 50 (forward only)",
         shapes=(_DECODE,), backward=False, tensors=_decode),
)}
CASE_NAMES = tuple(CASES)
GRID_CASES = tuple(n for n, c in CASES.items() if c.grid)
MASK_CASES = tuple(n for n, c in CASES.items() if not c.grid)
CASE_GROUPS = {"grid": GRID_CASES, "masks": MASK_CASES}   # names --cases also takes


def make_inputs(shape: Shape, cases=(), device="cuda", dtype=torch.bfloat16, scale: int = 1) -> dict:
    """q, k, v (requiring grad), dO for one shape, seeded by the shape, plus the own inputs of
    each of `cases` (names). The same shape gives the same q, k, v in every pass and path."""
    gen = torch.Generator(device=device).manual_seed(1234 + shape.s + shape.d)
    q_shape, kv_shape = (shape.b, shape.h, shape.sq, shape.d), (shape.b, shape.hkv, shape.s, shape.d)
    q, k, v, do = (torch.randn(sh, device=device, dtype=dtype, generator=gen)
                   for sh in (q_shape, kv_shape, kv_shape, q_shape))
    inputs = {"shape": shape, "q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_(),
              "do": do}
    for name in cases:
        if CASES[name].tensors is not None:
            inputs.update(CASES[name].tensors(shape, scale, device))
    return inputs
