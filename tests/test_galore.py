"""GaLore (gradspec/stdlib/galore.opt) and the two language capabilities it is written with:
shape conditions (``if matrix and rows >= cols { }``, decided per tensor when the step is
compiled) and a base running in a projected space (its moments shaped like the projected
gradient). Parity with the float64 reference over 120 steps is in test_matrix_parity.py."""
import copy

import pytest
import torch

import gradspec
from gradspec.compiler.ir import build
from gradspec.compiler.shaped import segments
from gradspec.compiler.lowerer import BucketShape

F64 = torch.float64


def _linear(rows, cols, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(cols, rows).double()  # weight: rows x cols


def _step(params, spec, backend="eager", steps=1, **hyper):
    opt = gradspec.Optimizer(params, spec, backend=backend, **hyper)
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    return opt


# ---- shape conditions -------------------------------------------------------------------------

BRANCHING = '''"""Tall, wide and vector tensors move by different multiples of the gradient."""
optimizer branching
hyper lr = 0.1 >= 0
hyper widest: int = 8 >= 1
if matrix and rows >= cols {
    d = 2 * grad
} else if matrix {
    d = 3 * grad
} else if cols <= widest {
    d = grad
} else {
    d = 5 * grad
}
param' = param - lr * d
'''


def _branching_tensors():
    shapes = [(4, 2), (2, 4), (3,), (5, 2), (6, 3, 1, 1), (2, 7), (10,)]
    return [torch.ones(*s, dtype=F64, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.compiled)])
def test_a_shape_condition_treats_tall_wide_and_long_tensors_differently(backend):
    tensors = _branching_tensors()
    _step(tensors, gradspec.parse(BRANCHING), backend)
    # by hand: 1 - 0.1 * factor, the factor of each tensor's class (a 6x3x1x1 filter is a 6x3 matrix view)
    expected = [1 - 0.2, 1 - 0.3, 1 - 0.1, 1 - 0.2, 1 - 0.2, 1 - 0.3, 1 - 0.5]
    for t, value in zip(tensors, expected):
        assert torch.equal(t.detach(), torch.full_like(t, value)), (tuple(t.shape), value)


def test_there_is_a_class_per_distinct_answer_tuple_not_per_tensor():
    program = build(gradspec.parse(BRANCHING))
    # tall, wide, short vector, long vector: four classes for seven tensors of six shapes
    assert len(program.by_class) == 4
    assert program.class_of(True, 4, 2) == program.class_of(True, 6, 3) == program.class_of(True, 1, 1)
    assert program.class_of(True, 2, 4) != program.class_of(True, 4, 2)
    assert program.class_of(False, 1, 3) != program.class_of(False, 1, 10)
    assert next(iter(program.by_class)) == program.class_of(True, 1, 1)  # laws are sampled on a 1 x 1 tensor
    # a bucket's segments end where the shape or the class changes: three 4x2 tall matrices in a row
    # are one segment (one batch of the step's graph), a 2x8 wide one and a 16-vector one each
    shapes = ((4, 2), (4, 2), (4, 2), (2, 8), (16,))
    bucket = BucketShape(sum(torch.Size(s).numel() for s in shapes), len(shapes), F64, shapes)
    cut = segments(bucket, program)
    assert [(seg.count, seg.shape_class) for seg in cut] == [
        (3, program.class_of(True, 4, 2)), (1, program.class_of(True, 2, 8)), (1, program.class_of(False, 1, 16))]


def test_a_shape_condition_reads_an_int_hyperparameter():
    tensors = [torch.ones(9, dtype=F64, requires_grad=True)]
    _step(tensors, gradspec.parse(BRANCHING), widest=10)
    assert torch.equal(tensors[0].detach(), torch.full((9,), 0.9, dtype=F64))


MIXED = """optimizer mixed
hyper lr = 0.1 >= 0
if matrix and lr > 0.05 {
    d = 2 * grad
} else {
    d = grad
}
param' = param - lr * d
"""


