"""Seeded random score_mod programs and single-op probes over the whole DSL, for cuDNN tests.

Programs. Kind "add" is `score + 0.3 * tanh(expr)` and kind "select" is
`binary_select(score + .3 tanh(e1), score + .3 tanh(e2), cond)`, where the expressions draw on
indices, score_mod tensors, constants and every DSL op: d(program)/d(score) is 1 (dP passes
through, or the select rule). Kind "score" (Program(seed, score_path=True)) is
`score + tanh(expr)` where expr has the score itself among its leaves, reached only through ops
that are continuous and have a derivative rule (SCORE_UNARY, SCORE_BINARY; the score in either
operand), so the derived bprop of each rule runs inside cuDNN; they avoid the forms whose backward
cuDNN 9.19 got wrong in the backward (see NAN_OPS below). Every op is wrapped so that its inputs stay in its
domain (log(|x| + 1), x / (|y| + 1), ...).

Probes. SingleOp(op) puts one op alone inside a score_mod, with a contribution of O(1) to the
scores (COEF): on index-based inputs (mode "index", every op), or on a score-dependent input in
each operand position (modes "first"/"second", the differentiable ops; for sin, cos, tan and gelu
of the score the GPU tests check the forward and that the backward is refused). Their inputs keep
clear of every discontinuity (probe_margins), so rounding differences cannot flip a floor or a
comparison.

Expected values: dsl_torch.formula(program, tensors), never the library's reference path.
"""

import math
import random

import torch

# Kept out of the score's path here so that each seed's program stays what it was; each of these
# forms runs on the score alone in the probes (and in test_gpu_correctness), where cuDNN 9.19 got
# their backward wrong until the padding fix (csrc/score_mod_bridge.h).
NAN_OPS = frozenset({"sin", "cos", "tan", "gelu"})
PRODUCT_OPS = frozenset({"mul", "div", "pow", "add_square", "scale"})

# name -> how to apply it (graph, *args); unary ops take one expression, binary two.
UNARY = {
    "tanh": lambda g, x: g.tanh(x), "sigmoid": lambda g, x: g.sigmoid(x), "abs": lambda g, x: g.abs(x),
    "neg": lambda g, x: g.neg(x), "sin": lambda g, x: g.sin(x), "cos": lambda g, x: g.cos(x),
    "erf": lambda g, x: g.erf(x), "identity": lambda g, x: g.identity(x),
    "softplus": lambda g, x: g.softplus(x), "gelu": lambda g, x: g.gelu(x),
    "gelu_approx_tanh": lambda g, x: g.gelu_approx_tanh(x), "elu": lambda g, x: g.elu(x),
    "relu": lambda g, x: g.relu(x), "leaky_relu": lambda g, x: g.leaky_relu(x, 0.1),
    "swish": lambda g, x: g.swish(x), "floor": lambda g, x: g.floor(x), "ceil": lambda g, x: g.ceil(x),
    "exp": lambda g, x: g.exp(g.tanh(x)), "log": lambda g, x: g.log(g.add(g.abs(x), 1.0)),
    "sqrt": lambda g, x: g.sqrt(g.abs(x)), "rsqrt": lambda g, x: g.rsqrt(g.add(g.abs(x), 1.0)),
    "reciprocal": lambda g, x: g.reciprocal(g.add(g.abs(x), 1.0)),
    "tan": lambda g, x: g.tan(g.tanh(x)),
}
BINARY = {
    "add": lambda g, a, b: g.add(a, b), "sub": lambda g, a, b: g.sub(a, b),
    "mul": lambda g, a, b: g.mul(g.tanh(a), b), "div": lambda g, a, b: g.div(a, g.add(g.abs(b), 1.0)),
    "max": lambda g, a, b: g.max(a, b), "min": lambda g, a, b: g.min(a, b),
    "mod": lambda g, a, b: g.mod(a, g.add(g.abs(b), 1.0)),
    "pow": lambda g, a, b: g.pow(g.add(g.abs(a), 1.0), g.tanh(b)),
    "add_square": lambda g, a, b: g.add_square(a, g.tanh(b)),
    "tanh_backward": lambda g, a, b: g.tanh_backward(a, b),
    "sigmoid_backward": lambda g, a, b: g.sigmoid_backward(a, b),
    "softplus_backward": lambda g, a, b: g.softplus_backward(a, b),
    "gelu_backward": lambda g, a, b: g.gelu_backward(a, b),
    "relu_backward": lambda g, a, b: g.relu_backward(a, b),
    "swish_backward": lambda g, a, b: g.swish_backward(a, b),
    "elu_backward": lambda g, a, b: g.elu_backward(a, b),
    "gelu_approx_tanh_backward": lambda g, a, b: g.gelu_approx_tanh_backward(a, b),
    "leaky_relu_backward": lambda g, a, b: g.leaky_relu_backward(a, b, 0.1),
}
COMPARE = ["cmp_eq", "cmp_neq", "cmp_gt", "cmp_ge", "cmp_lt", "cmp_le"]
LOGICAL = ["logical_and", "logical_or", "logical_not"]
TENSORS = {"head_bias": (False, True, False, False), "key_bias": (False, False, False, True),
           "table": (False, False, True, True)}  # which of B, H, Sq, Skv each tensor has

