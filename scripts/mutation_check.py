"""Plants small, plausible bugs in a scratch copy of the package, one at a time, and runs the CPU
suite on each: every bug must make it fail. A bug that survives is a hole in the tests.

    python3 scripts/mutation_check.py            # all bugs, as many at once as there are cores
    python3 scripts/mutation_check.py -k softcap # the bugs whose name contains 'softcap'
    python3 scripts/mutation_check.py --record   # also remember the test that caught each bug

Each bug first runs the one test that caught it last time (scripts/mutation_catchers.json), then,
if that test passes, the whole suite up to its first failure: the verdict is the suite's either
way, and a bug caught by its remembered test costs a few seconds instead of the suite up to it.

Each bug is a text replacement that must match exactly once in the current code (a mismatch is
an error: update the bug with the code). Only Python is mutated; the C++ key and cache have their
own planted-bug checks in gtest. Run by scripts/test.sh, so by CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = "python/cudnn_flex/"
TESTS = "tests/python"
# For each bug, the test that failed first when it was last planted: tried first, so that a bug
# costs one test instead of the suite up to it. A stale entry only costs time (see try_bug).
CATCHERS = os.path.join(ROOT, "scripts", "mutation_catchers.json")

# (what a user would suffer, file, text, replacement)
MUTATIONS = [
    ("sliding_window off by one", P + "mods/sliding_window.py", "(distance < window)", "(distance <= window)"),
    ("softcap without /cap", P + "mods/softcap.py", "torch.tanh(score / cap) * cap", "torch.tanh(score) * cap"),
    ("softcap cap doubled", P + "mods/softcap.py", "torch.tanh(score / cap) * cap", "torch.tanh(score / cap) * (2 * cap)"),
    ("alibi slopes shifted by one head", P + "mods/alibi.py", "torch.arange(1, heads + 1,", "torch.arange(0, heads,"),
    ("prefix_lm off by one", P + "mods/prefix_lm.py", "(kv_idx < prefix_length)", "(kv_idx <= prefix_length)"),
    ("relative_bias scale ignored", P + "mods/relative_bias.py", "(q_idx - kv_idx) * scale", "(q_idx - kv_idx)"),
    ("compose order reversed", P + "mods/combine.py", "for fn in score_mods:", "for fn in reversed(score_mods):"),
    ("document_mask per batch reads batch 0", P + "mods/document.py", "doc_ids[b, q_idx] == doc_ids[b, kv_idx]", "doc_ids[0, q_idx] == doc_ids[0, kv_idx]"),
    ("dsl SlidingWindow off by one", P + "mods/sliding_window.py", "graph.cmp_lt(distance, float(self.window))", "graph.cmp_le(distance, float(self.window))"),
    ("dsl relative_bias scale ignored", P + "mods/relative_bias.py", "if self.scale != 1.0:", "if False:"),
    ("dsl Softcap backward wrong op", P + "mods/softcap.py", "graph.tanh_backward(d_p, self._before_tanh)", "graph.sigmoid_backward(d_p, self._before_tanh)"),
    ("derivative of sin negated", P + "program/ops.py", '"sin": (torch.sin, lambda e, g, a, out, at: e.mul(g, e.cos(a))),', '"sin": (torch.sin, lambda e, g, a, out, at: e.neg(e.mul(g, e.cos(a)))),'),
    ("derivative of cos sign", P + "program/ops.py", "lambda e, g, a, out, at: e.neg(e.mul(g, e.sin(a)))", "lambda e, g, a, out, at: e.mul(g, e.sin(a))"),
    ("derivative of a/b wrt b sign", P + "program/ops.py", "lambda: emit.neg(emit.div(emit.mul(g, out), b))", "lambda: emit.div(emit.mul(g, out), b)"),
    ("derivative of a/b wrt a times b", P + "program/ops.py", "return (lambda: emit.div(g, b), lambda", "return (lambda: emit.mul(g, b), lambda"),
    ("derivative of max: ge -> le", P + "program/ops.py", "return (lambda: emit.binary_select(g, 0.0, emit.cmp_ge(a, b)),", "return (lambda: emit.binary_select(g, 0.0, emit.cmp_le(a, b)),"),
    ("derivative of pow wrt exponent without log", P + "program/ops.py", "lambda: emit.mul(emit.mul(g, out), emit.log(a)))", "lambda: emit.mul(g, out))"),
    ("derivative of rsqrt factor 0.5", P + "program/ops.py", "e.mul(e.div(e.mul(g, out), a), -0.5)", "e.mul(e.div(e.mul(g, out), a), 0.5)"),
    ("derivative of erf without 2/sqrt(pi)", P + "program/ops.py", "e.mul(g, e.mul(e.exp(e.neg(e.mul(a, a))), _ERF_K))", "e.mul(g, e.exp(e.neg(e.mul(a, a))))"),
    ("finite select fill passes dP", P + "program/ops.py", 'if _is_number(other) and other == float("-inf"):', "if _is_number(other):"),
    ("torch maximum/minimum swapped", P + "torch_style.py", 'torch.maximum: _minmax("max"), torch.minimum: _minmax("min"),', 'torch.maximum: _minmax("min"), torch.minimum: _minmax("max"),'),
    ("torch rsub not reversed", P + "torch_style.py", "T.__rsub__: _reversed(sub)", "T.__rsub__: sub"),
    ("swapped comparison not mirrored", P + "torch_style.py", '"cmp_gt": "cmp_lt", "cmp_lt": "cmp_gt"', '"cmp_gt": "cmp_gt", "cmp_lt": "cmp_lt"'),
    ("GQA heads tiled instead of interleaved", P + "reference.py", "t.repeat_interleave(h_q // t.shape[1], dim=1)", "t.repeat(1, h_q // t.shape[1], 1, 1)"),
    ("lse before the score_mod", P + "reference.py", "    lse = torch.logsumexp(scores, dim=-1)\n", "    lse = torch.logsumexp((qf @ kf.transpose(-1, -2)) * scale, dim=-1)\n"),
    ("fully masked rows not zeroed", P + "reference.py", "probs = torch.where(empty_row, 0.0, torch.softmax(torch.where(empty_row, 0.0, scores), dim=-1))", "probs = torch.softmax(scores, dim=-1)"),
    ("index arithmetic in INT32 by default", P + "reference.py", "    def _compute(self, compute_data_type, default=data_type.FLOAT):\n        dt = default if", "    def _compute(self, compute_data_type, default=data_type.FLOAT):\n        default = data_type.INT32\n        dt = default if"),
    ("empty inputs refused", P + "_validation.py", "    elif d == 0:\n", "    elif 0 in (b, s_q, s_k):\n        problem = 'empty input'\n    elif d == 0:\n"),
    ("d_v != d refused", P + "_validation.py", "    elif d == 0:\n", "    elif v.shape[3] != d:\n        problem = 'v head dim'\n    elif d == 0:\n"),
    ("alibi sign (q - kv), code", P + "mods/alibi.py", "return score + slopes[h] * (kv_idx - q_idx)", "return score + slopes[h] * (q_idx - kv_idx)"),
    ("and_masks drops masks after the second", P + "mods/combine.py", "for fn in mask_mods[1:]:\n            result = result & fn", "for fn in mask_mods[1:2]:\n            result = result & fn"),
    ("or_masks drops masks after the second", P + "mods/combine.py", "for fn in mask_mods[1:]:\n            result = result | fn", "for fn in mask_mods[1:2]:\n            result = result | fn"),
    ("clamp min and max swapped", P + "torch_style.py", "out = trace.rec.max(out, _operand(trace, min, \"clamp\"))", "out = trace.rec.min(out, _operand(trace, min, \"clamp\"))"),
    ("torch.where branches swapped", P + "torch_style.py", "binary_select(_operand(trace, a, \"torch.where\"),\n                                             _operand(trace, b, \"torch.where\"), mask)", "binary_select(_operand(trace, b, \"torch.where\"),\n                                             _operand(trace, a, \"torch.where\"), mask)"),
    ("~ of a bool mask ignored", P + "torch_style.py", "return _p(trace, trace.rec.logical_not(_mask(trace, x, \"~\")), \"bool\")", "return _p(trace, _mask(trace, x, \"~\"), \"bool\")"),
    ("captured tensor strides of the first dim", P + "torch_style.py", "sizes[axis], strides[axis] = full[axis], t.stride(dim)", "sizes[axis], strides[axis] = full[axis], t.stride(0)"),
    ("default scale 1/D instead of 1/sqrt(D)", P + "reference.py", "        scale = 1.0 / math.sqrt(q.shape[-1])", "        scale = 1.0 / q.shape[-1]"),
    ("recorded index type FLOAT", P + "program/record.py", 'return {"int": data_type.INT32, "bool": data_type.BOOLEAN}.get(kind, data_type.FLOAT)', 'return {"int": data_type.FLOAT, "bool": data_type.BOOLEAN}.get(kind, data_type.FLOAT)'),
    ("q_idx and kv_idx swapped in torch-style mods", P + "torch_style.py", "[Proxy(tr, axis=a, kind=\"int\") for a in range(4)]", "[Proxy(tr, axis=a, kind=\"int\") for a in (0, 1, 3, 2)]"),
    ("relu derivative: clip ignored", P + "program/ops.py", "return g if upper_clip is None else torch.where(x < upper_clip, g, torch.zeros_like(x))", "return g"),
    ("k/v sequence check dropped", P + "_validation.py", "    elif s_k != s_v:\n", "    elif False:\n"),
    ("inference tensors remembered by a version they lack", P + "_validation.py", "    if t.is_inference():\n        return compute()\n", ""),
    ("padding off by one", P + "reference.py",
     "(torch.arange(size, device=device) >= lengths", "(torch.arange(size, device=device) > lengths"),
    ("varlen reads the next sequence's last key", P + "varlen.py",
     "seq_lens_kv=seq_kv.lengths)", "seq_lens_kv=seq_kv.lengths + 1)"),
    ("varlen takes packings of several lengths for a batch of views", P + "varlen.py",
     "all(n == longest for n in lengths)", "all(n <= longest for n in lengths)"),
]

# The recorded program and graph identity (the correctness issue): a stale graph is a wrong
# answer with no error.
MUTATIONS += [
    ("constants left out of the program key", P + "program/record.py",
     'args = tuple(("c", v.hex()) if kind == "c" else (kind, v) for kind, v in self.args)',
     'args = tuple(("c", 0) if kind == "c" else (kind, v) for kind, v in self.args)'),
    ("attributes left out of the program key", P + "program/record.py",
     "return (self.op, args, attrs, dtype)", "return (self.op, args, (), dtype)"),
    ("one slot per captured tensor whatever its indexing", P + "torch_style.py",
     "key = (id(t), axes)", "key = id(t)"),
    ("promise table ignores the bprop", P + "_registry.py",
     "promise = (mod_key, bprop_key, slots)", "promise = (mod_key, slots)"),
    ("clear_cache keeps the programs", P + "_registry.py",
     "        _by_recording.clear()\n", ""),
    ("% lowered as C fmod", P + "torch_style.py",
     "T.__mod__: _remainder,", "T.__mod__: _fmod,"),
    ("& on integers is logical", P + "torch_style.py",
     "        if kinds == {\"bool\"}:", "        if True:"),
    ("floor division truncates toward zero", P + "torch_style.py",
     "    rem = _remainder(trace, a, b).value\n",
     "    rem = _fmod(trace, a, b).value\n"),
    ("bool captured tensors used as numbers", P + "torch_style.py",
     "            value = self.rec.cmp_neq(value, 0.0)  # passed as float32 (see view_for)\n", ""),
    ("mixed INT32/FLOAT compare not rewritten", P + "program/replay.py",
     "                args[0] = graph.identity(args[0])", "                pass"),
    ("finite fills not lowered", P + "program/replay.py",
     "            return _LARGEST_SAFE_FILL\n", "            return value\n"),
    ("select with a constant first not flipped", P + "program/replay.py",
     '        return self.for_cudnn and node.op == "binary_select" and', '        return False and node.op == "binary_select" and'),
    ("constant minus score lifted", P + "program/replay.py",
     "                return graph.add(graph.neg(args[1]), args[0], **attrs)", "                pass"),
    ("integer powers left to POW", P + "program/replay.py",
     "            return self._power(args[0], int(arg_kinds[1][1]), attrs)", "            pass"),
    ("compiled torch-style mod not run inline (its reads unguarded)", P + "record_call.py",
     "    torch_fn(torch.zeros(1, dtype=torch.float32, device=q.device), index, index, index, index)\n", ""),
    ("recording left to dynamo after a graph break", P + "record_call.py",
     "@torch.compiler.disable\ndef _record_for_compile", "def _record_for_compile"),
    ("gather reused after its tensors changed", P + "gather.py",
     "ref() is u and version == u._version", "ref() is u"),
    ("cached captures: host value reads not checked", P + "record_call.py",
     "        recipe = _slots_in_leaves(found, leaves)\n        if recipe is not None and (not leaves or",
     "        recipe = _slots_in_leaves(found, leaves)\n        if recipe is not None and (True or"),
    ("cached captures keyed without strides", P + "program/guard.py",
     "t.dtype, t.shape, t.stride(), t.device", "t.dtype, t.shape, t.device"),
    ("a captured tensor's class changed in place unseen", P + "program/guard.py",
     "    return type(t), t.dtype, t.shape,", "    return t.dtype, t.shape,"),
    ("gather made in inference mode reused", P + "gather.py",
     "reusable = not (torch.is_inference_mode_enabled() or", "reusable = not (False or"),
    ("recognised band lowered dense", P + "masks/lower.py",
     "    found = tile_skipping_band(program)\n", "    found = None\n"),
    ("guard ignores module globals", P + "program/guard.py",
     "            if not (isinstance(value, types.ModuleType) and value.__name__ in _LIBRARIES):\n                return False",
     "            pass"),
    ("guard ignores imports inside the mod", P + "program/guard.py",
     'if any(ins.opname in ("IMPORT_NAME", "IMPORT_FROM") for ins in dis.get_instructions(code)):\n        return None',
     "if False:\n        return None"),
    ("guard leaves out the shapes", P + "_registry.py",
     "return (tuple(keys), slots, tuple(shape))", "return (tuple(keys), slots)"),
    ("guard ignores closure values", P + "program/guard.py",
     "    for value in values:", "    for value in []:"),
    ("mask recognition: strict > read as >=", P + "masks/recognize.py",
     '">": (bound + 1, None)', '">": (bound, None)'),
    ("mask recognition ignores an OR", P + "masks/recognize.py",
     '    if node.op == "logical_and":', '    if node.op in ("logical_and", "logical_or"):'),
    ("shortcut ignores closure cells", P + "program/guard.py",
     "                    if cell.cell_contents is not value:", "                    if False:"),
    ("shortcut ignores globals defined later", P + "program/guard.py",
     "        if self.absent and not self.global_names.isdisjoint(self.absent):", "        if False:"),
    ("shortcut ignores library globals rebound", P + "program/guard.py",
     "                if get(name, _MISSING) is not value:", "                if False:"),
    ("shortcut ignores lists changed in place", P + "program/guard.py",
     "        return len(self.items) == len(self.seen) and all(", "        return True or all("),
    ("shortcut ignores replaced defaults", P + "program/guard.py",
     " or fn.__defaults__ is not self.defaults or", " or"),
    ("shortcut ignores functions inside the closure", P + "program/guard.py",
     "        return key(value, depth + 1, leaves, reads)", "        return key(value, depth + 1, leaves)"),
    ("shortcut skips a subclass leaf's __torch_function__", P + "fast_path.py",
     "self.plain = all(type(t) is torch.Tensor for t in leaves)", "self.plain = True"),
    ("varlen shortcut skips cu_seqlens' __torch_function__", P + "fast_path.py",
     "plain=entry.plain and type(cu_seqlens_q) is _TENSOR and type(cu_seqlens_kv) is _TENSOR\n", "plain=entry.plain\n"),
    ("varlen shortcut hands its kept lengths of a subclass to _C.fwd", P + "fast_path.py",
     "            and _all_plain(entry.seq_lens))", "            and True)"),
    ("shortcut hands padded lengths of a subclass to _C.fwd", P + "fast_path.py",
     "plain=entry.plain and _all_plain(seq_lens))", "plain=entry.plain)"),
    ("guard trusts a globals dict subclass's keys()", P + "program/guard.py",
     "        plain = type(self.globals) is dict\n", "        plain = True\n"),
    ("op never looks for a __torch_function__", P + "_ops.py",
     "compiling or not plain and _overridable(", "compiling or not True and _overridable("),
    ("shortcut keyed without shapes", P + "fast_path.py",
     "        return (mods, q.shape, k.shape, v.shape, layout, backend, _NO_TENSORS)",
     "        return (mods, layout, backend, None, None, None, _NO_TENSORS)"),
    ("shortcut keyed without the score_mod tensors' slots", P + "fast_path.py",
     "(mods, q.shape, k.shape, v.shape, layout, backend, slots[0]), slots[1])",
     "(mods, q.shape, k.shape, v.shape, layout, backend, _NO_TENSORS), slots[1])"),
    ("shortcut skips the score_mod tensors' checks", P + "fast_path.py",
     "                if not graph_tensor_fits(t, q, full, compiling=False):  # (the shortcut never runs compiling)\n                    return None",
     "                if False:\n                    return None"),
    ("shortcut leaves a one-row call's tensors to the op", P + "fast_path.py",
     "            tensors = _given_tensors(given, q, entry.s_kv, op_checks)",
     "            tensors = _given_tensors(given, q, entry.s_kv, True)"),
    ("varlen shortcut leaves its tensors to the op", P + "fast_path.py",
     "            entry, given, entry.queries, entry.s_kv, False)",
     "            entry, given, entry.queries, entry.s_kv, True)"),
    ("shortcut takes lengths as checked without their versions", P + "fast_path.py",
     "        return _lengths_state(seq_lens_q, seq_lens_kv) == self.state", "        return True"),
    ("shortcut takes other lengths as checked", P + "fast_path.py",
     "        if (self.q is not None and self.q() is not seq_lens_q) or (self.kv is not None and self.kv() is not seq_lens_kv):",
     "        if False:"),
    ("shortcut takes lengths for one side as checked for the other", P + "fast_path.py",
     "        if (seq_lens_q is None) != (self.q is None) or (seq_lens_kv is None) != (self.kv is None):",
     "        if False:"),
    ("shortcut keeps inference lengths as checked", P + "fast_path.py",
     "            if given is not None and given.is_inference():", "            if False:"),
    ("shortcut keeps copied lengths as checked", P + "fast_path.py",
     "        return all(given is None or handed is given for", "        return all(True for"),
    ("shortcut keeps the lengths' state after their checks", P + "fast_path.py",
     "    before = _PassedLengths.taken(seq_lens_q, seq_lens_kv)\n    seq_lens, every_row_attends = cudnn_seq_lens(seq_lens_q, seq_lens_kv, q, k)",
     "    seq_lens, every_row_attends = cudnn_seq_lens(seq_lens_q, seq_lens_kv, q, k)\n    before = _PassedLengths.taken(seq_lens_q, seq_lens_kv)"),
    ("shortcut hands a misaligned copied tensor's copy to the op", P + "fast_path.py",
     "                if op_checks and t.is_cuda and t.data_ptr() % 16:", "                if False:"),
    ("shortcut runs a one-row call's mod over one row", P + "fast_path.py",
     "every_row_attends=every_row_attends, rows=entry.rows,", "every_row_attends=every_row_attends, rows=2,"),
    ("shortcut hands a full side made for one call to the next", P + "fast_path.py",
     "        if all(side is None or is_kept(side, length) for side, length in", "        if True or all(side is None or is_kept(side, length) for side, length in"),
    ("shortcut hands the kept lengths' sides swapped", P + "fast_path.py",
     "            seq_lens_q if full[0] is None else full[0], seq_lens_kv if full[1] is None else full[1]]",
     "            seq_lens_kv if full[1] is None else full[1], seq_lens_q if full[0] is None else full[0]]"),
    ("shortcut hands given int64 tensors as they are", P + "fast_path.py",
     "    return not any(dtype in record_call.COPIED", "    return not any(False"),
    ("shortcut leaves a one-row call's given tensors to the op", P + "fast_path.py",
     "        elif entry.given_as_is and op_checks:", "        elif entry.given_as_is:"),
    ("shortcut takes the op's scores as a one-row call's own", P + "fast_path.py",
     "    return rows != 1 or program is None or not _ops.needs_two_rows(program.reads_head_or_key, s_kv)",
     "    return True"),
    ("shortcut runs under a TorchFunctionMode", P + "fast_path.py",
     "    if torch._C._is_torch_function_mode_enabled():\n        # A TorchFunctionMode sees the op",
     "    if False:\n        # A TorchFunctionMode sees the op"),
    ("shortcut lets the op's NotImplementedError out", P + "fast_path.py",
     "    except (ValueError, TypeError, NotImplementedError):", "    except (ValueError, TypeError):"),
    ("shortcut passes score_mod tensors that require grad", P + "fast_path.py",
     "        if type(t) is not _TENSOR or t.requires_grad:", "        if type(t) is not _TENSOR:"),
    ("shortcut keyed without the score_mod tensors' dtypes", P + "fast_path.py",
     "        signature.append((name, t.dtype))", "        signature.append((name, torch.float32))"),
    ("shortcut passes bool score_mod tensors unconverted", P + "fast_path.py",
     "                t = record_call.as_graph_input(t)\n", ""),
    ("shortcut drops the bprop tensors", P + "fast_path.py",
     "    for tensors, into in zip(given, inputs):", "    for tensors, into in zip(given[:1], inputs):"),
    ("shortcut drops the padded lengths", P + "fast_path.py",
     "                            bool(deterministic), seq_lens, every_row_attends", "                            bool(deterministic), every_row_attends"),
    ("shortcut skips the lengths' checks", P + "fast_path.py",
     "    seq_lens, every_row_attends = cudnn_seq_lens(seq_lens_q, seq_lens_kv, q, k)",
     "    every_row_attends = False; seq_lens = [seq_lens_q if seq_lens_q is not None else torch.full((q.shape[0],), q.shape[2], dtype=torch.int32), seq_lens_kv if seq_lens_kv is not None else torch.full((q.shape[0],), k.shape[2], dtype=torch.int32)]"),
    ("shortcut over a lengths subclass", P + "fast_path.py",
     "            if not (_plain_or_none(seq_lens_q) and _plain_or_none(seq_lens_kv)):", "            if False:"),
    ("shortcut misses a write to the kv lengths given beside q's", P + "fast_path.py",
     "    return ((seq_lens_q._version, seq_lens_q.data_ptr()), (seq_lens_kv._version, seq_lens_kv.data_ptr()))",
     "    return ((seq_lens_q._version, seq_lens_q.data_ptr()),)"),
    ("shortcut misses a write to the q lengths given beside kv's", P + "fast_path.py",
     "    return ((seq_lens_q._version, seq_lens_q.data_ptr()), (seq_lens_kv._version, seq_lens_kv.data_ptr()))",
     "    return ((seq_lens_kv._version, seq_lens_kv.data_ptr()),)"),
    ("an empty KV cache counted as attended", P + "_validation.py",
     "shortest_kv is not None and shortest_q is not None and shortest_kv > 0",
     "shortest_kv is not None and shortest_q is not None and shortest_kv >= 0"),
    ("short query lengths counted as every row", P + "_validation.py",
     "        shortest_q == q.shape[2]", "        shortest_q <= q.shape[2]"),
    ("lengths unread under compile counted as attended", P + "_validation.py",
     "        return None  # no host read inside a compiled graph", "        return longest  # no host read inside a compiled graph"),
    ("one query row run as two left uncleared", P + "_ops.py",
     "        every_row_attends = False  # the second row", "        pass  # the second row"),
    ("a one-row call returns the dropped row", P + "_ops.py",
     "        out, lse = out.narrow(2, 0, 1), lse.narrow(2, 0, 1)", "        out, lse = out.narrow(2, 1, 1), lse.narrow(2, 1, 1)"),
    ("the second query row copies the first under a backward", P + "_ops.py",
     "torch.zeros_like(q) if backward else q], dim=2)", "q], dim=2)"),
    ("the second query row holds garbage without a backward", P + "_ops.py",
     "torch.zeros_like(q) if backward else q], dim=2)", "torch.zeros_like(q) if backward else q * float('nan')], dim=2)"),
    ("one query row run as one whatever the program reads", P + "_ops.py",
     "    return reads_head_or_key is not False or s_kv == 1", "    return reads_head_or_key is None"),
    ("one query and one key run as one row", P + "_ops.py",
     "    return reads_head_or_key is not False or s_kv == 1", "    return reads_head_or_key is not False"),
    ("a program refused at one row raises instead of running two", P + "_ops.py",
     "        if one_row or not at_one_row or not str(refusal)", "        if True or not at_one_row or not str(refusal)"),
    ("a refusal at one row asked again on every call", P + "_ops.py",
     "        _refused_at_one_row.add(key)\n", "        pass\n"),
    ("any error of a one-row call retried at two rows", P + "_ops.py",
     "        if one_row or not at_one_row or not str(refusal).startswith(_REFUSED_FORWARD):",
     "        if one_row or not at_one_row:"),
    ("a refusal at two rows too kept as a one-row refusal", P + "_ops.py",
     "            _refused_at_one_row.discard(key)  # refused", "            pass  # refused"),
    ("the shortcut leaves a refused program's tensors to the op at two rows", P + "fast_path.py",
     "        op_checks = entry.op_checks and not (entry.rows == 1 and _ops._refused_at_one_row)",
     "        op_checks = entry.op_checks"),
    ("a compiled call reads the refusals at one row (recompiles at each)", P + "_ops.py",
     "        or not compiling and bool(_refused_at_one_row)", "        or bool(_refused_at_one_row)"),
    ("a refusal at one row kept for every shape", P + "_ops.py",
     "    return (mod_id, bprop_id, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), bool(seq_lens),\n",
     "    return (mod_id, bprop_id, q.dtype, bool(seq_lens),\n"),
    ("a compiled DSL call's program taken as reading no index", P + "_registry.py",
     "    return program.mod_id, program.bprop_id, program.reads_head_or_key",
     "    return program.mod_id, program.bprop_id, False"),
    ("a compiled torch-style call's program taken as reading no index", P + "record_call.py",
     "    return program.mod_id, program.bprop_id, program.reads_head_or_key, tuple(recipe)",
     "    return program.mod_id, program.bprop_id, False, tuple(recipe)"),
    ("cudnn_call drops what a compiled program reads", P + "api.py",
     "compiling, every_row_attends, reads_head_or_key=reads_head_or_key)", "compiling, every_row_attends)"),
    ("a program not at hand taken as reading no index", P + "_ops.py",
     "needs_two_rows(program.reads_head_or_key if program is not None else reads_head_or_key,",
     "needs_two_rows(program.reads_head_or_key if program is not None else False,"),
    ("a program reading the key index runs one query row as one", P + "program/record.py",
     "    return axis is None or int(axis) in (1, 3)", "    return axis is None or int(axis) == 1"),
    ("a program reading the head index runs one query row as one", P + "program/record.py",
     "    return axis is None or int(axis) in (1, 3)", "    return axis is None or int(axis) == 3"),
    ("shortcut forgets whether every row attends", P + "fast_path.py",
     "        before.every_row_attends = every_row_attends\n", ""),
    ("shortcut says every row attends for kept lengths", P + "fast_path.py",
     "        return handed, passed.every_row_attends", "        return handed, True"),
    ("full path drops whether every row attends", P + "api.py",
     "                              every_row_attends=every_row_attends)", "                              )"),
    ("kept full lengths made under a fake mode", P + "padded_batch.py",
     "    if capturing or type(made) is not torch.Tensor or len(", "    if capturing or len("),
    ("shortcut serves an empty tensor dict without its mod", P + "fast_path.py",
     "        return None  # refused by the full path (an empty dict too", "        pass  # refused by the full path (an empty dict too"),
    ("kept full lengths made in inference mode", P + "padded_batch.py",
     "    with torch.inference_mode(False):  # a later call", "    if True:  # a later call"),
    ("kept full lengths of another length", P + "padded_batch.py",
     "    key = (device, batch, length)", "    key = (device, batch)"),
    ("shortcut ignores the bprop's key", P + "fast_path.py",
     "        bprop = _ident(score_mod_bprop)\n", "        bprop = ()\n"),
    ("shortcut keys one object's bprop methods alike", P + "_registry.py",
     "    return (owner_key[0], name, owner_key[2]) if name else None", "    return owner_key"),
    ("shortcut keys unnamed bprop methods of one object alike", P + "_registry.py",
     "    return (owner_key[0], name, owner_key[2]) if name else None",
     "    return (owner_key[0], name, owner_key[2])"),
    ("shortcut over tensors made inside the mod", P + "fast_path.py",
     "    return record_call.captured_slots(score_mod, score_mod_bprop, mask_mod, q, s_kv, program)",
     "    return record_call.captured_slots(score_mod, score_mod_bprop, mask_mod, q, s_kv, program) or ()"),
    ("packed shortcut without the captured tensors", P + "fast_path.py",
     "given is _NO_TENSORS and not entry.leaves else _slot_tensors(\n            entry, given, entry.queries",
     "given is _NO_TENSORS else _slot_tensors(\n            entry, given, entry.queries"),
    ("shortcut without the captured tensors", P + "fast_path.py",
     "        if entry.leaves:\n            tensors = _slot_tensors(",
     "        if entry.leaves and given is not _NO_TENSORS:\n            tensors = _slot_tensors("),
    ("shortcut remembers a program of other slots than its key's", P + "fast_path.py",
     " or not _slots_of(program, key[6]):", ":"),
    ("packed entries over dead closures kept", P + "fast_path.py",
     "        key = _held_weakly(key, table)", "        key = _held_weakly(key, _entries)"),
    ("packed calls' mods unchecked", P + "varlen.py",
     "    check_mods(score_mod, score_mod_bprop, score_mod_tensors, score_mod_bprop_tensors)\n", ""),
    ("packed shortcut without the score_mod tensors", P + "fast_path.py",
     "max_seqlen_q, max_seqlen_kv, slots[0]),", "max_seqlen_q, max_seqlen_kv, _NO_TENSORS),"),
    ("captured tensors' metadata changed in place unseen", P + "fast_path.py",
     "            if guard.leaf_metadata(t) != metadata:\n                return None", "            if False:\n                return None"),
    ("captured tensor's view kept over a swapped storage", P + "fast_path.py",
     "if made is not None and made[1] == leaf.data_ptr():", "if made is not None:"),
    ("captured tensor's float32 copy kept", P + "fast_path.py",
     "                aliases = view.dtype == leaf.dtype and view.data_ptr() == leaf.data_ptr()",
     "                aliases = True"),
    # (record_call.CopiedViews makes its copies in C++, csrc/copied_views.cpp; its plan is here)
    ("ids' kept copies all views of one copy", P + "record_call.py",
     "slots.append((at, sizes, list(axes), any(u is t for u in once)))",
     "slots.append((at, sizes, list(axes), True))"),
    ("ids' kept copies copied per slot", P + "record_call.py",
     "slots.append((at, sizes, list(axes), any(u is t for u in once)))",
     "slots.append((at, sizes, list(axes), False))"),
    ("ids of a subclass copied by the extension (no __torch_function__)", P + "record_call.py",
     " or type(t) is not torch.Tensor:\n                return None", ":\n                return None"),
    ("ids' kept copies sized on their first axis only", P + "record_call.py",
     "            for axis in axes:\n                sizes[axis] = shape[axis]\n            at = next(",
     "            for axis in axes[:1]:\n                sizes[axis] = shape[axis]\n            at = next("),
    ("captured tensor that requires grad passed while compiling", P + "api.py",
     "        if t.requires_grad and torch.is_grad_enabled():",
     "        if not compiling and t.requires_grad and torch.is_grad_enabled():"),
    ("captured tensor that requires grad served by the shortcut", P + "fast_path.py",
     "        if self.grad_leaf and torch.is_grad_enabled():\n            return None", "        if False:\n            return None"),
    ("captured tensor that requires grad read from the metadata of another leaf", P + "fast_path.py",
     "self.grad_leaf = any(self.leaves[i][0].requires_grad for i, _ in self.slots)",
     "self.grad_leaf = self.leaves[0][0].requires_grad if self.leaves else False"),
    ("kept views served over a swapped storage", P + "fast_path.py",
     "                if leaf.data_ptr() != pointer:\n                    break", "                if False:\n                    break"),
    ("kept views hold their captured tensor (swap_tensors refused)", P + "fast_path.py",
     "    return leaf.detach()\n", "    return leaf\n"),
    ("captured tensors copied once detached first (copied per slot)", P + "fast_path.py",
     "    if type(leaf) is not torch.Tensor or leaf.dtype in torch_style.COPIED_DTYPES:",
     "    if type(leaf) is not torch.Tensor:"),
    ("kept views served from a slot cloned since (stale values)", P + "fast_path.py",
     "                self.views[n] = (view, leaf.data_ptr()) if aliases else None",
     "                if aliases:\n                    self.views[n] = (view, leaf.data_ptr())"),
    ("kept views of a subclass made plain (its __torch_function__ skipped)", P + "fast_path.py",
     "    if type(leaf) is not torch.Tensor or leaf.dtype in torch_style.COPIED_DTYPES:",
     "    if leaf.dtype in torch_style.COPIED_DTYPES:"),
    ("kept views stored as the list handed to the op", P + "fast_path.py",
     "            self.kept = (tuple(tensors), tuple(aliased.values()))",
     "            self.kept = (tensors, tuple(aliased.values()))"),
    ("kept views watch one leaf of several", P + "fast_path.py",
     "            self.kept = (tuple(tensors), tuple(aliased.values()))", "            self.kept = (tuple(tensors), tuple(aliased.values())[:1])"),
    ("captured tensors' keys hold their closures", P + "fast_path.py",
     "    if captured:\n        key = _held_weakly(key, table)\n", ""),
    ("captured tensor that requires grad passed silently", P + "api.py",
     "        if t.requires_grad and torch.is_grad_enabled():", "        if False:"),
    ("mod that reads a captured value remembered", P + "fast_path.py",
     "    if len(program.mod_slots) > given:\n        return True\n    leaves: list = []", "    if True:\n        return len(program.mod_slots) > given\n    leaves: list = []"),
    ("int64 score_mod tensors handed to cuDNN", P + "record_call.py",
     "COPIED = frozenset((torch.bool, torch.uint8, torch.int64))", "COPIED = frozenset((torch.bool, torch.uint8))"),
    ("int32 tensors compared with a float not through identity", P + "program/replay.py",
     '            return "INT32" in str(tensor.get_data_type())', "            return False"),
    ("int32 scalars passed by value as INT32", P + "torch_style.py",
     "    if view.dtype in COPIED_DTYPES or (view.dtype == torch.int32 and not axes):", "    if view.dtype in COPIED_DTYPES:"),
    ("ids copied once however long", P + "record_call.py",
     "    return [t for t, slots, elements in read.values() if slots > 1 and t.numel() <= elements]",
     "    return [t for t, slots, elements in read.values() if slots > 1]"),
    ("ids read by two slots copied per slot", P + "record_call.py",
     "torch_style.view_for(copies.get(id(t), t), axes, shape, _capture_name(i))",
     "torch_style.view_for(t, axes, shape, _capture_name(i))"),
    ("captured tensors' shapes unchecked without slots", P + "fast_path.py",
     "        for t, metadata in self.leaves:  # also those no slot reads: the program may read their shapes\n            if guard.leaf_metadata(t) != metadata:\n                return None\n        if not self.slots:\n            return []\n",
     "        if not self.slots:\n            return []\n        for t, metadata in self.leaves:\n            if guard.leaf_metadata(t) != metadata:\n                return None\n"),
    ("dead closure's entry kept", P + "fast_path.py",
     "        entries.pop(stored[0], None)\n", ""),
    ("shortcut outlives clear_cache", P + "__init__.py", "    fast_path.clear()\n", ""),
    ("shortcut snapshot taken after the call", P + "fast_path.py",
     "    if reads is None or not guard.unchanged(reads) or not _slots_of(program, key[6]):\n        return",
     "    reads = _reads(*key[0][:3])\n    if reads is None or not _slots_of(program, key[6]):\n        return"),
    ("varlen shortcut ignores cu_seqlens changed in place", P + "fast_path.py",
     "            or _state(cu_seqlens_q, cu_seqlens_kv) != entry.versions\n", ""),
    ("varlen shortcut ignores which cu_seqlens_kv", P + "fast_path.py",
     "entry.cu_kv() is not cu_seqlens_kv", "False"),
    ("varlen shortcut keyed without shapes", P + "fast_path.py",
     "        return (mods, q.shape, k.shape, v.shape, max_seqlen_q, max_seqlen_kv, _NO_TENSORS)",
     "        return (mods, max_seqlen_q, max_seqlen_kv, None, None, None, _NO_TENSORS)"),
    ("varlen shortcut ignores which cu_seqlens_q", P + "fast_path.py",
     "entry.cu_q() is not cu_seqlens_q", "False"),
    ("varlen shortcut ignores a swapped storage", P + "fast_path.py",
     "return cu_seqlens_q._version, cu_seqlens_q.data_ptr(), cu_seqlens_kv._version, cu_seqlens_kv.data_ptr()",
     "return cu_seqlens_q._version, 0, cu_seqlens_kv._version, 0"),
    ("varlen shortcut remembers the versions after the call", P + "fast_path.py",
     "_VarlenEntry(reads, program, captured, queries, cu_seqlens_q, cu_seqlens_kv,\n                                                    before,",
     "_VarlenEntry(reads, program, captured, queries, cu_seqlens_q, cu_seqlens_kv,\n                                                    versions(cu_seqlens_q, cu_seqlens_kv),"),
    ("varlen shortcut takes any scale", P + "fast_path.py",
     "if scale is _REFUSED or (q.is_cuda", "if (q.is_cuda"),
    ("lengths read under inference mode kept as inference tensors", P + "_validation.py",
     "    with torch.inference_mode(False):\n        value = compute()", "    value = compute()"),
    ("varlen shortcut ignores the mods' reads", P + "fast_path.py",
     "            or not guard.unchanged(entry.reads) or not cudnn_takes(q)):",
     "            or not cudnn_takes(q)):"),
    ("varlen shortcut remembers copied tokens", P + "varlen.py",
     "all(r is t for r, t in zip(readable, (q, k, v)))", "True"),
    ("shortcut ignores the torch-style mark", P + "fast_path.py",
     'marked = score_mod.__dict__.get("_cudnn_flex_torch_style", False)', "marked = False"),
    ("tensor subclasses skip torch.ops", P + "_ops.py",
     "if type(q) is not _TENSOR or type(k) is not _TENSOR or type(v) is not _TENSOR:\n        return True\n    for t",
     "if False:\n        return True\n    for t"),
    ("subclass lengths skip torch.ops", P + "_ops.py",
     "    for t in (*mod_tensors, *bprop_tensors, *seq_lens, *cu_seqlens):", "    for t in ():"),
    ("unused ops lowered", P + "program/replay.py",
     "        for i in sorted(needed - skipped):",
     "        needed |= set(range(index)) - set(self.done)\n        for i in sorted(needed - skipped):"),
]


def scratch_copy(dst: str) -> None:
    """The package as it is (with its built extension) under dst/python."""
    shutil.copytree(os.path.join(ROOT, "python"), os.path.join(dst, "python"), symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))


# A run this long has hung (the whole CPU suite takes about a minute): a planted bug that hangs the
# suite is caught, as CI would fail on it; without a bug the suite must finish.
HANG = 600
TIMED_OUT = 124
# pytest's exit codes: 1 a test failed, 2 interrupted (a collection error: the planted bug broke an
# import). 4 (an id not found) and 5 (nothing collected) say the remembered test is gone.
FAILED = (1, 2, TIMED_OUT)


def pytest(python_dir: str, targets: list[str], *options: str) -> tuple[int, str]:
    """pytest's exit code and output over targets (files or test ids), the CPU tests only."""
    # One thread each: the workers share the machine's cores.
    env = {**os.environ, "PYTHONPATH": python_dir, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=no", "-rfE", "-p", "no:cacheprovider", "-m", "not gpu",
           "--hypothesis-profile=mutation_check", "--deselect", "tests/python/test_package.py", *options, *targets]
    try:
        run = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=HANG)
    except subprocess.TimeoutExpired:
        return TIMED_OUT, f"timed out after {HANG} s"
    return run.returncode, run.stdout


