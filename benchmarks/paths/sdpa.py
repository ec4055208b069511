"""torch F.scaled_dot_product_attention with one backend forced (cuDNN or flash).

SDPA has no score_mod or mask_mod: it runs the cases that are no mask, is_causal, or plain GQA
decode. A dense attn_mask tensor would be a different kernel (and the flash backend takes none),
so the other cases are n/a rather than measured that way.
"""

from __future__ import annotations

from typing import Callable, Optional

EXPRESSIBLE = ("nomod", "causal", "decode")


def na_reason(case: str) -> Optional[str]:
    if case in EXPRESSIBLE:
        return None
    return "SDPA has no score_mod or mask_mod (only no mask or is_causal; a dense attn_mask is another kernel)"


def backend(flash: bool):
    """The context that makes SDPA use the flash or the cuDNN backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if flash else SDPBackend.CUDNN_ATTENTION)


def call(case: str, inputs: dict) -> Callable:
    """The bare SDPA call of `case`: the backend is whatever context the caller holds."""
    import torch.nn.functional as F
    causal = case == "causal"
    shape = inputs["shape"]
    gqa = {"enable_gqa": True} if shape.hkv != shape.h else {}   # keyword only where needed

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    return sdpa


def runner(case: str, inputs: dict, flash: bool) -> Callable:
    """`call` with its backend forced on every call (GPU timings; the context costs host time,
    which the host-time table leaves out: it holds the context around its loops)."""
    sdpa = call(case, inputs)

    def forced(q, k, v):
        with backend(flash):
            return sdpa(q, k, v)
    return forced
