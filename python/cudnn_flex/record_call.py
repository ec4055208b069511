"""A call's mods -> the recorded program and the tensors of its input slots.

DSL mods are recorded by the registry (with the guard and the keyed-object promise); torch-style
mods and mask_mods are traced (torch_style.py), their captured tensors becoming strided views
passed on every call. Under torch.compile the DSL mod also runs on shadow values inside the
traced code (program/shadow.py) and the program is recorded once, while dynamo traces.
"""

from __future__ import annotations

import torch

from . import _registry, torch_style
from ._validation import check_tensor_dict
from .program import shadow
from .program.record import Recorder


def as_graph_input(t: torch.Tensor) -> torch.Tensor:
    """A score_mod tensor as cuDNN reads it: bool as a float32 copy (cuDNN 9.19 crashes on
    BOOLEAN inputs with SIGFPE, and reads a uint8 view of an odd-length mask at a misaligned
    address); the program compares it with 0."""
    return t.to(torch.float32) if t.dtype == torch.bool else t


def record_call(score_mod, score_mod_bprop, mask_mod, score_mod_tensors, score_mod_bprop_tensors, q, s_kv):
    """(program, mod tensors, bprop tensors): the call's mods recorded into one program, and the
    tensors of its input slots in order. Under torch.compile the program is replaced by the
    arguments of _registry.traced_ids, which records it once while dynamo traces."""
    shape = (q.shape[0], q.shape[1], q.shape[2], s_kv)
    torch_fn = None
    if mask_mod is not None:
        torch_style.check_mask_mod(mask_mod, score_mod)
        torch_fn = torch_style.mask_to_score_mod(mask_mod, score_mod)
    elif score_mod is not None and torch_style.is_torch_style(score_mod):
        torch_fn = score_mod
    elif score_mod is not None and torch_style.positional_count(score_mod) == 4:
        raise TypeError("cudnn_flex: score_mod takes 4 arguments, like a mask_mod(b, h, q_idx, "
                        "kv_idx); pass it as mask_mod=, or write score_mod(score, b, h, q_idx, kv_idx)")
    bprop_names, bprop_tensors = check_tensor_dict(score_mod_bprop_tensors, "score_mod_bprop_tensors", q, s_kv)
    bprop_dtypes = tuple(t.dtype for t in bprop_tensors)
    bprop_tensors = [as_graph_input(t) for t in bprop_tensors]
    if torch_fn is not None:
        if score_mod_tensors:
            raise TypeError("cudnn_flex: a torch-style score_mod gets its tensors by capturing them "
                            "(closure, default argument or global), not through score_mod_tensors")
        program, views = _record_torch_style(torch_fn, (mask_mod, score_mod), score_mod_bprop, bprop_names,
                                             bprop_dtypes, q, shape)
        return program, views, bprop_tensors
    names, tensors = check_tensor_dict(score_mod_tensors, "score_mod_tensors", q, s_kv)
    dtypes = tuple(t.dtype for t in tensors)
    tensors = [as_graph_input(t) for t in tensors]
    if torch.compiler.is_compiling():
        # Traced inline: dynamo guards what the mods read, and the trail is a constant argument.
        trail = shadow.trail(score_mod, score_mod_bprop, names, bprop_names)
        forms = (_registry.constant_form(score_mod), _registry.constant_form(score_mod_bprop), tuple(names),
                 dtypes, tuple(bprop_names), bprop_dtypes, trail)
        return forms, tensors, bprop_tensors
    program = _registry.record(score_mod, score_mod_bprop, names, dtypes, bprop_names, bprop_dtypes, shape)
    return program, tensors, bprop_tensors


def _record_torch_style(torch_fn, user_fns, score_mod_bprop, bprop_names, bprop_dtypes, q, shape):
    """(program, views of the captured tensors) of a torch-style mod (with its mask_mod)."""
    if torch.compiler.is_compiling():
        raise NotImplementedError(
            "cudnn_flex: torch-style score_mods and mask_mods do not run under torch.compile yet; "
            "write the score_mod in the graph DSL (graph, score, tensors) for compiled models")
    bprop_slots = _registry.slot_signature(bprop_names, bprop_dtypes)
    guarded = _registry.guarded_key(("torch-style",) + tuple(user_fns) + (score_mod_bprop,), ((), bprop_slots),
                                    shape)
    known = _registry.by_guard(guarded)
    if known is not None:
        return known, []
    recorder = Recorder(shape)
    fwd_out, captures = torch_style.trace(torch_fn, recorder)
    names = [f"capture {i}" for i in range(len(captures))]
    views = [torch_style.view_for(t, axes, shape, name) for name, (t, axes) in zip(names, captures)]
    for name, t in zip(names, views):
        if not (t.device == q.device or (t.device.type == "cpu" and t.numel() == 1)):
            raise ValueError(f"cudnn_flex: the score_mod indexes a tensor on {t.device} ({name}) but q "
                             f"is on {q.device}; move the captured tensor to q's device")
    slots = (_registry.slot_signature(names, [t.dtype for t, _ in captures]), bprop_slots)
    program = _registry.finish(recorder, fwd_out, score_mod_bprop, bprop_names, bprop_dtypes, slots)
    if guarded is not None and not captures:  # with captures, each call must find its tensors
        _registry.remember_guarded(guarded, program)
    return program, views
