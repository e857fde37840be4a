"""IR nodes to SymPy expressions.

Hyperparameters become symbols that carry what their constraints say (``eps > 0`` makes
``eps`` positive), the step is a positive integer ``t``, constants become exact rationals
(``0.9`` is 9/10, so ``1 - 0.9 - 0.1`` is 0, as a proof needs), and reductions become
functions that know they are linear in factors that do not vary over a tensor's elements.
"""
from __future__ import annotations

import functools
import math
from fractions import Fraction

import sympy

from ..compiler.ir import Node, Program
from ..dsl import ast


class ElementSymbol(sympy.Symbol):
    """A value with one entry per element (grad, param, a per-element state): reductions sum over
    it, so a factor free of element symbols can be pulled out of a reduction."""


def varies_per_element(expr) -> bool:
    """Whether an element symbol is among ``expr``'s free symbols.

    SymPy's ``free_symbols`` walks the expression as a tree, each shared subexpression once
    per path to it. The IR is a DAG, and a DAG translated to SymPy shares its subexpressions
    (a repeated ``X @ transpose(X)`` is one object): five Newton-Schulz steps are about 200
    distinct nodes but 670,000 as a tree, and ``free_symbols`` took 33 s of ``gradspec check
    muon``. This walk visits each distinct node once and answers the same."""
    return _varies(expr, {})


def _varies(expr, seen: dict) -> bool:
    found = seen.get(id(expr))
    if found is None:
        if _unions_its_arguments(type(expr)):
            found = any(_varies(a, seen) for a in expr.args)
        else:  # a symbol, or a class with its own idea of free symbols (bound variables)
            found = any(isinstance(s, ElementSymbol) for s in expr.free_symbols)
        seen[id(expr)] = found
    return found


_UNIONS: dict = {}


def _unions_its_arguments(cls) -> bool:
    """Whether ``cls``'s free symbols are those of its arguments (Basic's definition)."""
    answer = _UNIONS.get(cls)
    if answer is None:
        owner = next(k for k in cls.__mro__ if "free_symbols" in k.__dict__)
        answer = _UNIONS[cls] = owner is sympy.Basic
    return answer


def substitute(expr, rule: dict):
    """``expr.xreplace(rule)``, visiting each distinct subexpression once: SymPy's xreplace
    walks the tree, which for a translated DAG (a Newton-Schulz iteration) is exponentially
    larger (see varies_per_element). The result is the same expression."""
    if not rule:
        return expr
    done: dict = {}

    def walk(e):
        found = done.get(id(e))
        if found is None:
            found = done[id(e)] = _replaced(e)
        return found

    def _replaced(e):
        if e in rule:
            return rule[e], True
        if not isinstance(e, sympy.Basic) or type(e)._xreplace is not sympy.Basic._xreplace:
            return e._xreplace(rule) if isinstance(e, sympy.Basic) else (e, False)
        args, changed = [], False
        for a in e.args:
            value, moved = walk(a) if isinstance(a, sympy.Basic) else (a, False)
            args.append(value)
            changed |= moved
        return (e.func(*args), True) if changed else (e, False)

    return walk(expr)[0]


def replaced(expr, query, value):
    """``expr.replace(query, value)`` for a predicate ``query`` and a function ``value``,
    visiting each distinct subexpression once (SymPy's replace walks the tree: see
    varies_per_element). The same walk as SymPy's: arguments first, then the node rebuilt
    from them; a rebuilt node that equals an argument which changed is not replaced again."""
    done: dict = {}

    def walk(e):
        found = done.get(id(e))
        if found is None:
            found = done[id(e)] = _replaced_node(e)
        return found

    def _replaced_node(e):
        args = getattr(e, "args", None)
        if args is None:
            return e
        if args:
            new = tuple(walk(a) for a in args)
            if args != new:
                e = e.func(*new)
                if any(e == a and a != n for a, n in zip(args, new)):
                    return e
        result = query(e)
        if result or result == {}:
            v = value(e)
            if v is not None and v != e:
                e = v
        return e

    return walk(expr)