# Ops that only the probes use (random programs of the "add"/"select" kinds keep the op lists
# they were seeded with, so seed n is the same program as before).
EXTRA_BINARY = {"bias": lambda g, a, b: g.bias(a, b), "scale": lambda g, a, b: g.scale(a, g.tanh(b))}
ALL_OPS = sorted(set(UNARY) | set(BINARY) | set(EXTRA_BINARY) | set(COMPARE) | set(LOGICAL) |
                 {"gen_index", "binary_select"})

# Ops the score may flow through: continuous, with a derivative rule, inputs kept in their domain
# with derivatives bounded (sqrt(|x| + 1) rather than sqrt(|x|)). Not: floor, ceil, mod (jumps),
# comparisons (a mask's condition stays score-free) and the *_backward ops (no derivative).
SCORE_UNARY = {name: fn for name, fn in UNARY.items() if name not in ("floor", "ceil", "sqrt")}
SCORE_UNARY["sqrt"] = lambda g, x: g.sqrt(g.add(g.abs(x), 1.0))
SCORE_BINARY = {name: fn for name, fn in {**BINARY, **EXTRA_BINARY}.items()
                if name != "mod" and not name.endswith("_backward")}


# The programs the GPU tests run (and the CPU tests check): seeds and depths.
ADD_SELECT_SEEDS, ADD_SELECT_DEPTH = range(240), 4
SCORE_PATH_SEEDS, SCORE_PATH_DEPTH = range(1000, 1120), 3


def program(seed: int) -> "Program":
    """The GPU tests' program of `seed` (the score-path kind for SCORE_PATH_SEEDS)."""
    if seed in SCORE_PATH_SEEDS:
        return Program(seed, SCORE_PATH_DEPTH, score_path=True)
    return Program(seed, ADD_SELECT_DEPTH)


