"""Shape-aware specs: axis reductions, states shaped unlike the parameter, matrix algebra,
``repeat`` and ``every`` blocks, shape classes; and the stdlib specs written with them, each
against pytorch-optimizer 4.1 or torch.optim over 100+ steps in float64."""
import pytest
import torch

import gradspec
from gradspec.compiler.ir import build
from gradspec.compiler.lower import lower_step
from gradspec.compiler.lowerer import BucketShape

STEPS = 120
SHAPES = [(6, 4), (5,), (3, 2, 2), (6, 4), (4, 6), (3,)]


def _params(shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def _train(make, shapes=SHAPES, steps=STEPS, seed=0, transform=None):
    """A quadratic pull towards random targets plus seeded noise, ``steps`` steps."""
    params = _params(shapes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    targets = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    opt = make(params)
    for _ in range(steps):
        for p, target in zip(params, targets):
            p.grad = (p.detach() - target) + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if transform is not None:
                p.grad = transform(p)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params]), opt, params


def _relative(ours, theirs) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


BACKENDS = ["eager", pytest.param("compiled", marks=pytest.mark.compiled)]


# ---- the stdlib specs against pytorch-optimizer 4.1 -------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hyper", [{}, dict(relative_step=False, lr=1e-2, weight_decay=0.1, scale_parameter=False),
                                   dict(warmup_init=True, beta1=0.0)], ids=["default", "lr-wd", "warmup"])
def test_adafactor_matches_pytorch_optimizer(hyper, backend):
    from pytorch_optimizer import AdaFactor
    shapes = [(6, 4), (5,), (4, 6), (7,)]  # pytorch-optimizer factors the last two dimensions: 2-D here
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "adafactor", backend=backend, **hyper), shapes)
    beta1 = hyper.get("beta1", 0.9)
    peer_hyper = {k: v for k, v in hyper.items() if k != "beta1"}
    theirs, _, _ = _train(lambda p: AdaFactor(p, betas=(beta1 if beta1 else None, 0.999),
                                              momentum_dtype=torch.float64, **peer_hyper), shapes)
    assert _relative(ours, theirs) < 1e-10


def test_adafactor_keeps_rows_plus_columns_for_a_matrix():
    _, opt, params = _train(lambda p: gradspec.Optimizer(p, "adafactor", backend="eager"), [(6, 4), (5,)], steps=2)
    matrix, vector = opt.state[params[0]], opt.state[params[1]]
    assert matrix["R"].shape == (6,) and matrix["C"].shape == (4,) and matrix["V"].shape == (0,)
    assert vector["V"].shape == (5,) and vector["R"].shape == (0,) and vector["C"].shape == (0,)


def test_adafactor_on_a_vector_equals_its_unfactored_form():
    """A vector is one row: factored, R is its mean and R / mean(R) is 1, so the factored
    estimate is C = the EMA of g^2 itself."""
    text = gradspec.load("adafactor").source.text.replace("if matrix {", "if true {")
    factored = gradspec.parse(text, "factored.opt")
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, factored, backend="eager"), [(7,), (3,)])
    plain, _, _ = _train(lambda p: gradspec.Optimizer(p, "adafactor", backend="eager"), [(7,), (3,)])
    assert _relative(ours, plain) < 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hyper", [dict(lr=0.05), dict(lr=0.02, momentum=0.5, weight_decay=0.01)], ids=["plain", "momentum-wd"])
def test_shampoo_matches_pytorch_optimizer(hyper, backend):
    from pytorch_optimizer import Shampoo
    shapes = [(6, 4), (5,), (4, 6)]
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "shampoo", backend=backend, **hyper), shapes)
    theirs, _, _ = _train(lambda p: Shampoo(p, **hyper), shapes)
    assert _relative(ours, theirs) < 1e-8