@pytest.mark.parametrize("lr, matrix_factor", [(0.1, 2), (0.01, 1)])
def test_a_condition_may_read_the_shape_class_and_a_real_hyperparameter(lr, matrix_factor):
    """``if matrix and lr > 0.05`` was refused with 'matrix ... read it in an if condition'
    (the fact the branch learns about lr was built as if the class were a tensor value)."""
    gradspec.check(gradspec.parse(MIXED))
    matrix, vector = torch.ones(3, 2, dtype=F64, requires_grad=True), torch.ones(4, dtype=F64, requires_grad=True)
    _step([matrix, vector], gradspec.parse(MIXED), lr=lr)
    assert torch.equal(matrix.detach(), torch.full((3, 2), 1 - lr * matrix_factor, dtype=F64))
    assert torch.equal(vector.detach(), torch.full((4,), 1 - lr, dtype=F64))


def test_changing_a_shape_conditions_bound_after_a_step_re_decides_the_class():
    """A structural int read by a shape condition keys the plan, as a switch does: the step
    after ``widest`` changes takes the other branch (it used to keep the first plan's)."""
    vector = torch.ones(9, dtype=F64, requires_grad=True)
    opt = gradspec.Optimizer([vector], gradspec.parse(BRANCHING), backend="eager")
    vector.grad = torch.ones_like(vector)
    opt.step()  # 9 > widest = 8: the long-vector branch, 5 * grad
    assert torch.equal(vector.detach(), torch.full((9,), 0.5, dtype=F64))
    opt.param_groups[0]["widest"] = 10
    opt.step()  # now cols <= widest: grad
    assert torch.equal(vector.detach(), torch.full((9,), 0.4, dtype=F64))


@pytest.mark.parametrize("spec, name, value, back", [("galore(adam)", "rank", 1, 3),
                                                      ("shampoo", "max_preconditioner_dim", 2, 1024)])
def test_an_int_that_sizes_states_changed_after_a_step_is_refused_and_changes_nothing(spec, name, value, back):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3, dtype=F64))
    opt = gradspec.Optimizer([w], spec, backend="eager", **{name: back})
    w.grad = torch.randn_like(w)
    opt.step()
    before, kept = {k: v.clone() for k, v in opt.state[w].items()}, w.detach().clone()
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match="sizes states"):
        opt.step()
    assert torch.equal(w.detach(), kept)
    assert all(torch.equal(before[k], opt.state[w][k]) for k in before)
    opt.param_groups[0][name] = back
    opt.step()  # set back, it steps on from the same states
    assert not torch.equal(w.detach(), kept)


def test_specs_without_shape_conditions_keep_one_class_per_kind():
    program = build(gradspec.load("adafactor"))
    assert set(program.by_class) == {("matrix",), ("vector",)}
    assert build(gradspec.load("adam")).by_class is None


def test_a_require_on_sizes_is_refused():
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.check(gradspec.parse("optimizer t\nhyper lr = 0.1 >= 0\nrequire rows >= 2\n"
                                      "param' = param - lr * grad\n"))
    assert (error.value.code, error.value.line, error.value.column) == ("GS047", 3, 9)


# ---- galore: the projected space ------------------------------------------------------------------

def test_galore_states_have_the_projected_shapes_and_exactly_their_memory():
    tall, wide = _linear(16, 6), _linear(3, 16)
    params = [tall.weight, tall.bias, wide.weight, wide.bias]
    x = torch.randn(8, 6, dtype=F64)
    wide(torch.tanh(tall(x))).square().mean().backward()
    opt = gradspec.Optimizer(params, "galore(adam)", backend="eager", rank=2)
    opt.step()
    state = opt.state
    assert state[tall.weight]["m"].shape == state[tall.weight]["v"].shape == (16, 2)
    assert state[tall.weight]["galore.P"].shape == (6, 2)
    assert state[wide.weight]["m"].shape == state[wide.weight]["v"].shape == (2, 16)
    assert state[wide.weight]["galore.Q"].shape == (3, 2)
    assert state[tall.bias]["m"].shape == (16,)
    assert state[tall.bias]["galore.P"].shape == (0,)  # a vector keeps no basis
    # the basis is orthonormal: the top right singular vectors of the first gradient
    P = state[tall.weight]["galore.P"]
    assert torch.allclose(P.T @ P, torch.eye(2, dtype=F64), atol=1e-12)
    (plan,) = opt._plans.values()
    (bucket,) = plan.buckets
    stored = sum(b.numel() for b in bucket.states.values())
    rows, cols, r = 16, 6, 2
    tall_only = 2 * rows * r + cols * r + 2 * 16  # m, v in (rows, r), P, and the bias's m, v
    wide_part = 2 * r * 16 + 3 * r + 2 * 3
    assert stored == tall_only + wide_part


