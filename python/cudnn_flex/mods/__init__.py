"""Ready mods, one small file per family, each with both dialects side by side under matching names.

This package exports the torch-style forms, with the signatures of torch.nn.attention.flex_attention:
score_mods take (score, b, h, q_idx, kv_idx) and return the new score; mask_mods take
(b, h, q_idx, kv_idx) and return where to attend. Pass a score_mod as score_mod= and a mask_mod as
mask_mod= (or turn it into a score_mod with masked()). Combine them with compose(), and_masks(),
or_masks(). Factories return closures: their captured numbers are part of the graph's cache key,
their captured tensors are runtime inputs (changing a tensor's values never rebuilds a graph).
The backward of each is derived automatically (none is needed for masks and biases).

cudnn_flex.dsl_mods exports the same families in the cuDNN frontend's graph DSL, under the same
names and with the same parameters (a DSL mod reads tensors from score_mod_tensors, where a
torch-style one captures them).
"""

from .alibi import alibi, alibi_slopes
from .causal import causal
from .combine import and_masks, compose, masked, or_masks
from .document import document_mask
from .prefix_lm import prefix_lm
from .relative_bias import relative_bias
from .sliding_window import sliding_window
from .softcap import softcap

__all__ = ["alibi", "alibi_slopes", "and_masks", "causal", "compose", "document_mask", "masked", "or_masks",
           "prefix_lm", "relative_bias", "sliding_window", "softcap"]
