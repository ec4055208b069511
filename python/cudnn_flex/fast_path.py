"""The shortcut of a repeated flex_attention call (issue 15: host time near SDPA's).

A cached call spent most of its host time on work whose answer it already knew: checking the same
mods, recording or finding their program, checking q, k and v in Python before the C++ op checked
them again. After a call has run in full on cuDNN, its mods and the shapes of q, k and v are
remembered with the program they gave, provided what the mods' guards read (taken before the full
path recorded them) still holds after the call. A later call with the same mods takes the
shortcut when it provably gets the same program:

- a plain function is the same object and everything its guard read is still the same objects
  (program/guard.py: snapshot, unchanged), so the guard, and the program, are what they were;
- an object with score_mod_graph_cache_key() promises the same key;
- score_mod tensors (and score_mod_bprop tensors) with the names and dtypes the program was
  recorded for (its input slots), read once with the key (key() takes the tensors in the same
  pass as their names and dtypes, and the call runs over those): each call's tensors pass the
  full path's own conditions again (no grad, with the key; device, shape and alignment in the
  op, which refuses them as check_tensor_dict does, or here where the op's scores or tensors are
  not the call's: _given_tensors) and its conversion (as_graph_input), since any other metadata
  may change from call to call without a new program; a tensor that fails one takes the full
  path, which says what is wrong;
- padded lengths pass the full path's own checks and completion (cudnn_seq_lens), and are kept
  as checked, with the kept full side of a side not given, while the same tensors keep their
  versions and storage (the full path reads their values once per version too; the op checks
  their metadata); the program does not depend on them;
- tensors in a torch-style mod's closure (`mods.alibi(slopes)`, `document_mask(doc)`) only where
  the full path finds its program by the guard (it reads no value of them): they are the same
  objects (unchanged) with the same metadata (guard.leaf_metadata), and their views are made as
  the full path makes them. Such an entry holds its functions weakly and goes with them, so that
  a closure made per batch does not keep its batch's tensors alive.

q, k and v are checked by the C++ op only; when it refuses them, the full path runs and raises
its own error, which names the argument. Everything else (no cuDNN for this dtype or device, a
scale that is not a float) takes the full path too, and so does every call under a
TorchFunctionMode, which sees the op and may answer it without running it (and its checks).

flex_attention_varlen's packed calls have a shortcut of their own (varlen_key, varlen_call): the
same mods and shapes, and the very same cu_seqlens tensors at the versions the full path read
(what it derived from their values, the lengths and the longest sequence, holds while they do).
Score_mod tensors and tensors in the mods' closures are taken as above, for the packed scores
[n, H, longest_q, longest_kv].
"""

from __future__ import annotations

import math
import types
import weakref
from typing import Callable, Optional

import torch

from . import _ops, _registry, record_call, torch_style
from ._validation import _FROM_BHSD, _TO_BHSD, cudnn_takes, graph_tensor_fits
from .padded_batch import completed_lengths, cudnn_seq_lens, is_kept
from .program import guard

_MAX_ENTRIES = 1024
# (mods, q.shape, k.shape, v.shape, layout, backend, the score_mod tensors' slots) -> _Entry
_entries: dict = {}
# mods -> what their guards read, as taken before a full call (reads_before); shared by the entries
# of every shape, so that a call at a new shape (a decode step) need not take it again
_snapshots: dict = {}
_MAX_SNAPSHOTS = 256