def test_shampoo_refreshes_its_roots_every_k_steps_without_a_closure():
    _, opt, params = _train(lambda p: gradspec.Optimizer(p, "shampoo", backend="eager",
                                                         preconditioning_compute_steps=3), [(4, 3)], steps=4)
    state = opt.state[params[0]]
    assert state["L"].shape == (4, 4) and state["R_root"].shape == (3, 3)
    # refreshed at steps 1 and 4: the root is that of L after step 4
    expected = torch.linalg.matrix_power(state["L"], 1)
    vals, vecs = torch.linalg.eigh(expected)
    root = vecs @ torch.diag(vals ** -0.25) @ vecs.T
    assert torch.allclose(state["L_root"], root, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gc_matches_pytorch_optimizer_centralisation(backend):
    from pytorch_optimizer.optimizer.gradient_centralization import centralize_gradient

    def centred(p):
        g = p.grad.clone()
        centralize_gradient(g, gc_conv_only=False)
        return g
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "gc(sgd)", backend=backend, lr=0.05, momentum=0.9))
    theirs, _, _ = _train(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), transform=centred)
    assert _relative(ours, theirs) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_agc_matches_pytorch_optimizer_clipping(backend):
    from pytorch_optimizer.optimizer.agc import agc
    shapes = [(6, 4), (5,), (2, 3, 2, 2), (4, 6)]  # 3-D tensors differ: pytorch-optimizer reduces dim 1 only
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "agc(adam)", backend=backend, lr=1e-2, agc_clip_val=0.05), shapes)
    theirs, _, _ = _train(lambda p: torch.optim.Adam(p, lr=1e-2), shapes,
                          transform=lambda p: agc(p.detach(), p.grad, agc_eps=1e-3, agc_clip_val=0.05, eps=1e-6))
    assert _relative(ours, theirs) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_adamw_is_muon_on_matrices_and_adamw_on_the_rest(backend):
    """The split in one spec equals the two-optimizer recipe (muon's in-language iteration, and
    torch.optim.AdamW on the vectors)."""
    shapes = [(6, 4), (5,), (3, 2, 2), (3,)]
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "muon_adamw", backend=backend, adamw_lr=3e-3,
                                                     adamw_weight_decay=0.1, weight_decay=0.01), shapes)

    class Both:
        def __init__(self, params):
            self.opts = [gradspec.Optimizer([p for p in params if p.ndim >= 2], "muon", backend="eager",
                                            ns_bfloat16=False, weight_decay=0.01),
                         torch.optim.AdamW([p for p in params if p.ndim < 2], lr=3e-3, weight_decay=0.1,
                                           betas=(0.9, 0.95), eps=1e-10)]  # muon_adamw's (the Muon authors') defaults

        def step(self):
            for opt in self.opts:
                opt.step()
    theirs, _, _ = _train(Both, shapes)
    assert _relative(ours, theirs) < 1e-10


def test_muon_in_language_iteration_equals_the_batched_kernel():
    """tensor.orthogonalize is an optimised lowering of muon.opt's own repeat loop: in float64
    the two agree to rounding."""
    text = gradspec.load("muon").source.text.replace("O = tensor.orthogonalize(u, true)",
                                                     "O = tensor.orthogonalize(u, false)")
    kernel = gradspec.parse(text, "kernel.opt")
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "muon", backend="eager", ns_bfloat16=False))
    theirs, _, _ = _train(lambda p: gradspec.Optimizer(p, kernel, backend="eager", ns_bfloat16=True))
    assert _relative(ours, theirs) < 1e-10


# ---- the constructs ----------------------------------------------------------------------------

def _spec(body: str, hypers: str = "hyper lr = 0.1 >= 0\n"):
    return gradspec.parse("optimizer t\n" + hypers + body)


def _one_step(spec, shapes=((4, 3), (5,), (2, 3, 2)), **hyper):
    params = _params(shapes)
    opt = gradspec.Optimizer(params, spec, backend="eager", **hyper)
    grads = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
             for i, p in enumerate(params)]
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return before, grads, params, opt


def _matrix(t):
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