class _Reduction(sympy.Function):
    """``tensor.sum(x)``, ``global.dot(x, y)``, ...: opaque, but linear in constant factors."""

    scope = "global"
    what = "sum"
    is_real = True

    @classmethod
    def eval(cls, *args):
        if any(tree_size(arg, FACTOR_TERMS_LIMIT) > FACTOR_TERMS_LIMIT for arg in args):
            return None  # too large to query as a tree (see FACTOR_TERMS_LIMIT): left opaque
        if any(arg.is_zero for arg in args) and cls.what in ("sum", "mean", "norm", "dot", "max", "min"):
            return sympy.Integer(0)
        factors, rests = [], []
        for arg in args:
            # factor_terms brings a common factor out of a sum under a root:
            # sqrt(k^2 a + k^2 b) becomes k sqrt(a + b), a constant the reduction can pull out
            const, rest = _split_constant(sympy.factor_terms(arg) if varies_per_element(arg) else arg)
            factors.append(const)
            rests.append(rest)
        scale = sympy.Mul(*factors)
        if scale == 1:
            return None
        if cls.what in ("sum", "mean", "dot"):
            return scale * cls(*rests)
        if cls.what == "norm":
            return sympy.Abs(scale) * cls(*rests)
        if scale.is_positive:  # max, min
            return scale * cls(*rests)
        return None

    def _eval_is_nonnegative(self):
        if self.what == "norm":
            return True
        if self.what == "dot" and self.args[0] == self.args[1]:
            return True
        if self.what in ("sum", "mean", "max", "min"):
            return self.args[0].is_nonnegative or None
        return None

    def _latex(self, printer):
        inner = ", ".join(printer._print(a) for a in self.args)
        name = {"norm": r"\lVert %s \rVert", "dot": r"\langle %s \rangle"}.get(self.what)
        text = name % inner if name else rf"\operatorname{{{self.what}}}\left({inner}\right)"
        return text + (r"_{\mathrm{%s}}" % self.scope)

    def _sympystr(self, printer):
        return f"{self.scope}.{self.what}({', '.join(printer._print(a) for a in self.args)})"


FACTOR_TERMS_LIMIT = 2000
"""The largest argument, counted as a tree, that a reduction simplifies (a zero argument, a
constant factor pulled out). ``factor_terms`` and SymPy's assumptions walk an argument as a
tree, and a chain of definitions that each divide by a reduction of the one before
(``d' = d / (1 + tensor.norm(d))``) doubles the tree at every link: 16 links took 30 s to
translate, 18 never ended. A larger argument leaves its reduction opaque."""


def tree_size(expr, limit: int, seen: dict | None = None) -> int:
    """``expr``'s node count as a tree, counted over its distinct subexpressions once each
    (each remembers its own count), stopping once past ``limit``."""
    seen = {} if seen is None else seen
    found = seen.get(id(expr))
    if found is None:
        found = 1
        for arg in expr.args:
            found += tree_size(arg, limit, seen)
            if found > limit:
                break
        seen[id(expr)] = found
    return found


def _split_constant(expr):
    if isinstance(expr, sympy.Mul):
        const = [f for f in expr.args if not varies_per_element(f)]
        if const:
            rest = [f for f in expr.args if varies_per_element(f)]
            return sympy.Mul(*const), sympy.Mul(*rest)
    if not varies_per_element(expr) and expr != 0:
        return expr, sympy.Integer(1)
    return sympy.Integer(1), expr


class Orthogonalize(sympy.Function):
    """``tensor.orthogonalize(x)``: Muon's Newton-Schulz iteration per tensor, opaque."""

    is_real = True

    @classmethod
    def eval(cls, arg):
        if arg.is_zero:  # 0 / (0 + 1e-7) is 0, and every quintic step keeps it there
            return sympy.Integer(0)
        return None

    def _latex(self, printer):
        return r"\operatorname{NS}_5\left(%s\right)" % printer._print(self.args[0])


class Aspect(sympy.Function):
    """``tensor.aspect(x)`` in LaTeX. In proofs it is the positive symbol ``ASPECT``: it
    depends on the tensor's shape only, never on the values of x."""

    def _latex(self, printer):
        return r"\operatorname{aspect}\left(%s\right)" % printer._print(self.args[0])


ASPECT = ElementSymbol("aspect", positive=True)  # varies between tensors, so it stays inside sums