class _Entry:
    __slots__ = ("reads", "program", "mod_id", "bprop_id", "rows", "s_kv", "op_checks", "given_as_is", "leaves",
                 "plain", "slots", "views", "copied_once", "copies", "kept", "grad_leaf", "padded")

    def __init__(self, reads: tuple, program, captured: Optional[tuple], rows: int, s_kv: int,
                 op_checks: bool = False, given_as_is: bool = False):
        self.reads, self.program = reads, program
        self.mod_id, self.bprop_id = (program.mod_id, program.bprop_id) if program is not None else (0, 0)
        # The query rows and key count of the scores its calls have ([B, H, rows, s_kv]; the key's
        # shapes fix them): read here, as a tensor's .shape costs about 0.13 us a read.
        self.rows, self.s_kv = rows, s_kv
        # Whether the op runs its calls over their own scores (not one query row as two), and so
        # checks their given score_mod tensors against them itself (_op_checks).
        self.op_checks = op_checks
        # Whether its calls' given score_mod tensors may go to the op as key() took them (_as_given).
        self.given_as_is = given_as_is
        # The tensors in the mods' closures with their metadata, and (leaf index, axes) per input
        # slot (record_call.captured_slots); empty for mods that hold none.
        leaves, self.slots = captured or ((), ())
        self.leaves = tuple((t, guard.leaf_metadata(t)) for t in leaves)
        # Whether its calls' tensors are all plain torch.Tensors (given ones are, or key() declines;
        # views and copies of a plain leaf are): then the op need not look for a __torch_function__
        # (_ops.fwd's plain). A leaf's class is part of its metadata, checked first on every call.
        self.plain = all(type(t) is torch.Tensor for t in leaves)
        # Per slot, (the view mod_tensors made, the leaf's data pointer then) when it aliases the
        # leaf, else None.
        self.views = [None] * len(self.slots)
        # The leaves captured_views copies once (record_call.copied_once): it depends on their
        # metadata and the scores' shape, fixed for an entry; taken at its first call.
        self.copied_once = None
        # How the slots' float32 copies are made again (record_call.CopiedViews), when every
        # slot is one (a document mask over int64 ids); taken with copied_once, else None.
        self.copies = None
        # When every slot's tensor is a kept view: (those views, ((leaf, its data pointer then), ...)
        # for each leaf they alias), so that a call checks each leaf once, not each slot; else None.
        self.kept = None
        # Whether a leaf a slot reads requires grad (its metadata, checked first, says it still does).
        self.grad_leaf = any(self.leaves[i][0].requires_grad for i, _ in self.slots)
        # The lengths of the last padded call that passed cudnn_seq_lens's checks (_PassedLengths).
        self.padded = None

    def mod_tensors(self, q, s_kv: int) -> Optional[list]:
        """The input slots' tensors of a call with q ([B, H, Sq, D]) as the full path makes them,
        or None when a captured tensor's metadata changed in place since (the full path keys and
        records it again)."""
        for t, metadata in self.leaves:  # also those no slot reads: the program may read their shapes
            if guard.leaf_metadata(t) != metadata:
                return None
        if not self.slots:
            return []
        if self.grad_leaf and torch.is_grad_enabled():
            return None  # the full path refuses it (api.cudnn_call): cuDNN computes no gradient for it
        kept = self.kept
        if kept is not None:
            for leaf, pointer in kept[1]:
                if leaf.data_ptr() != pointer:
                    break
            else:
                return list(kept[0])  # a list of its own: a subclass's __torch_function__ sees (and may edit) the op's
            self.kept = None
        if self.copies is not None:  # every slot a float32 copy, made on every call (no view is kept)
            return self.copies.make()
        tensors, fresh = [None] * len(self.slots), []
        for n, (i, axes) in enumerate(self.slots):
            leaf, made = self.leaves[i][0], self.views[n]
            if made is not None and made[1] == leaf.data_ptr():
                tensors[n] = made[0]
            else:
                fresh.append((n, leaf, axes))
        if fresh:  # made together, as by the full path (a tensor two slots copy is copied once)
            shape = (q.shape[0], q.shape[1], q.shape[2], s_kv)
            if self.copied_once is None:  # over every slot: a slot it copies is never served a kept view
                found = [(self.leaves[i][0], axes) for i, axes in self.slots]
                self.copied_once = record_call.copied_once(found, shape)
                self.copies = record_call.CopiedViews.plan(found, shape, self.copied_once)
            views = record_call.captured_views([(_unheld(leaf), axes) for _, leaf, axes in fresh], shape, q,
                                               self.copied_once)
            for (n, leaf, _), view in zip(fresh, views):
                # A view that aliases its leaf (same dtype, same address) reads the values at each
                # launch: it is the view the full path makes while the leaf keeps its metadata and
                # storage. A copy (float32 of int64 ids, an aligned clone) is made every call, as
                # by the full path: it holds the values of one moment, and not every write to the
                # leaf is seen (a CUDA graph replay, DLPack, `.data`).
                aliases = view.dtype == leaf.dtype and view.data_ptr() == leaf.data_ptr()
                # (a slot that aliased its tensor before may be a clone now: no old view stays)
                self.views[n] = (view, leaf.data_ptr()) if aliases else None
                tensors[n] = view
        if all(made is not None for made in self.views):
            aliased = {id(self.leaves[i][0]): (self.leaves[i][0], made[1])
                       for (i, _), made in zip(self.slots, self.views)}
            self.kept = (tuple(tensors), tuple(aliased.values()))
        return tensors


def _unheld(leaf):
    """The captured tensor to make a slot's view of: a plain one that view_for aliases is detached
    first, so that the view the entry keeps holds its storage (and shares its version counter) but
    not the tensor itself, which torch.utils.swap_tensors (load_state_dict under torch's swap
    setting, Module.to) would then refuse. A tensor of a dtype view_for always copies stays itself
    (copied_once knows those by identity), and so does a subclass (its __torch_function__ sees
    what the full path does)."""
    if type(leaf) is not torch.Tensor or leaf.dtype in torch_style.COPIED_DTYPES:
        return leaf
    return leaf.detach()


def clear() -> None:
    """Forgets every remembered call (clear_cache())."""
    _entries.clear()
    _snapshots.clear()
    _varlen_entries.clear()