@pytest.mark.parametrize("axis", ["row", "col"])
@pytest.mark.parametrize("func", ["sum", "mean", "max", "norm"])
def test_axis_reductions_broadcast_back(axis, func):
    before, grads, params, _ = _one_step(_spec(f"param' = param - {axis}.{func}(grad)\n"))
    dim = 1 if axis == "row" else 0
    reduce = {"sum": lambda m: m.sum(dim, keepdim=True), "mean": lambda m: m.mean(dim, keepdim=True),
              "max": lambda m: m.amax(dim, keepdim=True), "norm": lambda m: m.norm(dim=dim, keepdim=True)}[func]
    for b, g, p in zip(before, grads, params):
        expected = _matrix(b) - reduce(_matrix(g)).expand_as(_matrix(g))
        assert torch.allclose(_matrix(p.detach()), expected, rtol=1e-12, atol=1e-12)


def test_states_are_shown_in_their_declared_shapes_and_take_what_they_declare():
    spec = _spec("state s: tensor = 0\nstate r: rows = 0\nstate c: cols = 0\nstate L: (rows, rows) = 0\n"
                 "state Q: (cols, k) = 0\ns' = s + tensor.numel\nr' = r + row.sum(grad)\nc' = c + col.sum(grad)\n"
                 "L' = L + grad @ transpose(grad)\nQ' = svd_right(grad, k)\nparam' = param - lr * grad\n",
                 "hyper lr = 0.1 >= 0\nhyper k: int = 2 >= 1\n")
    _, grads, params, opt = _one_step(spec)
    shapes = {name: tuple(opt.state[params[0]][name].shape) for name in "srcLQ"}
    assert shapes == {"s": (), "r": (4,), "c": (3,), "L": (4, 4), "Q": (3, 2)}
    assert tuple(opt.state[params[2]]["L"].shape) == (2, 2) and tuple(opt.state[params[1]]["c"].shape) == (5,)
    assert opt.state[params[2]]["s"].item() == 12
    assert torch.allclose(opt.state[params[0]]["L"], grads[0] @ grads[0].T)
    # memory: exactly what is declared, per state, over the bucket
    declared = {"s": 3, "r": 4 + 1 + 2, "c": 3 + 5 + 6, "L": 16 + 1 + 4, "Q": 6 + 10 + 12}
    plan = next(iter(opt._plans.values()))
    held = {name: sum(b.states[name].numel() for b in plan.buckets) for name in declared}
    assert held == declared


def test_matrix_algebra_within_a_tensor():
    spec = _spec("G = grad @ transpose(grad) + eye(rows)\n"
                 "param' = param - lr * inv_root(G, 2) @ grad + 0 * trace(G) + 0 * qr(grad)\n")
    before, grads, params, _ = _one_step(spec, shapes=((4, 3),))
    g = grads[0]
    vals, vecs = torch.linalg.eigh(g @ g.T + torch.eye(4, dtype=torch.float64))
    expected = before[0] - 0.1 * (vecs @ torch.diag(vals ** -0.5) @ vecs.T) @ g
    assert torch.allclose(params[0].detach(), expected, rtol=1e-12, atol=1e-12)


def test_eigen_decomposition_orders_eigenvalues_descending():
    spec = _spec("state e: (1, rows) = 0\ne' = eigvals(grad @ transpose(grad))\nparam' = param\n")
    _, grads, params, opt = _one_step(spec, shapes=((3, 5),))
    values = opt.state[params[0]]["e"].reshape(-1)
    assert torch.allclose(values, torch.linalg.eigvalsh(grads[0] @ grads[0].T).flip(0))


def test_repeat_iterates_a_loop_variable():
    spec = _spec("x = grad\nrepeat k {\n  y = x * 2\n  x' = y + 1\n}\nparam' = x'\n", "hyper k: int = 3 >= 1\n")
    _, grads, params, _ = _one_step(spec, shapes=((3,),))
    assert torch.allclose(params[0].detach(), ((grads[0] * 2 + 1) * 2 + 1) * 2 + 1)


def test_every_block_runs_at_steps_1_k_plus_1_without_a_closure():
    spec = _spec("state n: global = 0\nevery k { n' = n + 1 }\nparam' = param\n", "hyper k: int = 3 >= 1\n")
    params = _params([(2,)])
    opt = gradspec.Optimizer(params, spec, backend="eager")
    counts = []
    for _ in range(7):
        params[0].grad = torch.ones(2, dtype=torch.float64)
        opt.step()
        counts.append(opt.state[params[0]]["n"].item())
    assert counts == [1, 1, 1, 2, 2, 2, 3]