class MatMul(sympy.Function):
    """``a @ b``: opaque, bilinear (factors that do not vary over a tensor come out), with the
    identity as its unit and 0 as its zero."""

    is_real = True

    @classmethod
    def eval(cls, a, b):
        if a.is_zero or b.is_zero:
            return sympy.Integer(0)
        if isinstance(a, Identity):
            return b
        if isinstance(b, Identity):
            return a
        (ca, ra), (cb, rb) = _split_constant(a), _split_constant(b)
        scale = ca * cb
        return scale * cls(ra, rb) if scale != 1 and ra != 1 and rb != 1 else None

    def _latex(self, printer):
        return " ".join(printer.parenthesize(a, 50) for a in self.args)

    def _sympystr(self, printer):  # SymPy's printer would take it for its own MatMul
        return " @ ".join(printer.parenthesize(a, 50) for a in self.args)


class Identity(ElementSymbol):
    """``eye(n)``: the unit of ``@``."""


class MatrixFunction(sympy.Function):
    """``transpose``, ``trace``, the decompositions: opaque functions of a per-tensor matrix.
    The transpose of a transpose, and any of them of the identity where it is known, simplify."""

    is_real = True
    name = "f"

    @classmethod
    def eval(cls, *args):
        a = args[0]
        if cls.name == "transpose":
            if isinstance(a, MatrixFunction) and a.name == "transpose":
                return a.args[0]
            if isinstance(a, Identity) or a.is_zero:
                return a
        if cls.name in ("inv_root", "eigvecs", "qr") and isinstance(a, Identity):
            return a
        return None

    def _latex(self, printer):
        inner = ", ".join(printer._print(a) for a in self.args)
        return r"\operatorname{%s}\left(%s\right)" % (self.name.replace("_", r"\_"), inner)


class Tiled(sympy.Function):
    """``tile(x)`` / ``untile(y)`` of ``blocks B { }``: the same elements seen block by block and
    back. Opaque (a block's reductions and products are not the tensor's, and simplify's rebuild
    refuses them), but the two undo each other, zero stays zero and factors that do not vary per
    element come out; numerically (a one-element tensor is one block) each is its argument."""

    is_real = True
    inverse = ""
    _imp_ = staticmethod(lambda x: x)

    @classmethod
    def eval(cls, x):
        if x.is_zero:
            return sympy.Integer(0)
        if isinstance(x, Tiled) and type(x).__name__ == cls.inverse:
            return x.args[0]
        const, rest = _split_constant(x)
        return const * cls(rest) if const != 1 and rest != 1 else None

    def _latex(self, printer):
        return printer._print(self.args[0])


_TILED = {"tile": type("tile", (Tiled,), {"inverse": "untile"}), "untile": type("untile", (Tiled,), {"inverse": "tile"})}

_MATRIX_FUNCTIONS = {name: type(name, (MatrixFunction,), {"name": name})
                     for name in ("transpose", "trace", "eigvecs", "eigvals", "inv_root", "qr", "svd_left", "svd_right",
                                  "descending")}


class GradAt(sympy.Function):
    """``grad_at(x)``: the gradient at displaced parameters, an opaque function of x."""

    is_real = True


class HessianVector(sympy.Function):
    """``hvp(v)``: H v, linear in v (a factor that does not vary per element comes out)."""

    is_real = True

    @classmethod
    def eval(cls, v):
        const, rest = _split_constant(v)
        if rest == 1 and const != 0:  # H times a constant vector: keep it opaque
            return None
        return const * cls(rest) if const != 1 else None


class Onto(sympy.Function):
    """``onto(v, U)``: U U^T v, linear in v."""

    is_real = True

    @classmethod
    def eval(cls, v, subspace):
        if v.is_zero:
            return sympy.Integer(0)
        const, rest = _split_constant(v)
        return const * cls(rest, subspace) if const != 1 and rest != 1 else None


_REDUCTIONS: dict = {}


def reduction(scope: str, func: str):
    key = (scope, func)
    if key not in _REDUCTIONS:
        _REDUCTIONS[key] = type(f"{scope}_{func}", (_Reduction,), {"scope": scope, "what": func})
    return _REDUCTIONS[key]


STEP = sympy.Symbol("t", integer=True, positive=True)