def _ident(fn: Optional[Callable]):
    """A mod as a part of the key: none as (), a plain function as itself (its reads are checked
    on every hit), any other callable by its score_mod_graph_cache_key() promise; None when it has
    none (the call takes the full path)."""
    if fn is None:
        return ()
    if type(fn) is types.FunctionType:
        return fn
    if isinstance(fn, type):
        return None  # a class where an instance belongs: the full path says so
    try:
        return _registry.explicit_key(fn)
    except Exception:  # noqa: BLE001  (a bad promise: the full path raises it, with its message)
        return None


def _mods_key(score_mod, score_mod_bprop, mask_mod):
    """The mods as the first part of a key (with whether the score_mod is marked torch-style,
    which decides how the full path reads it), or None when they allow no shortcut."""
    # Inline for the usual cases (a plain function, or none): this runs on every call.
    mod = score_mod if type(score_mod) is types.FunctionType else _ident(score_mod)
    if score_mod_bprop is None:
        bprop = ()
    elif (type(score_mod_bprop) is types.MethodType and type(score_mod) is types.MethodType and mod is not None
          and score_mod_bprop.__self__ is score_mod.__self__):
        # one object's two methods: its key read once
        bprop = _registry.sibling_key(mod, score_mod_bprop) or _ident(score_mod_bprop)
    else:
        bprop = _ident(score_mod_bprop)
    mask = () if mask_mod is None else mask_mod if type(mask_mod) is types.FunctionType else _ident(mask_mod)
    if mod is None or bprop is None or mask is None:
        return None
    if type(score_mod) is types.FunctionType:  # its own attributes (a miss of getattr() raises inside)
        marked = score_mod.__dict__.get("_cudnn_flex_torch_style", False)
    else:
        marked = score_mod is not None and getattr(score_mod, "_cudnn_flex_torch_style", False)
    return (mod, bprop, mask, marked)


def key(q, k, v, score_mod, score_mod_bprop, mask_mod, layout: str, backend: str, score_mod_tensors=None,
        score_mod_bprop_tensors=None) -> Optional[tuple]:
    """(the key of a call that could take the shortcut, the given tensors), or None. The key: the
    mods, the shapes of q, k and v (the program may depend on them, and a known shape passed the
    full path's checks), layout, backend, and the names and dtypes of the score_mod (and bprop)
    tensors, which decide the program's input slots. The given tensors: ([score_mod tensors],
    [bprop tensors]) in the dicts' order, taken in the same pass as their names and dtypes, so that
    the call runs the key's program over the very tensors its key was taken of (a dict another
    thread changes meanwhile is read once)."""
    if type(q) is not _TENSOR or type(k) is not _TENSOR or type(v) is not _TENSOR:
        return None  # a subclass may override __torch_function__, which the shortcut does not call
    mods = _mods_key(score_mod, score_mod_bprop, mask_mod)
    if mods is None:
        return None
    if score_mod_tensors is None and score_mod_bprop_tensors is None:
        return (mods, q.shape, k.shape, v.shape, layout, backend, _NO_TENSORS), _NO_TENSORS
    slots = _tensor_slots(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors)
    return None if slots is None else ((mods, q.shape, k.shape, v.shape, layout, backend, slots[0]), slots[1])


_TENSOR = torch.Tensor
_NO_TENSORS = ((), ())  # no score_mod (or bprop) tensors: the key's slots, and key()'s given tensors


def _tensor_slots(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors) -> Optional[tuple]:
    """((score_mod tensors' signature, bprop tensors' signature), (their tensors, as lists)) for
    key(), or None when the full path must look at them. (Calls without tensors, most, get
    _NO_TENSORS without it.)"""
    if (score_mod_tensors is not None and score_mod is None) or (score_mod_bprop_tensors is not None
                                                                 and score_mod_bprop is None):
        return None  # refused by the full path (an empty dict too, whose slots are no slots)
    mod = _slot_signature(score_mod_tensors)
    if mod is None:
        return None
    if score_mod_bprop_tensors is None:  # (the usual case: one signature to take)
        return (mod[0], ()), (mod[1], [])
    bprop = _slot_signature(score_mod_bprop_tensors)
    return None if bprop is None else ((mod[0], bprop[0]), (mod[1], bprop[1]))


def _slot_signature(tensors) -> Optional[tuple]:
    """(((name, dtype), ...), [tensor, ...]) of a dict of plain tensors, or None for anything else
    (the full path says what is wrong: of a tensor that requires grad, say; a tensor subclass may
    override __torch_function__, which the shortcut does not call)."""
    if tensors is None:
        return (), []
    if type(tensors) is not dict:
        return None
    signature, found = [], []
    for name, t in tensors.items():
        if type(t) is not _TENSOR or t.requires_grad:  # (the full path refuses one that requires grad)
            return None
        signature.append((name, t.dtype))
        found.append(t)
    return tuple(signature), found