def test_small_gaps_inf_atan2_numel_and_global_state_at_a_hyperparameter():
    spec = _spec("state d: global = d0\nd' = d + 1\n"
                 "param' = param - lr * atan2(grad, 1) * min(tensor.numel, inf) / global.numel + d * 0\n",
                 "hyper lr = 0.1 >= 0\nhyper d0 = 5 > 0\n")
    before, grads, params, opt = _one_step(spec, shapes=((2, 3), (4,)), d0=7.0)
    assert opt.state[params[0]]["d"].item() == 8.0
    for b, g, p in zip(before, grads, params):
        assert torch.allclose(p.detach(), b - 0.1 * torch.atan2(g, torch.ones_like(g)) * g.numel() / 10)


def test_inf_is_a_literal_where_values_are_written():
    spec = _spec("param' = param - lr * min(grad, cap)\n", "hyper lr = 0.1 >= 0\nhyper cap = inf > 0\n")
    assert spec.hypers["cap"].default == float("inf")


def test_betas_of_any_length_map_to_beta1_beta2_beta3():
    spec = _spec("param' = param - lr * (beta1 + beta2 + beta3) * grad\n",
                 "hyper lr = 0.1 >= 0\nhyper beta1 = 0.1\nhyper beta2 = 0.2\nhyper beta3 = 0.3\n")
    opt = gradspec.Optimizer(_params([(2,)]), spec, backend="eager", betas=(0.5, 0.25, 0.125))
    assert (opt.param_groups[0]["beta1"], opt.param_groups[0]["beta2"], opt.param_groups[0]["beta3"]) == \
        (0.5, 0.25, 0.125)
    with pytest.raises(ValueError, match="betas"):
        gradspec.Optimizer(_params([(2,)]), "adam", backend="eager", betas=(0.5, 0.25, 0.125))


def test_the_graph_grows_with_the_shapes_not_the_tensors():
    program = build(gradspec.load("shampoo"))

    def nodes(shapes):
        numel = sum(torch.Size(s).numel() for s in shapes)
        return len(lower_step(program, [BucketShape(numel, len(shapes), torch.float64, tuple(shapes))]).main.graph.nodes)
    assert nodes([(4, 3)] * 2 + [(5,)] * 2) == nodes([(4, 3)] * 40 + [(5,)] * 40)


@pytest.mark.parametrize("text, code, line, column", [
    ("param' = param - lr * grad @ grad\n", "GS067", 3, 18),
    ("state L: (rows, rows) = 0\nL' = L + grad\nparam' = param\n", "GS067", 4, 6),
    ("param' = param - lr * (grad + row.mean(grad) @ transpose(row.mean(grad)))\n", "GS067", 3, 24),
    ("state L: (rows, q) = 0\nL' = L\nparam' = param\n", "GS068", 3, 1),
    ("param' = param - lr * inv_root(grad @ transpose(grad), 4) @ grad\n", "GS073", 3, 32),
    ("param' = param - lr * foo.mean(grad)\n", "GS055", 3, 23),
    ("x = grad\nrepeat 2 {\n  y = x\n  x' = y\n}\nparam' = param - lr * y\n", "GS068", 8, 23),
])
def test_shape_errors_are_located(text, code, line, column):
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.check(_spec(text))
    found = [(d.code, d.span.line, d.span.column) for d in info.value.diagnostics]
    assert (code, line, column) in found, found