def failures(output: str) -> list[str]:
    """The ids of the tests that failed or errored, from pytest's short summary ("FAILED id - why";
    an id's parameters may hold " - " too: kept whole where they close their bracket)."""
    found = []
    for line in output.splitlines():
        for tag in ("FAILED ", "ERROR "):
            if line.startswith(tag):
                parts = line[len(tag):].split(" - ")
                ids = (" - ".join(parts[:n]) for n in range(1, len(parts) + 1))
                found.append(next((i for i in ids if "[" not in i or i.endswith("]")), parts[0]).strip())
    return found


def load_catchers() -> dict[str, str]:
    try:
        with open(CATCHERS) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def usable_catchers(python_dir: str, catchers: dict[str, str], pool: ThreadPoolExecutor) -> dict[str, str]:
    """The remembered catchers that still exist and pass on the unchanged code, each run alone as it
    will be on a bug: one that failed without a bug would make every bug it is asked about look
    caught."""
    code, output = pytest(python_dir, [TESTS], "--collect-only")
    existing = set(output.splitlines()) if code == 0 else set()
    # (a test file, where the bug broke its import: pytest reports the file)
    ids = sorted({t for t in catchers.values() if t in existing or os.path.isfile(os.path.join(ROOT, t))})
    passing = {t for t, (code, _) in zip(ids, pool.map(lambda t: pytest(python_dir, [t]), ids)) if code == 0}
    usable = {name: t for name, t in catchers.items() if t in passing}
    if len(usable) < len(catchers):
        print(f"mutation check: {len(catchers) - len(usable)} remembered catchers are gone or fail "
              "without a bug; those bugs run the whole suite (--record remembers new ones)")
    return usable