def call(key, given: tuple, q, k, v, scale, layout: str, return_lse: bool, deterministic: bool, seq_lens_q=None,
         seq_lens_kv=None):
    """flex_attention's result by the shortcut, or None: then the full path runs. key and given:
    key()'s."""
    if torch._C._is_torch_function_mode_enabled():
        # A TorchFunctionMode sees the op (_ops._overridable) and may answer it without running it,
        # and so without the checks of q, k, v and the given tensors that the shortcut leaves to
        # the op: the full path makes them in Python first.
        return None
    entry = _entries.get(key)
    if entry is None or not guard.unchanged(entry.reads) or not cudnn_takes(q):
        return None
    scale = _op_scale(scale)
    if scale is _REFUSED:
        return None
    if layout != "bhsd":
        perm = _TO_BHSD[layout]
        q, k, v = q.permute(perm), k.permute(perm), v.permute(perm)
    try:
        # The op checks the score_mod tensors against q's scores itself, but where it runs one
        # query row as two (_ops.needs_two_rows, or a program cuDNN refused at one row: the op
        # may learn that after this entry was made): a tensor over two rows would pass there.
        op_checks = entry.op_checks and not (entry.rows == 1 and _ops._refused_at_one_row)
        if entry.leaves:
            tensors = _slot_tensors(entry, given, q, entry.s_kv, op_checks)
        elif given is _NO_TENSORS:
            tensors = ([], [])
        elif entry.given_as_is and op_checks:  # (most calls with tensors: a DSL mod's float or int32 tensors)
            tensors = given  # (the lists key() made for this call)
        else:
            tensors = _given_tensors(given, q, entry.s_kv, op_checks)
        if tensors is None:
            return None
        seq_lens, every_row_attends = [], False
        if seq_lens_q is not None or seq_lens_kv is not None:
            if not (_plain_or_none(seq_lens_q) and _plain_or_none(seq_lens_kv)):
                return None
            seq_lens, every_row_attends = _padded_lengths(entry, seq_lens_q, seq_lens_kv, q, k)
        out, lse = _ops.fwd(q, k, v, entry.program, entry.mod_id, entry.bprop_id, *tensors, scale,
                            bool(deterministic), seq_lens, every_row_attends=every_row_attends, rows=entry.rows,
                            plain=entry.plain and _all_plain(seq_lens))
    except (ValueError, TypeError, NotImplementedError):
        # Refused by a check or the op (NotImplementedError: no kernel for a tensor's layout, a
        # sparse score_mod tensor): the full path checks in Python and says what is wrong.
        return None
    if layout != "bhsd":
        out = out.permute(_FROM_BHSD[layout])
    return (out, lse) if return_lse else out


def _all_plain(lengths: list) -> bool:
    """Whether the lengths handed to the op are plain tensors: a kept full side, or lengths a
    packed call's full path computed (under a TorchFunctionMode, or of cu_seqlens of a subclass),
    may be of a subclass whose __torch_function__ must see the op."""
    for t in lengths:
        if type(t) is not _TENSOR:
            return False
    return True


def _slot_tensors(entry, given: tuple, q, s_kv: int, op_checks: bool) -> Optional[tuple]:
    """(mod tensors, bprop tensors) of a call for the op (q as [B, H, Sq, D]): the captured
    tensors' views (entry.mod_tensors), then the given score_mod tensors (key()'s); None when the
    full path must run. op_checks: as _given_tensors's."""
    mod_tensors = entry.mod_tensors(q, s_kv)
    if mod_tensors is None:
        return None
    if given is _NO_TENSORS:
        return mod_tensors, []
    inputs = _given_tensors(given, q, s_kv, op_checks)
    if inputs is None:
        return None
    if mod_tensors:
        inputs[0][:0] = mod_tensors
    return inputs


def _given_tensors(given: tuple, q, s_kv: int, op_checks: bool) -> Optional[tuple]:
    """([score_mod tensors], [bprop tensors]) of a call (key()'s `given`) as the full path hands
    them to the op, or None when the full path must look at them: a tensor on another device, of a
    shape that does not broadcast, or misaligned (the full path raises its error, which says what
    is wrong; one that requires grad gave no key). Their names and dtypes are the key's, which
    passed the full path's checks (check_tensor_dict) when it was remembered; no key holds a
    float64 slot (api.cudnn_call refuses it). With op_checks these are left to the op, which
    refuses them as the full path does (ops.cpp, graph_inputs; about 1 us of Python a tensor):
    only where it checks them against the scores [B, H, Sq, s_kv] of q itself, and but for the
    alignment of a tensor it is handed as a float32 copy."""
    full = None
    inputs = ([], [])
    for tensors, into in zip(given, inputs):
        for t in tensors:
            if not op_checks and not (t.is_cpu and t.numel() == 1):  # a host scalar is passed by value
                full = full or (q.shape[0], q.shape[1], q.shape[2], s_kv)
                if not graph_tensor_fits(t, q, full, compiling=False):  # (the shortcut never runs compiling)
                    return None
            if t.dtype in record_call.COPIED:
                if op_checks and t.is_cuda and t.data_ptr() % 16:
                    return None  # the op sees only its aligned float32 copy; the full path refuses the tensor itself
                t = record_call.as_graph_input(t)
            into.append(t)
    return inputs