def test_a_psd_statistic_makes_its_inverse_root_provably_defined():
    gradspec.check(_spec("state L: (rows, rows) = eps * eye(rows)\nL' = L + grad @ transpose(grad)\n"
                         "param' = param - lr * inv_root(L', 4) @ grad\n",
                         "hyper lr = 0.1 >= 0\nhyper eps = 1e-6 > 0\n"))
    with pytest.raises(gradspec.SpecError) as info:  # eps >= 0 allows a singular start
        gradspec.check(_spec("state L: (rows, rows) = eps * eye(rows)\nL' = L + grad @ transpose(grad)\n"
                             "param' = param - lr * inv_root(L', 4) @ grad\n",
                             "hyper lr = 0.1 >= 0\nhyper eps = 1e-6 >= 0\n"))
    assert info.value.code == "GS073"
    # a 1 x 1 matrix is a matrix: a positive multiple of eye(1) is definite, of a 0 one is not
    gradspec.check(_spec("param' = param - lr * grad * inv_root(2 * eye(1), 2)\n"))
    with pytest.raises(gradspec.SpecError, match="GS073"):
        gradspec.check(_spec("param' = param - lr * grad * inv_root(lr * eye(1), 2)\n", "hyper lr = 0.1 >= 0\n"))


def test_shape_class_names_stay_ordinary_names():
    spec = _spec("matrix = 2 * grad\nrepeat = 3\nrows = 1\nparam' = param - lr * matrix * repeat * rows\n")
    before, grads, params, _ = _one_step(spec, shapes=((3,),))
    assert torch.allclose(params[0].detach(), before[0] - 0.1 * 2 * grads[0] * 3)


def test_show_cost_calls_a_refresh_block_periodic_work_not_a_probe(capsys):
    from gradspec.cli import main
    assert main(["show", "shampoo", "--cost"]) == 0
    out = capsys.readouterr().out
    assert "every preconditioning_compute_steps = 1 steps: periodic work, no model evaluation" in out
    assert "probe every" not in out


# ---- SOAP: descending(d), qr(M, f32), the identity held by a law, the spec ---------------------

def _steps(spec, shapes, grads, backend="eager", **hyper):
    """``spec`` stepped once per gradient list of ``grads``; (params, optimizer)."""
    params = _params(shapes)
    opt = gradspec.Optimizer(params, spec, backend=backend, **hyper)
    for step in grads:
        for p, g in zip(params, step):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", BACKENDS)
def test_descending_is_the_sorting_permutation_and_products_with_it_are_exact(backend):
    """``descending(d)`` is the 0/1 matrix P with d @ P sorted descending: M @ P orders M's columns
    and transpose(P) @ M its rows, bit for bit as indexing does, both where the lowering gathers
    (a product with descending(...) itself) and where it multiplies (a stored P)."""
    spec = _spec("state P: (cols, cols) = 0\nstate C: (rows, cols) = 0\nstate R: (rows, cols) = 0\n"
                 "state B: (rows, cols) = 0\nstate S: (rows, cols) = 0\n"
                 "P' = descending(col.sum(grad))\nC' = grad @ descending(col.sum(grad))\n"
                 "R' = transpose(descending(row.max(grad))) @ grad\n"
                 "B' = C' @ transpose(descending(col.sum(grad)))\nS' = grad @ P\nparam' = param\n")
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (5, 7), (9,)]
    grad = [torch.randn(s, generator=gen, dtype=torch.float64) * 10 ** torch.randint(-3, 3, s, generator=gen)
            for s in shapes]
    params, opt = _steps(spec, shapes, [grad, grad], backend)
    for p, g in zip(params, grad):
        m = _matrix(g)
        columns = torch.argsort(m.sum(0), descending=True)
        rows = torch.argsort(m.amax(1), descending=True)
        state = {k: opt.state[p][k].reshape(m.shape[-1], -1) if k == "P" else opt.state[p][k].reshape(m.shape)
                 for k in "PCRBS"}
        assert torch.equal(state["P"], torch.eye(m.shape[1], dtype=m.dtype)[:, columns])
        assert torch.equal(state["C"], m[:, columns]) and torch.equal(state["S"], m[:, columns])
        assert torch.equal(state["R"], m[rows]) and torch.equal(state["B"], m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qr_in_float32_is_a_float32_qr_cast_back(backend):
    spec = _spec("state Q: (rows, cols) = 0\nstate F: (rows, cols) = 0\nQ' = qr(grad)\nF' = qr(grad, single)\n"
                 "param' = param\n", "hyper single = true\n")
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params, opt = _steps(spec, [(6, 4)], [[g]], backend)
    state = opt.state[params[0]]
    assert torch.equal(state["F"], torch.linalg.qr(g.float()).Q.double())
    assert torch.allclose(state["Q"], torch.linalg.qr(g).Q, rtol=0, atol=1e-14)
    assert (state["F"] - state["Q"]).abs().max() > 1e-9  # the float32 factor really is another one


@pytest.mark.parametrize("backend", BACKENDS)
def test_qr_of_a_wide_matrix_is_its_lq_factor_with_orthonormal_rows(backend):
    spec = _spec("state Q: (rows, cols) = 0\nQ' = qr(grad)\nparam' = param\n")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(4, 6), (6, 4), (5, 5)]]
    params, opt = _steps(spec, [g.shape for g in grads], [grads], backend)
    for p, m in zip(params, grads):
        q = opt.state[p]["Q"]
        assert q.shape == m.shape
        if m.shape[0] < m.shape[1]:  # M = L Q, L lower triangular, Q with orthonormal rows
            torch.testing.assert_close(q @ q.T, torch.eye(m.shape[0], dtype=torch.float64), rtol=0, atol=1e-13)
            lower = m @ q.T
        else:  # M = Q R, R upper triangular, Q with orthonormal columns
            torch.testing.assert_close(q.T @ q, torch.eye(m.shape[1], dtype=torch.float64), rtol=0, atol=1e-13)
            lower = (q.T @ m).T
        assert lower.triu(1).abs().max() < 1e-13
        torch.testing.assert_close(lower @ q if m.shape[0] < m.shape[1] else q @ lower.T, m, rtol=0, atol=1e-13)


