"""Ready score_mods in the cuDNN frontend's graph DSL (graph, score, tensors): the families of
cudnn_flex.mods under the same names and parameters. Each family's file in mods/ holds both forms.

The DSL forms are module-level functions and keyed objects, so that their graphs are cached (see
_registry). Where the torch-style form captures a tensor, the DSL form reads it from
score_mod_tensors (alibi: tensors['slopes']).
"""

from .mods.alibi import alibi_dsl as alibi, alibi_slopes
from .mods.bias import add_bias_dsl as add_bias
from .mods.causal import causal_dsl as causal
from .mods.relative_bias import RelativeBias
from .mods.sliding_window import SlidingWindow
from .mods.softcap import Softcap

# The parameterised families' factories are their classes: dsl_mods.softcap(30.0) is a Softcap.
relative_bias = RelativeBias
sliding_window = SlidingWindow
softcap = Softcap

__all__ = ["add_bias", "alibi", "alibi_slopes", "causal", "relative_bias", "RelativeBias", "sliding_window",
           "SlidingWindow", "softcap", "Softcap"]