def _plain_or_none(t) -> bool:
    return t is None or type(t) is torch.Tensor


def _padded_lengths(entry: _Entry, seq_lens_q, seq_lens_kv, q, k) -> tuple[list, bool]:
    """cudnn_seq_lens(seq_lens_q, seq_lens_kv, q, k) for a call of this entry (its shapes, which
    bound the lengths, are the key's): without the checks when the same tensors passed them at its
    last padded call and kept their versions and storage since, the full path's own rule for what
    it reads of them (_validation.once_per_version); whether every query row attends is what their
    checks found then. Their metadata is the op's to check again (int32 [B], unit stride, on q's
    device); a side not given is the kept full length, as there."""
    passed = entry.padded
    if passed is not None and passed.holds(seq_lens_q, seq_lens_kv):
        full = passed.full
        handed = completed_lengths(seq_lens_q, seq_lens_kv, q, k) if full is None else [
            seq_lens_q if full[0] is None else full[0], seq_lens_kv if full[1] is None else full[1]]
        return handed, passed.every_row_attends
    # Their state as the checks are about to read them (once_per_version's rule): a write during
    # or after the checks (another thread) leaves a state that no later call matches.
    before = _PassedLengths.taken(seq_lens_q, seq_lens_kv)
    seq_lens, every_row_attends = cudnn_seq_lens(seq_lens_q, seq_lens_kv, q, k)
    entry.padded = None
    if before is not None and before.handed(seq_lens_q, seq_lens_kv, seq_lens):
        before.every_row_attends = every_row_attends
        # The full side handed for a side not given, when it is a kept one (the entry's shapes fix
        # which): completing the lengths again costs about 1 us a call.
        full = tuple(None if given is not None else handed for given, handed in zip((seq_lens_q, seq_lens_kv), seq_lens))
        if all(side is None or is_kept(side, length) for side, length in zip(full, (q.shape[2], k.shape[2]))):
            before.full = full
        entry.padded = before
    return seq_lens, every_row_attends


class _PassedLengths:
    """Padded lengths that passed cudnn_seq_lens's checks: the given tensors (None where not
    given), held weakly (an entry keeps no batch's tensors alive), with their versions and data
    pointers then, and whether their values left every query row attending."""

    __slots__ = ("q", "kv", "state", "every_row_attends", "full")

    def __init__(self, seq_lens_q, seq_lens_kv):
        self.q = None if seq_lens_q is None else weakref.ref(seq_lens_q)
        self.kv = None if seq_lens_kv is None else weakref.ref(seq_lens_kv)
        self.state = _lengths_state(seq_lens_q, seq_lens_kv)
        self.every_row_attends = False  # set by their checks
        # Per side, the kept full side handed for it when it was not given (None for a given side),
        # or None when a side not given had one made for its call only (made again each call).
        self.full = None

    @classmethod
    def taken(cls, seq_lens_q, seq_lens_kv) -> Optional["_PassedLengths"]:
        """The lengths as they are now, or None for an inference tensor (no version counter: the
        full path reads it on every call)."""
        for given in (seq_lens_q, seq_lens_kv):
            if given is not None and given.is_inference():
                return None
        return cls(seq_lens_q, seq_lens_kv)

    @staticmethod
    def handed(seq_lens_q, seq_lens_kv, seq_lens: list) -> bool:
        """Whether the checks handed the given tensors themselves to the op, not a copy of this
        moment's values (of lengths that are not contiguous), which a later call must make again."""
        return all(given is None or handed is given for given, handed in zip((seq_lens_q, seq_lens_kv), seq_lens))

    def holds(self, seq_lens_q, seq_lens_kv) -> bool:
        """Whether a call's lengths are these: the same sides given, the same tensors, at the same
        versions and data pointers. (The sides first: a tensor gone since reads as None, and
        another side's tensor made where it was could have its state.)"""
        if (seq_lens_q is None) != (self.q is None) or (seq_lens_kv is None) != (self.kv is None):
            return False
        if (self.q is not None and self.q() is not seq_lens_q) or (self.kv is not None and self.kv() is not seq_lens_kv):
            return False
        return _lengths_state(seq_lens_q, seq_lens_kv) == self.state


def _lengths_state(seq_lens_q, seq_lens_kv) -> tuple:
    """((version, data pointer) of each side given): spelled out, as a generator costs ~0.35 us
    of a hit's ~1.6."""
    if seq_lens_q is None:
        return ((seq_lens_kv._version, seq_lens_kv.data_ptr()),)
    if seq_lens_kv is None:
        return ((seq_lens_q._version, seq_lens_q.data_ptr()),)
    return ((seq_lens_q._version, seq_lens_q.data_ptr()), (seq_lens_kv._version, seq_lens_kv.data_ptr()))