def test_a_law_holds_a_matrix_state_at_the_identity_and_finds_a_free_one():
    """``given S == eye(n)`` puts the identity in the place of a state; the parts of an ``and``
    are facts of their own shapes. A law over matrices is sampled on a one-element tensor, so a
    basis left free is a counterexample (GS081), not an unproven claim."""
    body = ("state L: (rows, rows) = eye(rows)\nstate R: (cols, cols) = eye(cols)\nL' = L\nR' = R\n"
            "param' = param - lr * L @ grad @ transpose(R)\n")
    gradspec.check(_spec(body + "law equals sgd given L == eye(rows) and R == eye(cols)\n"))
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.check(_spec(body + "law equals sgd given L == eye(rows)\n"))
    assert info.value.code == "GS081" and "R = " in info.value.message


def test_eye_is_the_unit_of_the_product_in_the_step():
    """I @ A and transpose(I) are folded when the step is built: no product, the same numbers."""
    program = build(_spec("param' = param - lr * (eye(rows) @ grad @ transpose(eye(cols)))\n"))
    assert not any(n.op in ("matmul", "transpose", "eye") for n in program.nodes())


def test_soap_matches_the_reference_normalized_and_with_its_own_decay_of_the_statistics():
    """The default setting is tests/test_matrix_parity.py's case (both backends); this is
    tests/test_matrix_references.py's second. 1e-4: the float32 QR of each refresh (see there)."""
    import matrix_references as ref
    from test_matrix_references import flat, model, relative_error, train
    kw = dict(precondition_frequency=7, weight_decay=0.0, beta1=0.9, beta2=0.99, normalize_gradient=True,
              shampoo_beta=0.9)
    ours, _ = train(lambda p: gradspec.Optimizer(p, "soap", backend="eager", **kw))
    theirs, _ = train(lambda p: ref.SOAP(p, **kw))
    assert relative_error(ours, theirs) < 1e-4
    assert relative_error(flat(model().parameters()), theirs) > 1e-3


@pytest.mark.parametrize("kw", [dict(precondition_1d=True), dict(precondition_1d=True, correct_bias=False, lr=1e-2)],
                         ids=["corrected", "uncorrected"])