def try_bug(base: str, work: str, bug: tuple[str, str, str, str], catcher: str | None) -> tuple[str, str | None]:
    """Plants one bug in a copy of base at work: ('caught', the test that caught it), ('SURVIVED',
    None) or ('PATTERN', how often its text was found). Its remembered catcher runs first; the
    whole suite (-x) only if that one passes."""
    name, path, old, new = bug
    shutil.copytree(base, work, symlinks=True)
    try:
        target = os.path.join(work, path)
        text = open(target).read()
        if text.count(old) != 1:
            return "PATTERN", f"found {text.count(old)} times in {path}"
        open(target, "w").write(text.replace(old, new))
        python_dir = os.path.join(work, "python")
        if catcher is not None and pytest(python_dir, [catcher])[0] in FAILED:
            return "caught", catcher
        code, output = pytest(python_dir, [TESTS], "-x")
        return ("caught", next(iter(failures(output)), None)) if code != 0 else ("SURVIVED", None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only the bugs whose name contains this")
    parser.add_argument("-j", type=int, default=len(os.sched_getaffinity(0)), help="bugs tried at once")
    parser.add_argument("--record", action="store_true",
                        help=f"write the test that caught each bug to {os.path.relpath(CATCHERS, ROOT)}")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k in m[0]]
    names = [m[0] for m in MUTATIONS]
    if len(set(names)) != len(names):
        print("mutation check: two bugs share a name; name each one apart")
        return 1
    remembered = load_catchers()
    survived, broken, caught_by = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        scratch_copy(base)
        # Without a bug planted the suite must pass, or every bug would look caught.
        code, output = pytest(os.path.join(base, "python"), [TESTS], "-x")
        if code != 0:
            print(f"mutation check: the CPU suite fails on the unchanged copy ({output.splitlines()[-1:]}); fix that first")
            return 1
        pool = ThreadPoolExecutor(max_workers=max(1, args.j))
        catchers = usable_catchers(os.path.join(base, "python"),
                                   {m[0]: remembered[m[0]] for m in chosen if m[0] in remembered}, pool)

        def one(i_bug):
            i, bug = i_bug
            t0 = time.time()
            verdict, test = try_bug(base, os.path.join(tmp, f"mutant{i}"), bug, catchers.get(bug[0]))
            return bug[0], verdict, test, time.time() - t0

        with pool:
            for name, verdict, test, seconds in pool.map(one, enumerate(chosen)):
                print(f"{verdict:8} {name} ({seconds:.0f} s)" + (f": {test}" if verdict == "PATTERN" else ""),
                      flush=True)
                if verdict == "SURVIVED":
                    survived.append(name)
                elif verdict == "PATTERN":
                    broken.append(name)
                elif test is not None:
                    caught_by[name] = test
    if args.record:
        kept = {n: t for n, t in remembered.items() if n in names and n not in caught_by}
        with open(CATCHERS, "w") as f:
            json.dump(dict(sorted({**kept, **caught_by}.items())), f, indent=1)
            f.write("\n")
    print(f"mutation check: {len(chosen) - len(survived) - len(broken)} of {len(chosen)} planted bugs caught"
          + (f"; survived: {survived}" if survived else "") + (f"; stale patterns: {broken}" if broken else ""))
    return 1 if survived or broken else 0


if __name__ == "__main__":
    sys.exit(main())