def number(value) -> sympy.Expr:
    """A constant as the exact rational its decimal text denotes (0.1 is 1/10)."""
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if not math.isfinite(value):
        return sympy.oo if value > 0 else -sympy.oo if value < 0 else sympy.nan
    return sympy.Rational(Fraction(repr(float(value))))  # exact: 1e-20 stays 1e-20


def hyper_symbol(hyper: ast.Hyper) -> sympy.Symbol:
    """``hyper eps = 1e-8 > 0`` as a positive real symbol ``eps`` (the rest of the constraint,
    an upper bound, is known to the range analysis)."""
    facts = {"real": True}
    if hyper.kind == "int":
        facts["integer"] = True
    c = hyper.constraint
    if isinstance(c, ast.Bound):
        if (c.op == ">" and c.value >= 0) or (c.op == ">=" and c.value > 0):
            facts["positive"] = True
        elif c.op == ">=" and c.value == 0:
            facts["nonnegative"] = True
        elif (c.op == "<" and c.value <= 0) or (c.op == "<=" and c.value < 0):
            facts["negative"] = True
        elif c.op == "!=" and c.value == 0:
            facts["nonzero"] = True
    elif isinstance(c, ast.Interval):
        if c.low > 0 or (c.low == 0 and not c.low_closed):
            facts["positive"] = True
        elif c.low >= 0:
            facts["nonnegative"] = True
        elif c.high < 0 or (c.high == 0 and not c.high_closed):
            facts["negative"] = True
    return sympy.Symbol(hyper.name, **facts)


class TooLarge(Exception):
    """A translation stopped at its ``tree_limit``."""


class Translator:
    """Translates the nodes of one program, each once. With ``tree_limit``, an operation whose
    operands hold more nodes than that, counted as trees, raises :class:`TooLarge` before
    SymPy builds it: SymPy's arithmetic asks its operands' signs by walking them as trees, and
    a chain of definitions that each use the one before twice (``d' = d * d / (1 + d * d)``)
    doubles the tree at every link (18 links: 36 s)."""

    def __init__(self, program: Program, hypers: dict | None = None, state_signs: dict | None = None,
                 tree_limit: int | None = None):
        self.program = program
        self.tree_limit = tree_limit
        self._tree_sizes: dict = {}
        self.state_signs = state_signs or {}
        spec_hypers = program.spec.hypers
        self.symbols = {name: hyper_symbol(h) for name, h in spec_hypers.items()}
        self.symbols.update(hypers or {})
        self._memo: dict = {}
        self._probes = 0

    def state(self, name: str) -> sympy.Symbol:
        facts = {"real": True}
        if name in self.state_signs:
            facts[self.state_signs[name]] = True
        if name in self.program.global_states:
            return sympy.Symbol(name, **facts)
        return ElementSymbol(name, **facts)

    def __call__(self, node: Node) -> sympy.Expr:
        found = self._memo.get(id(node))
        if found is None:
            found = self._memo[id(node)] = self._translate(node)
        return found

    def _translate(self, node: Node):
        op, attr = node.op, node.attr
        if op == "const":
            return number(attr)
        if op == "hyper":
            return self.symbols[attr]
        if op == "state":
            return self.state(attr)
        if op == "input":
            if attr == "step":
                return STEP
            return ElementSymbol(attr, real=True) if attr in ("grad", "param") else sympy.Symbol(attr, real=True)
        if op == "free":
            return sympy.Symbol(attr, real=True)
        if op == "pow" and all(a.is_const for a in node.args):  # left unfolded: it overflows
            base, exponent = (a.attr for a in node.args)
            try:
                return number(math.pow(base, exponent))
            except (OverflowError, ValueError):
                return sympy.nan if base < 0 else sympy.oo  # SymPy would try to compute it exactly
        args = [self(a) for a in node.args]
        if self.tree_limit is not None and \
                sum(tree_size(a, self.tree_limit, self._tree_sizes) for a in args) > self.tree_limit:
            raise TooLarge(node)
        if op == "probe":
            return self._probe(attr.func, args)
        if op == "onto":
            return Onto(*args)
        if op == "matrix":
            return ASPECT if attr.func == "aspect" else Orthogonalize(*args)
        if op == "reduce":
            return _built(reduction(attr.scope, attr.func), tuple(args))
        if op == "measure":
            return sympy.Symbol(f"{attr.scope}_{attr.what}", positive=True, integer=True) if attr.scope in ("global", "groups") \
                else ElementSymbol(f"{attr.what}", positive=True, integer=True)  # varies between tensors
        if op == "eye":
            return Identity(f"I_{attr.size}", real=True)
        if op == "matmul":
            return MatMul(*args)
        if op in _MATRIX_FUNCTIONS:
            return _MATRIX_FUNCTIONS[op](*args)
        if op in _TILED:  # blocks B { } (shampoo helper)
            return _TILED[op](*args)
        return _built(OPS[op], tuple(args))


    def _probe(self, func: str, args):
        """A probe's result: an opaque per-element value (each call its own), or a function
        of its argument."""
        self._probes += 1
        if func == "grad_at":
            return GradAt(*args)
        if func == "hvp":
            return HessianVector(*args)
        facts = {"nonnegative": True} if func == "gauss_newton" else {}
        return ElementSymbol(f"{func}_{self._probes}", real=True, **facts)