def test_soap_with_a_basis_for_vectors_matches_the_reference(kw):
    """precondition_1d on the quadratic task with short vectors, whose statistics reach full rank
    before the first refresh (on the MLP's 16-vector the refresh QRs an ill-conditioned basis in
    float32, and the reference and pytorch-optimizer themselves part by 3e-2 over 120 steps)."""
    import matrix_references as ref
    shapes = [(5, 5), (4,), (3,), (6, 4)]
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "soap", backend="eager", **kw), shapes)
    theirs, _, _ = _train(lambda p: ref.SOAP(p, **kw), shapes)
    assert _relative(ours, theirs) < 1e-12
    assert _relative(_params(shapes)[0].detach().reshape(-1), theirs[:25]) > 1e-2


def test_soap_step_1_builds_only_the_statistics_and_the_bases():
    """pytorch-optimizer's step 1: GG = (1 - shampoo_beta) G G^T, Q its eigenvectors (largest
    eigenvalue first); the parameters and the moments do not move. A vector keeps no basis."""
    shapes = [(4, 3), (5,)]
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
             for i, s in enumerate(shapes)]
    params, opt = _steps("soap", shapes, [grads])
    for p, before in zip(params, _params(shapes)):
        assert torch.equal(p.detach(), before)
    matrix, vector = opt.state[params[0]], opt.state[params[1]]
    g = grads[0]
    assert torch.equal(matrix["GG_L"], 0.050000000000000044 * (g @ g.T))
    assert torch.equal(matrix["Q_L"], torch.linalg.eigh(matrix["GG_L"] + 1e-30 * torch.eye(4, dtype=g.dtype))
                       .eigenvectors.flip(1))
    assert matrix["Q_R"].shape == (3, 3) and matrix["m"].abs().max() == 0 and matrix["v"].abs().max() == 0
    assert vector["Q_L"].shape == (0,) and vector["Q_R"].shape == (0,) and vector["GG_R"].shape == (0,)
    assert vector["v"].shape == (5,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soap_batches_tensors_of_one_shape(backend):
    """Three 5 x 5 matrices go through each product and decomposition as one batch; per tensor
    the numbers are the reference's (square gradients: a well-posed first basis, where a
    rank-deficient statistic's null space would take its basis from rounding)."""
    import matrix_references as ref
    shapes = [(5, 5)] * 3 + [(7,)]
    ours, _, _ = _train(lambda p: gradspec.Optimizer(p, "soap", backend=backend, precondition_frequency=4), shapes)
    theirs, _, _ = _train(lambda p: ref.SOAP(p, precondition_frequency=4), shapes)
    assert _relative(ours, theirs) < 1e-6


def test_soap_refresh_graph_grows_with_the_shapes_not_the_tensors():
    from gradspec.compiler.ir import build_probing
    program = build_probing(gradspec.load("soap"))

    def nodes(shapes):
        numel = sum(torch.Size(s).numel() for s in shapes)
        return len(lower_step(program, [BucketShape(numel, len(shapes), torch.float64, tuple(shapes))]).main.graph.nodes)
    assert nodes([(4, 3)] * 2 + [(5,)] * 2) == nodes([(4, 3)] * 40 + [(5,)] * 40)


def test_a_congruence_keeps_a_statistic_definite_only_in_an_orthogonal_basis():
    """transpose(B) @ L @ B is PD for a PD L and an orthogonal B (eigenvectors, a QR factor, a
    permutation), only PSD for any other B: its inverse root is then GS073."""
    hypers = "hyper lr = 0.1 >= 0\nhyper eps = 1e-6 > 0\n"
    start = "state L: (rows, rows) = eps * eye(rows)\nL' = L + grad @ transpose(grad)\n"
    for basis in ("eigvecs(L')", "qr(L')", "descending(row.sum(grad))", "eigvecs(L') @ qr(L')"):
        gradspec.check(_spec(start + f"B = {basis}\nparam' = param - lr * inv_root(transpose(B) @ L' @ B, 2) @ grad\n",
                             hypers))
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.check(_spec(start + "B = L' - eye(rows)\nparam' = param - lr * inv_root(transpose(B) @ (L' @ B), 2) @ grad\n",
                             hypers))
    assert info.value.code == "GS073"
    gradspec.check(_spec(start + "B = L' - eye(rows)\nparam' = param - lr * inv_root(transpose(B) @ (L' @ B), 2, eps) @ grad\n",
                         hypers))


def _draws(opt, params) -> list:
    """What randn() draws next from the optimizer's generator: a standard Gaussian per element,
    tensor after tensor in the order of their buckets (the parameters' order here: the shapes are
    listed by size, as a bucket lays out shape-aware specs)."""
    generator = torch.Generator().set_state(opt.generator.get_state())
    return [torch.randn(p.numel(), generator=generator, dtype=torch.float64).reshape(p.shape) for p in params]


def _step_taken(opt, params, lr: float) -> list:
    """One step on gradients of ones; each parameter's move, divided by -lr."""
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return [(b - p.detach()) / lr for p, b in zip(params, before)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use", ["d = s'", "if matrix {\n  d = s' + 0 * row.mean(grad)\n} else {\n  d = s'\n}"],
                         ids=["elementwise", "shape-aware"])
def test_randn_in_an_every_block_draws_afresh_at_steps_1_k_plus_1(use, backend):
    spec = _spec(f"state s = 0\nevery k {{\n  s' = randn()\n}}\n{use}\nparam' = param - lr * d\n",
                 "hyper lr = 0.5 >= 0\nhyper k: int = 3 >= 1\n")
    params = _params([(5,), (4, 3), (2, 3, 3)])
    opt = gradspec.Optimizer(params, spec, backend=backend)
    for t in range(1, 8):
        if (t - 1) % 3 == 0:
            drawn = _draws(opt, params)
        for taken, d in zip(_step_taken(opt, params, 0.5), drawn):
            torch.testing.assert_close(taken, d, rtol=1e-12, atol=1e-12)
    assert opt.evaluations.closure_calls == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_drawn_initial_state_reads_as_drawn_by_row_reductions_and_shape_branches(backend):
    spec = _spec("state n = randn()\nn' = n\nif matrix {\n  d = n - row.mean(n)\n} else {\n  d = n\n}\n"
                 "param' = param - lr * d\n", "hyper lr = 0.5 >= 0\n")
    params = _params([(5,), (4, 3), (2, 3, 3)])
    opt = gradspec.Optimizer(params, spec, backend=backend)
    drawn = _draws(opt, params)
    for p, taken, n in zip(params, _step_taken(opt, params, 0.5), drawn):
        expected = n if n.dim() == 1 else n - n.reshape(n.shape[0], -1).mean(dim=1).reshape(-1, *[1] * (n.dim() - 1))
        torch.testing.assert_close(taken, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["n"], n, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_over_tensors_without_elements_leave_the_others_as_if_they_were_absent(backend):
    """A max or min over no element is its identity (-inf, inf), as a sum over none is 0, so a
    tensor with no elements changes nothing, and the step does not fail on it."""
    terms = [f"{scope}.{func}({arg})" for scope in ("global", "tensor", "row", "col")
             for func, arg in (("max", "abs(grad)"), ("min", "-abs(grad)"), ("sum", "grad"), ("mean", "grad"))]
    spec = _spec(f"d = 1 + abs({' + '.join(terms)})\nparam' = param - lr * grad / d\n")
    shapes = [(2, 3), (4,), (3, 3)]
    full, _, _ = _train(lambda ps: gradspec.Optimizer(ps, spec, backend=backend), shapes=shapes, steps=5)
    with_empty, _, params = _train(lambda ps: gradspec.Optimizer(ps, spec, backend=backend),
                                   shapes=[(0, 3)] + shapes + [(3, 0), (0,)], steps=5)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(with_empty, full, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_descending_of_no_entries_is_the_empty_permutation(backend):
    spec = _spec("P = descending(transpose(row.sum(grad)))\nparam' = param - lr * transpose(P) @ grad\n")
    alone, _, _ = _train(lambda ps: gradspec.Optimizer(ps, spec, backend=backend), shapes=[(3, 2)], steps=3)
    with_empty, _, _ = _train(lambda ps: gradspec.Optimizer(ps, spec, backend=backend),
                              shapes=[(0, 2), (3, 2), (2, 0)], steps=3)
    torch.testing.assert_close(with_empty, alone, rtol=0, atol=0)