def test_galore_state_memory_for_one_tall_matrix():
    layer = _linear(16, 6)
    opt = _step(list(layer.parameters()), "galore(adam)", rank=2)
    (plan,) = opt._plans.values()
    (bucket,) = plan.buckets
    assert sum(b.numel() for b in bucket.states.values()) == 2 * 16 * 2 + 6 * 2 + 2 * 16


def test_galore_of_sgd_at_full_rank_and_unit_scale_is_sgd():
    """A projection onto every singular vector (rank >= min(rows, cols)) keeps the whole
    gradient: with scale 1, galore(sgd) is sgd, to rounding."""
    torch.manual_seed(3)
    grads = [torch.randn(5, 3, dtype=F64), torch.randn(3, 5, dtype=F64), torch.randn(4, dtype=F64)]
    ours = [torch.zeros_like(g, requires_grad=True) for g in grads]
    plain = [torch.zeros_like(g, requires_grad=True) for g in grads]
    a = gradspec.Optimizer(ours, "galore(sgd)", backend="eager", rank=3, scale=1.0, lr=0.1)
    b = gradspec.Optimizer(plain, "sgd", backend="eager", lr=0.1)
    for p, q, g in zip(ours, plain, grads):
        p.grad, q.grad = g.clone(), g.clone()
    a.step(), b.step()
    for p, q in zip(ours, plain):
        assert torch.allclose(p, q, atol=1e-14, rtol=0)
    low = [torch.zeros_like(g, requires_grad=True) for g in grads]
    c = gradspec.Optimizer(low, "galore(sgd)", backend="eager", rank=1, scale=1.0, lr=0.1)
    for p, g in zip(low, grads):
        p.grad = g.clone()
    c.step()
    assert not torch.allclose(low[0], plain[0])  # rank 1 drops part of the gradient


def _batches(n):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(8, 6, generator=gen, dtype=F64), torch.randn(8, 3, generator=gen, dtype=F64))
            for _ in range(n)]


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_a_galore_checkpoint_resumes_bit_for_bit():
    """Saved between two basis refreshes (every 4 steps: 1, 5, 9), resumed past the next one."""
    batches = _batches(12)

    def make(seed):
        model = _mlp(seed)
        return model, gradspec.Optimizer(model.parameters(), "galore(adam)", backend="eager", lr=1e-2, rank=2,
                                         update_proj_gap=4, galore_weight_decay=0.1)

    model, opt = make(0)
    _train(model, opt, batches[:6])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(model, opt, batches[6:])
    fresh, fresh_opt = make(1)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.state[fresh[0].weight]["m"].shape == (16, 2)
    _train(fresh, fresh_opt, batches[6:])
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)
        for name in opt.state[q]:
            assert torch.equal(fresh_opt.state[p][name], opt.state[q][name]), name


def test_galore_decay_is_its_own_and_decays_every_tensor():
    grads = [torch.zeros(4, 2, dtype=F64), torch.zeros(3, dtype=F64)]
    params = [torch.ones_like(g, requires_grad=True) for g in grads]
    opt = gradspec.Optimizer(params, "galore(adam)", backend="eager", lr=0.1, galore_weight_decay=0.5, rank=1)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    for p in params:  # a zero gradient: only the decay moves, (1 - lr * wd) = 0.95
        assert torch.allclose(p, torch.full_like(p, 0.95), atol=1e-15, rtol=0)


@pytest.mark.parametrize("base, line, column, words", [
    ("schedule_free_sgd", 38, 11, "starts at the parameter"),
    ("sophia", 29, 1, "model probe"),
    ("lamb", None, None, "reduces the parameter"),
    ("muon", None, None, "reads the tensor's shape"),
    ("sgd_rms", None, None, "projected space"),
])
def test_a_base_that_cannot_run_projected_is_a_located_error(base, line, column, words):
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.check(f"galore({base})")
    first = error.value.diagnostics[0]
    assert first.code == "GS076" and words in first.message, first.render()
    assert first.line is not None and first.hint
    if line is not None:
        assert (first.line, first.column) == (line, column)
    with pytest.raises(gradspec.SpecError):
        gradspec.Optimizer([torch.zeros(3, 2, requires_grad=True)], f"galore({base})", backend="eager")


def test_galore_checks_with_its_law():
    gradspec.check("galore(adam)")  # raises SpecError on any error
    gradspec.check("galore")