class Program:
    """A random score_mod: callable like one, with the ops it uses and a readable form."""

    def __init__(self, seed: int, depth: int = 4, score_path: bool = False):
        self.seed = seed
        self.score_path = score_path
        self.rng = random.Random(seed)
        self.ops: set[str] = set()
        if score_path:
            self.kind = "score"
            self.body = self._score_expr(depth)
        else:
            self.kind = self.rng.choice(["add", "select"])
            if self.kind == "add":
                self.body = self._expr(depth)
            else:
                self.body = (self._expr(depth - 1), self._expr(depth - 1), self._cond(depth - 1))
        self.ops |= {"binary_select"} if self.kind == "select" else set()
        self.text = self._describe()

    # Each node is (name, children...) with leaves ("index", axis), ("tensor", name), ("const", c)
    # and ("score",).
    def _leaf(self):
        r = self.rng.random()
        if r < 0.45:
            self.ops.add("gen_index")
            return ("index", self.rng.randrange(4))
        if r < 0.75:
            return ("tensor", self.rng.choice(sorted(TENSORS)))
        return ("const", round(self.rng.uniform(-2, 2), 3))

    def _expr(self, depth):
        if depth <= 0:
            return self._leaf()
        r = self.rng.random()
        if r < 0.4:
            op = self.rng.choice(sorted(UNARY))
            self.ops.add(op)
            return (op, self._expr(depth - 1))
        if r < 0.85:
            op = self.rng.choice(sorted(BINARY))
            self.ops.add(op)
            return (op, self._expr(depth - 1), self._expr(self.rng.randrange(depth)))
        self.ops.add("binary_select")
        return ("binary_select", self._expr(depth - 1), self._expr(depth - 1), self._cond(depth - 1))

    def _score_expr(self, depth):
        """An expression with the score among its leaves, through SCORE_* ops only, and none of
        the forms of NAN_OPS / PRODUCT_OPS (the probes cover those)."""
        if depth <= 0:
            return ("score",)
        r = self.rng.random()
        if r < 0.4:
            op = self.rng.choice(sorted(set(SCORE_UNARY) - NAN_OPS))
            self.ops.add(op)
            return (op, self._score_expr(depth - 1))
        if r < 0.85:
            op = self.rng.choice(sorted(SCORE_BINARY))
            self.ops.add(op)
            scored = self._score_expr(depth - 1)
            # The other operand: score-free (any op), or score-dependent too (not in a product,
            # nor in the wrapper's tanh/abs of a product's operand).
            both = op not in PRODUCT_OPS and self.rng.random() < 0.3
            other = self._score_expr(depth - 1) if both else self._expr(self.rng.randrange(depth))
            return (op, scored, other) if self.rng.random() < 0.5 else (op, other, scored)
        self.ops.add("binary_select")
        branches = [self._score_expr(depth - 1), self._expr(depth - 1)]
        self.rng.shuffle(branches)
        return ("binary_select", *branches, self._cond(depth - 1))

    def _cond(self, depth):
        r = self.rng.random()
        if r < 0.7 or depth <= 1:
            op = self.rng.choice(COMPARE)
            self.ops.add(op)
            return (op, self._expr(max(depth - 1, 0)), ("const", round(self.rng.uniform(-1, 1), 3)))
        op = self.rng.choice(LOGICAL)
        self.ops.add(op)
        if op == "logical_not":
            return (op, self._cond(depth - 1))
        return (op, self._cond(depth - 1), self._cond(depth - 1))

    def _build(self, g, node, score, tensors):
        name = node[0]
        if name == "score":
            return score
        if name == "index":
            return g.gen_index(score, node[1])
        if name == "tensor":
            return tensors[node[1]]
        if name == "const":
            return node[1]
        args = [self._build(g, c, score, tensors) for c in node[1:]]
        unary = SCORE_UNARY if self._has_score(node) else UNARY
        binary = {**BINARY, **SCORE_BINARY}
        if name in unary:
            return unary[name](g, self._as_tensor(g, args[0], score))
        if name in binary:
            return binary[name](g, self._as_tensor(g, args[0], score), self._as_tensor(g, args[1], score))
        if name == "binary_select":
            return g.binary_select(self._as_tensor(g, args[0], score), args[1], args[2])
        if name == "logical_not":
            return g.logical_not(args[0])
        if name in LOGICAL:
            return getattr(g, name)(args[0], args[1])
        return getattr(g, name)(self._as_tensor(g, args[0], score), args[1])

    @classmethod
    def _has_score(cls, node):
        return node[0] == "score" or any(isinstance(c, tuple) and cls._has_score(c) for c in node[1:])

    @staticmethod
    def _as_tensor(g, x, score):
        # A bare constant becomes a graph value by an op on an index, so ops always see a tensor.
        return g.add(g.mul(g.gen_index(score, 3), 0.0), x) if isinstance(x, float) else x

    def __call__(self, graph, score, tensors):
        if self.kind == "score":
            return graph.add(score, graph.tanh(self._build(graph, self.body, score, tensors)))
        if self.kind == "add":
            return graph.add(score, graph.mul(graph.tanh(self._as_tensor(
                graph, self._build(graph, self.body, score, tensors), score)), 0.3))
        e1, e2, cond = (self._build(graph, n, score, tensors) for n in self.body)
        lift = lambda e: graph.add(score, graph.mul(graph.tanh(self._as_tensor(graph, e, score)), 0.3))  # noqa: E731
        return graph.binary_select(lift(e1), lift(e2), cond)

    def score_mod_graph_cache_key(self):
        return ("random_program", self.seed, self.score_path)

    def _describe(self):
        def fmt(n):
            if n[0] == "score":
                return "s"
            if n[0] == "index":
                return "bhqk"[n[1]]
            if n[0] in ("tensor", "const"):
                return str(n[1])
            return f"{n[0]}(" + ", ".join(fmt(c) for c in n[1:]) + ")"
        if self.kind == "score":
            return f"score + tanh({fmt(self.body)})"
        if self.kind == "add":
            return f"score + 0.3*tanh({fmt(self.body)})"
        return f"select(score + .3tanh({fmt(self.body[0])}), score + .3tanh({fmt(self.body[1])}), {fmt(self.body[2])})"


