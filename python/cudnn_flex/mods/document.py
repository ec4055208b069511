"""Document masking of packed sequences (torch-style only: the DSL cannot index a tensor by
position; packed documents also run as flex_attention_varlen)."""

from typing import Callable

import torch


def document_mask(doc_ids: torch.Tensor) -> Callable:
    """mask_mod: a query sees only keys of its own document. doc_ids[s] (or doc_ids[b, s] per
    batch) numbers the document of each position of packed sequences."""
    if doc_ids.dim() == 1:
        def document(b, h, q_idx, kv_idx):
            return doc_ids[q_idx] == doc_ids[kv_idx]
    elif doc_ids.dim() == 2:
        def document(b, h, q_idx, kv_idx):
            return doc_ids[b, q_idx] == doc_ids[b, kv_idx]
    else:
        raise ValueError(f"cudnn_flex: doc_ids must be [S] or [B, S], got shape {tuple(doc_ids.shape)}")
    return document
