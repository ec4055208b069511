"""Seeded random score_mod programs over the whole DSL, for cuDNN-vs-reference tests.

A program is `score + 0.3 * tanh(expr)` or `binary_select(score + e1, score + e2, cond)` where the
expressions draw on indices, score_mod tensors, constants and every DSL op. d(program)/d(score) is
1 everywhere, so the default (identity) bprop is exact and gradients can be compared too. Every
op is wrapped so that its inputs stay in its domain (log(|x| + 1), x / (|y| + 1), ...).
"""

import random

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
ALL_OPS = sorted(set(UNARY) | set(BINARY) | set(COMPARE) | set(LOGICAL) |
                 {"gen_index", "binary_select"})


class Program:
    """A random score_mod: callable like one, with the ops it uses and a readable form."""

    def __init__(self, seed: int, depth: int = 4):
        self.seed = seed
        self.rng = random.Random(seed)
        self.ops: set[str] = set()
        self.steps: list = []
        self.kind = self.rng.choice(["add", "select"])
        if self.kind == "add":
            self.body = self._expr(depth)
        else:
            self.body = (self._expr(depth - 1), self._expr(depth - 1), self._cond(depth - 1))
        self.ops |= {"binary_select"} if self.kind == "select" else set()
        self.text = self._describe()

    # Each node is (name, children...) with leaves ("index", axis), ("tensor", name), ("const", c).
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
        if name == "index":
            return g.gen_index(score, node[1])
        if name == "tensor":
            return tensors[node[1]]
        if name == "const":
            return node[1]
        args = [self._build(g, c, score, tensors) for c in node[1:]]
        if name in UNARY:
            return UNARY[name](g, self._as_tensor(g, args[0], score))
        if name in BINARY:
            return BINARY[name](g, self._as_tensor(g, args[0], score), self._as_tensor(g, args[1], score))
        if name == "binary_select":
            return g.binary_select(self._as_tensor(g, args[0], score), args[1], args[2])
        if name == "logical_not":
            return g.logical_not(args[0])
        if name in LOGICAL:
            return getattr(g, name)(args[0], args[1])
        return getattr(g, name)(self._as_tensor(g, args[0], score), args[1])

    @staticmethod
    def _as_tensor(g, x, score):
        # A bare constant becomes a graph value by an op on an index, so ops always see a tensor.
        return g.add(g.mul(g.gen_index(score, 3), 0.0), x) if isinstance(x, float) else x

    def __call__(self, graph, score, tensors):
        if self.kind == "add":
            return graph.add(score, graph.mul(graph.tanh(self._as_tensor(
                graph, self._build(graph, self.body, score, tensors), score)), 0.3))
        e1, e2, cond = (self._build(graph, n, score, tensors) for n in self.body)
        lift = lambda e: graph.add(score, graph.mul(graph.tanh(self._as_tensor(graph, e, score)), 0.3))  # noqa: E731
        return graph.binary_select(lift(e1), lift(e2), cond)

    def score_mod_graph_cache_key(self):
        return ("random_program", self.seed)

    def _describe(self):
        def fmt(n):
            if n[0] == "index":
                return "bhqk"[n[1]]
            if n[0] in ("tensor", "const"):
                return str(n[1])
            return f"{n[0]}(" + ", ".join(fmt(c) for c in n[1:]) + ")"
        if self.kind == "add":
            return f"score + 0.3*tanh({fmt(self.body)})"
        return f"select(score + .3tanh({fmt(self.body[0])}), score + .3tanh({fmt(self.body[1])}), {fmt(self.body[2])})"


def program_tensors(b, h, s_q, s_kv, device, seed):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, mask in TENSORS.items():
        shape = [n if keep else 1 for keep, n in zip(mask, (b, h, s_q, s_kv))]
        out[name] = torch.randn(shape, device=device, generator=g)
    return out