@functools.lru_cache(maxsize=8192)
def _built(make, args: tuple):
    """``make(*args)``, remembered: the checker translates the same program many times (under
    each switch setting, each branch, each set of state signs the range analysis tries), and
    SymPy's Max, Min and Piecewise search their arguments on every construction. A SymPy
    expression is immutable and compares by structure, so an equal result is the same one."""
    return make(*args)


def _where(cond, a, b):
    if cond is sympy.true:
        return a
    if cond is sympy.false:
        return b
    return sympy.Piecewise((a, cond), (b, True))


OPS = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "mod": sympy.Mod, "neg": lambda a: -a,
    "sqrt": sympy.sqrt, "rsqrt": lambda a: 1 / sympy.sqrt(a), "exp": sympy.exp, "log": sympy.log,
    "abs": sympy.Abs, "sign": sympy.sign, "min": sympy.Min, "max": sympy.Max,
    "clamp": lambda x, lo, hi: sympy.Min(sympy.Max(x, lo), hi),
    "lerp": lambda a, b, w: a + w * (b - a), "where": _where, "atan2": sympy.atan2,
    "eq": sympy.Eq, "ne": sympy.Ne, "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge,
    "and": sympy.And, "or": sympy.Or, "not": sympy.Not,
}


def outputs(program: Program, translate: Translator | None = None) -> dict:
    """``{"param'": ..., "m'": ..., ...}``: every next value as SymPy."""
    translate = translate or Translator(program)
    return {f"{name}'": translate(node) for name, node in program.next.items()}


def change_of_variables(expr, kind: str, sure: bool = False) -> dict:
    """A substitution after which ``expr`` is a fresh symbol with the assumption ``kind``
    (positive, nonzero, ...): a symbol is replaced by one that carries it; a compound
    expression linear in one of its symbols has that symbol solved for. The fresh symbol is
    an element symbol where ``expr`` varies per element, so reductions still see it vary.
    With ``sure``, the symbol solved for has a coefficient SymPy knows is never 0: a proof
    after the change says nothing where it would be (a law's ``given`` relies on the
    counterexample search there)."""
    return dict(_change_of_variables(expr, kind, sure))  # a copy: the remembered one stays as it is


@functools.lru_cache(maxsize=2048)  # the range analysis asks for the same change many times
def _change_of_variables(expr, kind: str, sure: bool) -> dict:
    cls = ElementSymbol if varies_per_element(expr) else sympy.Symbol
    fresh = cls(expr.name if expr.is_Symbol else f"({expr})", real=True, **{kind: True})
    if expr.is_Symbol:
        return {expr: fresh}
    candidates = sorted(expr.free_symbols, key=lambda s: (not isinstance(s, ElementSymbol), s.name))
    for var in candidates:
        coeff = sympy.diff(expr, var)
        if coeff.is_zero or (sure and not coeff.is_nonzero) or var in coeff.free_symbols:
            continue  # decided before expanding the rest, which can take seconds
        rest = sympy.expand(expr - coeff * var)
        if var in rest.free_symbols:
            continue
        return {var: (fresh - rest) / coeff}
    return {}