_REFUSED = object()


def _op_scale(scale):
    """The scale as the op takes it (None or a finite float), or _REFUSED: a bool, NaN or other
    type, which the full path names in its error."""
    if scale is None or (type(scale) is float and math.isfinite(scale)):
        return scale
    return float(scale) if type(scale) is int else _REFUSED


def reads_before(key, score_mod, score_mod_bprop, mask_mod) -> Optional[tuple]:
    """What the full path's program lookup is about to read of the mods, taken before it runs (a
    snapshot taken after could see what a mod changed in its own closure while it was recorded,
    or another thread while cuDNN built), or None when the mods allow no shortcut."""
    known = _snapshots.get(key[0])
    if known is not None and guard.unchanged(known):
        return known
    return _reads(score_mod, score_mod_bprop, mask_mod)


def remember(key, reads: Optional[tuple], program, score_mod, score_mod_bprop, mask_mod, q, s_kv: int) -> None:
    """After a call (q as [B, H, Sq, D]) ran in full on cuDNN: remembers its program for the
    shortcut, if its mods allow one and nothing they read changed while it ran. Nothing is kept
    for mods that allow none (the key would hold them, and what their closures hold, alive)."""
    if reads is None:
        return  # the mods allow no shortcut
    captured = _captured(key, program, score_mod, score_mod_bprop, mask_mod, q, s_kv)
    if captured is None:
        return
    key = _may_remember(key, reads, program, captured, _entries)
    if key is not None:
        rows = q.shape[2]
        op_checks = _op_checks(program, rows, s_kv)
        _bounded_put(_entries, key, _Entry(reads, program, captured, rows, s_kv, op_checks,
                                           _as_given(key[6])), _MAX_ENTRIES)


def _op_checks(program, rows: int, s_kv: int) -> bool:
    """Whether the op runs a call of this program (None: no mods) over the call's own scores [B, H,
    rows, s_kv]: not when it runs one query row as two (_ops.needs_two_rows)."""
    return rows != 1 or program is None or not _ops.needs_two_rows(program.reads_head_or_key, s_kv)


def _as_given(slots: tuple) -> bool:
    """Whether the given score_mod (and bprop) tensors of a call with these slots (the key's names
    and dtypes) may go to the op as key() took them (each checked for grad there): none is of a
    dtype handed as a float32 copy. They do where the op checks them against the call's scores
    itself too (call(); else _given_tensors checks them)."""
    return not any(dtype in record_call.COPIED for part in slots for _, dtype in part)


def _captured(key, program, score_mod, score_mod_bprop, mask_mod, q, s_kv: int) -> Optional[tuple]:
    """The tensors in the mods' closures and where each input slot finds its own
    (record_call.captured_slots), () when they hold none, or None when the call may not be
    remembered. Tensors in a torch-style mod's closure allow a shortcut only where its guard finds
    the program: else a slot's tensor is made inside the mod, or a value is read (`t.item()`),
    and the full path traces the mods every call."""
    if not _captures(program, key, len(key[6][0])):
        return ()
    return record_call.captured_slots(score_mod, score_mod_bprop, mask_mod, q, s_kv, program)


def _may_remember(key, reads: Optional[tuple], program, captured: tuple, table: dict):
    """The key under which a call that ran in full may be remembered in `table` (remember,
    remember_varlen; each has decided about tensors in the mods' closures, _captured), or None:
    when its mods allow no shortcut, something they read changed while it ran, or its program's
    input slots are not the key's. Keeps what they read for their calls at other shapes. For mods
    that hold tensors (`captured`), the key holds the functions weakly (_WeakFn)."""
    if reads is None or not guard.unchanged(reads) or not _slots_of(program, key[6]):
        return None
    if captured:
        key = _held_weakly(key, table)
    _bounded_put(_snapshots, key[0], reads, _MAX_SNAPSHOTS)
    return key


def _slots_of(program, slots: tuple) -> bool:
    """Whether the program was recorded for the key's score_mod (and bprop) tensors, their names
    and dtypes: a dict changed while the full path ran (another thread) gave it other slots. (A
    torch-style program's mod slots are its captured tensors, and it is given no score_mod
    tensors; a DSL program's are the given ones, and captured_slots refuses a DSL program with
    slots the key has not: _captured.)"""
    if program is None:
        return True  # no mods: no tensors (key() refuses tensors without their mod)
    given, bprop = (tuple((name, str(dtype)) for name, dtype in part) for part in slots)
    return program.bprop_slots == bprop and (not given or program.mod_slots == given)