@pytest.mark.parametrize("outer", ["lookahead", "clip_grad_norm", "gc", "agc"])
def test_an_adaptor_over_galore_checks_as_it_runs(outer):
    """The outer adaptor's law puts galore(adam) at rest: the inner base keeps the projected shape
    galore gives it (it was GS067), and the global norm that galore's vectors no longer read
    at rest is no per-class value (it was GS069). An adaptor around galore sees the parameter
    and the real gradient, so it may read their shape (gc, agc: GS076 was for galore's base)."""
    gradspec.check(f"{outer}(galore(adam))")  # raises SpecError on any error


def test_gradient_centralisation_around_galore_is_galore_on_centred_gradients():
    gen = torch.Generator().manual_seed(5)
    shapes = [(6, 4), (3, 5), (4,)]
    grads = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(12)]
    centred = [[g - g.mean(dim=1, keepdim=True) if g.dim() > 1 else g for g in step] for step in grads]
    results = []
    for spec, feed in (("gc(galore(adam))", grads), ("galore(adam)", centred)):
        params = [torch.ones(s, dtype=F64, requires_grad=True) for s in shapes]
        opt = gradspec.Optimizer(params, spec, backend="eager", rank=2, update_proj_gap=5, lr=0.1)
        for step in feed:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in params]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.compiled)])
def test_a_global_value_one_class_reads_is_over_every_tensor(backend):
    spec = gradspec.parse("optimizer t\nhyper lr = 0.1 >= 0\n"
                          "if matrix {\n  d = grad / (1 + global.norm(grad))\n} else {\n  d = grad\n}\n"
                          "param' = param - lr * d\n")
    params = _branching_tensors()
    grads = [torch.randn(p.shape, dtype=F64, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    before = [p.detach().clone() for p in params]
    opt = gradspec.Optimizer(params, spec, backend=backend)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    norm = torch.cat([g.reshape(-1) for g in grads]).norm()
    for p, b, g in zip(params, before, grads):
        torch.testing.assert_close(p.detach(), b - 0.1 * (g / (1 + norm) if g.dim() > 1 else g), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("nesting", ["galore({})", "galore(clip_grad_norm({}))"])
def test_a_base_that_branches_on_the_shape_is_refused_where_its_shape_is_projected(tmp_path, nesting):
    """The base's class would be the parameter's, not the projected gradient's it runs on; an
    adaptor outside galore may branch on the shape (its statements see the parameter)."""
    (tmp_path / "tall_first.opt").write_text(
        "optimizer tall_first\nhyper lr = 0.1 >= 0\nif matrix and rows > 3 {\n  d = 2 * grad\n} else {\n  d = grad\n}\n"
        "param' = param - lr * d\n")
    (tmp_path / "composed.opt").write_text(f'import "tall_first.opt" as t\noptimizer c = {nesting.format("t")}\n')
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.check(str(tmp_path / "composed.opt"))
    first = error.value.diagnostics[0]
    assert (first.code, first.line, first.column) == ("GS076", 3, 4) and "shape condition" in first.message
    gradspec.check("galore(adam)")  # galore's own shape conditions are its own
    (tmp_path / "shrink.opt").write_text("adaptor shrink(base)\nhyper factor = 0.5 > 0\nif matrix {\n"
                                         "  base.grad = factor * grad\n} else {\n  base.grad = grad\n}\n")
    (tmp_path / "outside.opt").write_text('import "shrink.opt" as s\noptimizer o = s(galore(adam))\n')
    gradspec.check(str(tmp_path / "outside.opt"))


def test_a_base_state_starting_at_the_projected_gradient_is_located_in_the_base(tmp_path):
    """galore makes its base's gradient from its basis' next value, which an initial value cannot
    read: the error points at the base's state, where the user can act, and names galore's part."""
    (tmp_path / "from_grad.opt").write_text("optimizer from_grad\nhyper lr = 0.1 >= 0\nstate m = grad\n"
                                            "m' = 0.9 * m + grad\nparam' = param - lr * m'\n")
    (tmp_path / "composed.opt").write_text('import "from_grad.opt" as b\noptimizer c = galore(b)\n')
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.check(str(tmp_path / "composed.opt"))
    first = error.value.diagnostics[0]
    assert (first.code, first.source.filename.endswith("from_grad.opt"), first.line, first.column) == ("GS058", True, 3, 11)
    assert "galore.P'" in first.message and "galore.opt:32" in first.message
