"""cudnn-flex: flex attention for PyTorch on cuDNN.

A small score_mod (mask, bias, softcap, ALiBi, ...) becomes one fused cuDNN attention kernel,
forward and backward, run as the custom op torch.ops.cudnn_flex.fwd / bwd.
"""

import torch  # noqa: F401  (loads libtorch and cuDNN before the extension)

from . import _C
from . import _plan_salt, _registry, fast_path
from ._C import Graph, Tensor, data_type
from .api import FlexAttention, ReferencePathWarning, flex_attention, validate_graphs
from .bprop_check import BpropMismatchError, check_score_mod_bprop
from .torch_style import UnsupportedConstruct, torch_score_mod
from .varlen import cu_seqlens_from_document_ids, flex_attention_varlen
from .program import BpropNotDerivable
from . import compat, dsl_mods, mods, program, reference

_C._set_dispatcher(_registry.dispatch)
# Stored plans are keyed by this code too: another version of cudnn-flex never loads them.
_C._set_plan_salt(_plan_salt.lowering_digest())

cache_stats = _C.cache_stats


def clear_cache() -> None:
    """Drops every cached graph and every recorded program, and zeroes the cache counters."""
    _C.clear_cache()
    _registry.clear()
    fast_path.clear()


set_cache_capacity = _C.set_cache_capacity
plan_store_directory = _C.plan_store_directory
versions = _C.versions

__all__ = [
    "BpropMismatchError", "compat", "BpropNotDerivable", "FlexAttention", "Graph", "ReferencePathWarning", "Tensor", "cache_stats",
    "UnsupportedConstruct", "check_score_mod_bprop", "clear_cache", "cu_seqlens_from_document_ids", "data_type",
    "dsl_mods", "flex_attention", "flex_attention_varlen", "mods", "plan_store_directory", "reference", "torch_score_mod",
    "set_cache_capacity", "validate_graphs", "versions",
]
__version__ = "0.1.0"
