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


def runner(case: str, inputs: dict, flash: bool) -> Callable:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = SDPBackend.FLASH_ATTENTION if flash else SDPBackend.CUDNN_ATTENTION
    causal = case == "causal"
    shape = inputs["shape"]
    gqa = {"enable_gqa": True} if shape.hkv != shape.h else {}   # keyword only where needed

    def sdpa(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **gqa)
    return sdpa