def program_tensors(b, h, s_q, s_kv, device, seed):
    """The score_mod tensors of TENSORS, drawn on the CPU (the same values on any device)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in TENSORS.items():
        shape = [n if keep else 1 for keep, n in zip(mask, (b, h, s_q, s_kv))]
        out[name] = torch.randn(shape, generator=g).to(device)
    return out


# --- Single-op probes -----------------------------------------------------------------------------

COEF = 1.5  # the probe's contribution: score + COEF * op(...), O(1) against scores of std ~1
PROBE_SHAPE = (1, 2, 128, 128)  # B, H, Sq, Skv of the GPU probes (the margins hold for these)
# The ops a probe can put on the score's path, and in which operand positions.
SCORE_MODES = {**{op: ("first",) for op in SCORE_UNARY},
               **{op: ("first", "second") for op in SCORE_BINARY}}


def probe_cases():
    """(op, mode) of every probe: every op on index-based inputs, and each differentiable op with
    the score in each of its operand positions."""
    return [(op, "index") for op in ALL_OPS] + [(op, mode) for op in sorted(SCORE_MODES) for mode in SCORE_MODES[op]]


class SingleOp:
    """score + COEF * op(inputs): one DSL op alone inside a score_mod.

    x = 0.019 kv - 1.2 + 0.3 head_bias varies along the keys (so the op changes the softmax, not
    just each row's normaliser) over about [-1.6, 1.6]; y = 0.0137 q - 0.0071 kv - 0.330295 varies
    along both. Mode "index" applies the op to x (and y); modes "first"/"second" put
    u = score + 0.5 x in that operand position (y in the other), so the op's derivative enters
    the gradients. Every value built is used (cuDNN gives wrong dV for dangling ops)."""

    def __init__(self, op, mode="index"):
        assert mode == "index" or mode in SCORE_MODES.get(op, ()), (op, mode)
        self.op, self.mode = op, mode

    def score_mod_graph_cache_key(self):
        return ("single_op", self.op, self.mode)

    def __repr__(self):
        return f"SingleOp({self.op!r}, {self.mode!r})"

    @staticmethod
    def x(g, score, tensors):
        return g.add(g.sub(g.mul(g.gen_index(score, 3), 0.019), 1.2), g.mul(tensors["head_bias"], 0.3))

    @staticmethod
    def y(g, score):
        return g.sub(g.sub(g.mul(g.gen_index(score, 2), 0.0137), g.mul(g.gen_index(score, 3), 0.0071)), 0.330295)

    def __call__(self, g, score, tensors):
        op = self.op
        if op == "gen_index":
            return g.add(score, g.mul(g.sin(g.mul(g.gen_index(score, 3), 0.05)), COEF))
        x = self.x(g, score, tensors)
        if self.mode != "index":
            u = g.add(score, g.mul(x, 0.5))
            if op in SCORE_UNARY:
                e = SCORE_UNARY[op](g, u)
            else:
                y = self.y(g, score)
                e = SCORE_BINARY[op](g, u, y) if self.mode == "first" else SCORE_BINARY[op](g, y, u)
            return g.add(score, g.mul(e, COEF))
        if op in UNARY:
            e = UNARY[op](g, x)
        elif op in BINARY or op in EXTRA_BINARY:
            e = {**BINARY, **EXTRA_BINARY}[op](g, x, self.y(g, score))
        else:  # comparisons, logical ops and binary_select, through a select
            y = self.y(g, score)
            c1 = getattr(g, op if op in COMPARE else "cmp_gt")(x, 0.25)
            if op in ("logical_and", "logical_or"):
                c1 = getattr(g, op)(c1, g.cmp_lt(y, 0.0))
            elif op == "logical_not":
                c1 = g.logical_not(c1)
            e = g.binary_select(x, y, c1)
        return g.add(score, g.mul(e, COEF))


def probe_margins(op, tensors, shape=PROBE_SHAPE):
    """The smallest distance of an index-based probe's inputs to a discontinuity of `op` (inf for
    a continuous op): what rounding in cuDNN (fused multiply-adds) would need to flip a result."""
    b, h, s_q, s_kv = shape
    kv = torch.arange(s_kv, dtype=torch.float64).view(1, 1, 1, s_kv)
    q = torch.arange(s_q, dtype=torch.float64).view(1, 1, s_q, 1)
    x = 0.019 * kv - 1.2 + 0.3 * tensors["head_bias"].double().cpu()
    y = 0.0137 * q - 0.0071 * kv - 0.330295
    if op in ("floor", "ceil"):
        return (x - torch.round(x)).abs().min().item()
    if op == "mod":
        m = y.abs() + 1.0
        ratio = x / m
        return ((ratio - torch.round(ratio)).abs() * m).min().item()
    if op in COMPARE or op in ("binary_select", "logical_not"):
        return (x - 0.25).abs().min().item()
    if op in ("logical_and", "logical_or"):
        return min((x - 0.25).abs().min().item(), y.abs().min().item())
    if op in ("relu_backward", "leaky_relu_backward"):  # a step in its second input
        return y.abs().min().item()
    return math.inf