def _captures(program, key, given: int) -> bool:
    """Whether a call's program has input slots besides the `given` score_mod tensors (tensors its
    torch-style mods captured or made; a torch-style mod is given none) or the plain functions
    among its mods hold tensors (in their closures, defaults, or the functions and lists there; a
    value read with `t.item()` leaves no slot)."""
    if program is None:
        return False
    if len(program.mod_slots) > given:
        return True
    leaves: list = []
    for fn in key[0][:3]:
        if type(fn) is types.FunctionType:
            guard.key(fn, leaves=leaves)
    return bool(leaves)


class _WeakFn:
    """A function in a remembered key, held weakly: equal to the function itself while it lives
    (a call's key, which holds the function, finds the entry), gone with it. Its entries are
    forgotten when the function goes (forget)."""

    __slots__ = ("ref", "hash", "__weakref__")

    def __init__(self, fn: types.FunctionType, forget: Callable):
        self.ref, self.hash = weakref.ref(fn, forget), hash(fn)

    def __hash__(self):
        return self.hash

    def __eq__(self, other):
        fn = self.ref()
        if fn is None:
            return other is self  # a key found by its own object only: the callback pops it
        return other is fn or (type(other) is _WeakFn and other.ref() is fn)


def _held_weakly(key: tuple, entries: dict) -> tuple:
    """key with the plain functions among its mods held weakly; when one goes, the entry under
    this key in `entries` (_entries or _varlen_entries) and its mods' snapshot are forgotten."""
    stored: list = []

    def forget(_ref, entries=entries, snapshots=_snapshots):  # the tables themselves: at exit the module's names are None
        # Found by their own key objects only (a dead _WeakFn equals nothing else); an equal key
        # stored before keeps its own object, whose _WeakFn forgets it.
        entries.pop(stored[0], None)
        snapshots.pop(stored[0][0], None)

    mods = key[0]
    weak = tuple(_WeakFn(m, forget) if type(m) is types.FunctionType else m for m in mods[:3]) + mods[3:]
    stored.append((weak,) + key[1:])
    return stored[0]


# Packed sequences (flex_attention_varlen). What the full path reads of cu_seqlens (the number of
# sequences, the lengths, the longest) holds while the same tensors keep their versions, the rule
# of its own host reads (_validation.once_per_version); the entry refers to them weakly, so that
# it keeps no batch's cu_seqlens alive. (mods, q, k, v shapes, max_seqlen_q, max_seqlen_kv, the
# score_mod tensors' slots) -> _VarlenEntry
_varlen_entries: dict = {}
_MAX_VARLEN_ENTRIES = 256


class _VarlenEntry(_Entry):
    __slots__ = ("cu_q", "cu_kv", "versions", "seq_lens", "max_seqlens", "queries")

    def __init__(self, reads, program, captured, queries, cu_q, cu_kv, versions, seq_lens, max_seqlens):
        super().__init__(reads, program, captured, queries.shape[2], max_seqlens[1])
        self.cu_q, self.cu_kv = weakref.ref(cu_q), weakref.ref(cu_kv)
        self.versions, self.seq_lens, self.max_seqlens = versions, seq_lens, max_seqlens
        # The full path's stand-in for the queries as a padded batch [n, H, longest_q, D]: the
        # shape and device the score_mod tensors and captured tensors' views were made for.
        self.queries = queries


def varlen_key(q, k, v, score_mod, score_mod_bprop, mask_mod, max_seqlen_q, max_seqlen_kv, score_mod_tensors=None,
               score_mod_bprop_tensors=None) -> Optional[tuple]:
    """(the key of a flex_attention_varlen call that could take the shortcut, the given tensors),
    or None: as key()'s, with the max_seqlens in place of layout and backend."""
    if type(q) is not _TENSOR or type(k) is not _TENSOR or type(v) is not _TENSOR:
        return None
    if not (max_seqlen_q is None or type(max_seqlen_q) is int) or not (max_seqlen_kv is None
                                                                       or type(max_seqlen_kv) is int):
        return None  # a numpy or tensor integer: the full path reads it
    mods = _mods_key(score_mod, score_mod_bprop, mask_mod)
    if mods is None:
        return None
    if score_mod_tensors is None and score_mod_bprop_tensors is None:
        return (mods, q.shape, k.shape, v.shape, max_seqlen_q, max_seqlen_kv, _NO_TENSORS), _NO_TENSORS
    slots = _tensor_slots(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors)
    return None if slots is None else ((mods, q.shape, k.shape, v.shape, max_seqlen_q, max_seqlen_kv, slots[0]),
                                       slots[1])


def versions(cu_seqlens_q, cu_seqlens_kv) -> Optional[tuple]:
    """The versions and data pointers of the cu_seqlens as a full call is about to read them
    (`t.data = u` swaps the storage without a version bump), or None: inference tensors have no
    version counter (the full path reads them every call)."""
    for t in (cu_seqlens_q, cu_seqlens_kv):
        if type(t) is not torch.Tensor or t.is_inference():
            return None
    return _state(cu_seqlens_q, cu_seqlens_kv)


