"""Facts about per-tensor matrices: which are positive semi-definite (PSD) or definite (PD), so
that an inverse root such as ``inv_root(L + eps * eye(rows), 4)`` is proven defined.

The rules are the textbook closure properties: G Gᵀ and Gᵀ G are PSD; the identity is PD; a
sum of PSD matrices is PSD, and PD if one term is; a nonnegative multiple of a PSD matrix is
PSD (PD for a positive multiple of a PD one); ``lerp(A, B, w)`` with w in [0, 1] mixes two PSD
(PD) matrices into one; a zero matrix is PSD; B^T A B is PSD when A is (PD when A is and B is
square and orthogonal). A state is PSD when it starts PSD and its next value is PSD whenever it
is (induction over the steps), and so is a value of the decompositions that keep the spectrum
nonnegative (an inverse root).
"""
from __future__ import annotations

import sympy

from ..compiler.ir import Node, Program, dims_of


def definiteness(node: Node, program: Program, ranges, assumed: dict | None = None) -> str | None:
    """"pd", "psd" or None (not proven) for a per-tensor square matrix ``node``; ``ranges(n)``
    gives a scalar node's Range."""
    assumed = dict(assumed or {})
    return _definiteness(node, program, ranges, assumed, set())


def _nonnegative(node, ranges) -> bool:
    r = ranges(node)
    return r is not None and r.lo >= 0


def _positive(node, ranges) -> bool:
    r = ranges(node)  # a ranges.Range (ranges.py uses this module: no import back)
    return r is not None and (r.lo > 0 or (r.lo == 0 and not r.lo_closed))


def _definiteness(node, program, ranges, assumed, visiting) -> str | None:
    op = node.op
    if op == "const":
        return "psd" if node.attr == 0 else ("pd" if node.attr > 0 and dims_of(node) is None else None)
    if op == "eye":
        return "pd"
    if op == "inv_root":
        return "pd"  # the eigenvalues floored and raised to a power: positive where it is defined
    if op == "matmul":
        a, b = node.args
        if (b.op == "transpose" and b.args[0] is a) or (a.op == "transpose" and a.args[0] is b):
            return "psd"
        return _congruent(a, b, program, ranges, assumed, visiting)
    if op == "state":
        if node.attr in assumed:
            return assumed[node.attr]
        if node.attr in visiting:
            return None
        init, nxt = program.init.get(node.attr), program.next.get(node.attr)
        if init is None or nxt is None:
            return None
        visiting.add(node.attr)
        start = _definiteness(init, program, ranges, assumed, visiting)
        result = None
        if start is not None:  # induction: assume the state has its start's property, check the step keeps it
            inner = dict(assumed)
            inner[node.attr] = start
            kept = _definiteness(nxt, program, ranges, inner, set())
            if kept == start or kept == "pd":
                result = start
            elif kept == "psd":
                result = "psd"
        visiting.discard(node.attr)
        assumed[node.attr] = result
        return result
    if op == "add":
        parts = [_definiteness(a, program, ranges, assumed, visiting) if dims_of(a) is not None
                 else ("pd" if _positive(a, ranges) else "psd" if _nonnegative(a, ranges) else None)
                 for a in node.args]
        if None in parts:
            return None
        return "pd" if "pd" in parts else "psd"
    if op == "mul":
        matrices = [a for a in node.args if dims_of(a) is not None and dims_of(a) != (1, 1)]
        if not matrices:  # 1 x 1 factors: a matrix such as eye(1) among per-tensor numbers
            matrices = [a for a in node.args if dims_of(a) == (1, 1) and a.op != "const"
                        and _definiteness(a, program, ranges, assumed, visiting) is not None][:1]
        scalars = [a for a in node.args if a not in matrices]
        if len(matrices) != 1 or not all(_nonnegative(s, ranges) for s in scalars):
            return None
        inner = _definiteness(matrices[0], program, ranges, assumed, visiting)
        if inner is None:
            return None
        return "pd" if inner == "pd" and all(_positive(s, ranges) for s in scalars) else "psd"
    if op == "lerp":
        a, b, w = node.args
        r = ranges(w)
        if r is None or r.lo < 0 or r.hi > 1:
            return None
        parts = [_definiteness(x, program, ranges, assumed, visiting) for x in (a, b)]
        if None in parts:
            return None
        return "pd" if parts == ["pd", "pd"] else "psd"
    return None


def _congruent(a, b, program, ranges, assumed, visiting) -> str | None:
    """B^T A B, written (transpose(B) @ A) @ B or transpose(B) @ (A @ B): PSD when A is (x^T B^T A
    B x = y^T A y), and PD when A is and B is square and orthogonal (no nonzero x maps to 0):
    SOAP's transpose(Q) @ GG @ Q."""
    if a.op == "matmul" and a.args[0].op == "transpose":
        basis, inner, other = a.args[0].args[0], a.args[1], b
    elif b.op == "matmul" and a.op == "transpose":
        basis, inner, other = a.args[0], b.args[0], b.args[1]
    else:
        return None
    if other is not basis:
        return None
    found = _definiteness(inner, program, ranges, assumed, visiting)
    if found is None:
        return None
    return "pd" if found == "pd" and _orthogonal(basis) else "psd"


def _orthogonal(node) -> bool:
    """A square matrix with orthonormal columns: the identity, eigenvectors of a symmetric
    matrix, the Q of a square QR, a permutation, their transposes and products."""
    dims = dims_of(node)
    if dims is None or dims[0] != dims[1]:
        return False
    if node.op in ("eye", "eigvecs", "qr", "descending"):
        return True
    if node.op == "transpose":
        return _orthogonal(node.args[0])
    if node.op == "matmul":
        return all(_orthogonal(x) for x in node.args)
    return False


# ---- a matrix law's concrete instance --------------------------------------------------------

def one_element(expr):
    """``expr`` on a tensor of one element, whose matrix view is 1 x 1, so that the
    counterexample search can evaluate a law over matrices, as it evaluates a reduction over
    a one-element tensor: the identity is 1, a product multiplies, a transpose, trace or
    eigenvalue is the entry itself, and each decomposition is what torch returns for a 1 x 1
    matrix [x] (eigenvector, Q and right singular vector 1, left singular vector sign(x) with
    0 giving 1, A^(-1/p) = max(x, floor)^(-1/p), a permutation 1). A law that holds for every
    matrix holds here; a basis left free where the law meant to hold it at the identity is a
    number that moves the update, and is found."""
    from .translate import Identity, MatMul, MatrixFunction  # translate never imports this module

    def entry(f):
        x = f.args[0]
        if f.name in ("transpose", "trace", "eigvals"):
            return x
        if f.name == "inv_root":
            power, floor = f.args[1], f.args[2] if len(f.args) > 2 else sympy.Integer(0)
            return sympy.Max(x, floor) ** (-1 / power)
        if f.name == "svd_left":
            return sympy.Piecewise((-1, x < 0), (1, True))
        return sympy.Integer(1)  # eigvecs, qr, svd_right, descending

    expr = expr.replace(lambda e: isinstance(e, MatrixFunction), entry)
    expr = expr.replace(lambda e: isinstance(e, MatMul), lambda e: e.args[0] * e.args[1])
    return expr.xreplace({s: sympy.Integer(1) for s in expr.free_symbols if isinstance(s, Identity)})