def _state(cu_seqlens_q, cu_seqlens_kv) -> tuple:
    return cu_seqlens_q._version, cu_seqlens_q.data_ptr(), cu_seqlens_kv._version, cu_seqlens_kv.data_ptr()


def varlen_call(key, given: tuple, q, k, v, cu_seqlens_q, cu_seqlens_kv, scale, deterministic):
    """(out [total_q, H, D_v], cuDNN's lse [n, H, max_q], max_q) by the shortcut, or None: then
    the full path runs (key and given: varlen_key()'s). (max_q is at least 2, varlen.py's one
    query row run as two; with one query per sequence, a longer lse row picks the same rows.)"""
    if torch._C._is_torch_function_mode_enabled():
        return None  # as in call()
    entry = _varlen_entries.get(key)
    if (entry is None or entry.cu_q() is not cu_seqlens_q or entry.cu_kv() is not cu_seqlens_kv
            or _state(cu_seqlens_q, cu_seqlens_kv) != entry.versions
            or not guard.unchanged(entry.reads) or not cudnn_takes(q)):
        return None
    scale = _op_scale(scale)
    # A captured call computes the lengths in the graph (varlen._replayable).
    if scale is _REFUSED or (q.is_cuda and torch._C._cuda_isCurrentStreamCapturing()):
        return None
    try:
        # The tensors are made and checked for the scores [n, H, longest_q, longest_kv] of the
        # stand-in the full path recorded the mods for (on the device of the same cu_seqlens,
        # which the op checks against q's).
        # (Checked here, not by the op: its longest query may be wider than the stand-in's, one
        # row run as two.)
        tensors = ([], []) if given is _NO_TENSORS and not entry.leaves else _slot_tensors(
            entry, given, entry.queries, entry.s_kv, False)
        if tensors is None:
            return None
        out, lse = _ops.fwd(q, k, v, entry.program, entry.mod_id, entry.bprop_id, *tensors, scale,
                            bool(deterministic), entry.seq_lens, [cu_seqlens_q, cu_seqlens_kv], entry.max_seqlens,
                            plain=entry.plain and type(cu_seqlens_q) is _TENSOR and type(cu_seqlens_kv) is _TENSOR
                            and _all_plain(entry.seq_lens))
    except (ValueError, TypeError):
        return None  # e.g. k and v with a gap between tokens: the full path copies them, or says what is wrong
    return out, lse, entry.max_seqlens[0]


def remember_varlen(key, reads: Optional[tuple], program, score_mod, score_mod_bprop, mask_mod, queries,
                    cu_seqlens_q, cu_seqlens_kv, before: Optional[tuple], seq_lens: list, max_seqlens: list) -> None:
    """After a flex_attention_varlen call ran in full on cuDNN's packed path, with q, k and v read
    in place: remembers it for the shortcut, if its mods allow one and nothing they read changed,
    under the versions of the cu_seqlens the call read (`before`: a change during the call leaves
    an entry no later call matches). queries: the stand-in [n, H, longest_q, D] the full path
    recorded the mods for; max_seqlens[1] is the longest key sequence."""
    if before is None:
        return
    captured = _captured(key, program, score_mod, score_mod_bprop, mask_mod, queries, max_seqlens[1])
    if captured is None:
        return
    key = _may_remember(key, reads, program, captured, _varlen_entries)
    if key is None:
        return
    _bounded_put(_varlen_entries, key, _VarlenEntry(reads, program, captured, queries, cu_seqlens_q, cu_seqlens_kv,
                                                    before, list(seq_lens), list(max_seqlens)), _MAX_VARLEN_ENTRIES)


def _bounded_put(table: dict, key, value, capacity: int) -> None:
    if key not in table and len(table) >= capacity:
        try:  # the oldest goes; a forgotten call takes the full path once
            del table[next(iter(table))]
        except (RuntimeError, StopIteration, KeyError):  # another thread changed the table meanwhile
            pass
    table[key] = value


def _reads(score_mod, score_mod_bprop, mask_mod) -> Optional[tuple]:
    """What the full path's program lookup read of the mods, or None when it recorded them (a
    repeat would record them again: no shortcut)."""
    fns = [fn for fn in (score_mod, score_mod_bprop, mask_mod) if fn is not None]
    if all(type(fn) is types.FunctionType for fn in fns):
        reads = []  # the guard of every mod (record_call: DSL or torch-style alike)
        for fn in fns:
            snapshot = guard.snapshot(fn, leaves=[])  # tensors: remember() says whether they may be
            if snapshot is None:
                return None
            reads.extend(snapshot)
        return tuple(reads)
    # Keyed objects: the program of a DSL score_mod (and bprop) under their promise; the key's
    # equality is checked by the lookup. A torch-style or a mask_mod call traces them instead.
    promised = mask_mod is None and not any(type(fn) is types.FunctionType for fn in fns)
    return () if promised and not torch_style.is_torch_style(score_mod) else None
