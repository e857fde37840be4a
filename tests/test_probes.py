"""Probes: the dimer and Lanczos against exact linear algebra, the schedule and the number of
model evaluations each step declares, the closure protocol and its errors, and resuming."""
import math

import pytest
import torch

import gradspec
from gradspec import cli
from gradspec.compiler.cost import step_cost
from gradspec.runtime.lanczos import lanczos


def _quadratic(seed=0, n=12, low=-1.0, high=3.0):
    """A symmetric matrix with eigenvalues spread over [low, high], and its eigenpairs."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    values = torch.linspace(low, high, n, dtype=torch.float64)
    return q @ torch.diag(values) @ q.T, values, q


def _angle_degrees(a, b):
    cosine = abs(float(torch.dot(a, b) / (a.norm() * b.norm())))
    return math.degrees(math.acos(min(1.0, cosine)))


@pytest.mark.parametrize("rot_sign, which", [(-1, 0), (1, -1)], ids=["minimum", "maximum"])
def test_dimer_rotations_find_the_extreme_curvature_direction(rot_sign, which):
    """On 1/2 x^T A x, with lr = 0 so the point stays put, DEO's rotations drive N to the
    minimum-curvature eigenvector (rot_sign = -1, the paper's intent) or to the sharpest one
    (+1, the rule as printed)."""
    a, values, vectors = _quadratic()
    x = torch.nn.Parameter(torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    opt = gradspec.Optimizer([x], "deo(sgd)", backend="eager", lr=0.0, T=1, rot_lr=0.2, dR=1e-4,
                             rot_sign=rot_sign)
    for _ in range(400):
        opt.step(lambda: 0.5 * x @ a @ x)
    direction = opt.state[x]["deo.N"]
    assert abs(float(direction.norm()) - 1) < 1e-12
    assert _angle_degrees(direction, vectors[:, which]) < 2.0
    curvature = float(direction @ a @ direction)
    assert abs(curvature - float(values[which])) < 1e-3


def test_lanczos_eigenvalues_match_eigh_of_a_small_mlps_full_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    inputs, targets = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss_of(flat):
        pieces, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            pieces[name] = flat[offset:offset + size].view(shape)
            offset += size
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, pieces, (inputs,)), targets)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat)).flip(0)
    values, vectors = gradspec.hessian_eigenpairs(
        lambda: torch.nn.functional.mse_loss(model(inputs), targets), model.parameters(), k=4, iters=flat.numel())
    assert torch.allclose(values, exact[:4], rtol=1e-6, atol=0)
    basis = torch.cat([v.reshape(4, -1) for v in vectors], dim=1)
    assert torch.allclose(basis @ basis.T, torch.eye(4, dtype=torch.float64), atol=1e-8)
    # with fewer steps than parameters, the top eigenvalue is already there
    few, _ = gradspec.hessian_eigenpairs(lambda: torch.nn.functional.mse_loss(model(inputs), targets),
                                         model.parameters(), k=1, iters=20)
    assert abs(float(few[0] - exact[0])) < 1e-6 * float(exact[0])


def test_lanczos_on_split_vectors_with_an_early_closing_krylov_space():
    """A start vector in a 2-dimensional invariant subspace: the iteration stops after two
    steps, and the directions it cannot find come back as zeros, not noise."""
    a, values, vectors = _quadratic(n=6)
    start = vectors[:, 0] + vectors[:, 5]
    found, pieces = lanczos(lambda v: [(a @ torch.cat(v)).reshape(-1)[:3], (a @ torch.cat(v))[3:]],
                            [start[:3], start[3:]], k=3, iters=6)
    assert torch.allclose(found[:2], torch.stack([values[5], values[0]]), atol=1e-12)
    assert float(found[2]) == 0 and float(torch.cat(pieces, dim=1)[2].abs().sum()) == 0


def _counting_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    inputs, targets = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    forwards = []

    def closure():
        forwards.append(1)
        return torch.nn.functional.mse_loss(model(inputs), targets)
    return model, closure, forwards


@pytest.mark.parametrize("spec, hyper, steps, expected, declared", [
    # rotations at t = 1, 4, 7, 10: one extra closure call each
    ("deo(adam)", {"T": 3}, 10, {"closure_calls": 14, "gradients": 14, "hvps": 0}, (1 + 1 / 3, 0)),
    ("sophia", {"k": 4}, 10, {"closure_calls": 10, "gradients": 10, "hvps": 3}, (1, 1 / 4)),  # t = 1, 5, 9
    ("bulk_sgd", {"R": 2, "k": 2, "lanczos_steps": 5}, 10, {"closure_calls": 10, "gradients": 10, "hvps": 25},
     (1, 5 / 2)),
    ("deo(sophia)", {"T": 2, "k": 5}, 6, {"closure_calls": 9, "gradients": 9, "hvps": 2}, (1.5, 1 / 5)),
])
def test_probes_run_exactly_every_k_steps_with_the_declared_evaluations(spec, hyper, steps, expected, declared):
    model, closure, forwards = _counting_model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", lr=1e-2, **hyper)
    for _ in range(steps):
        opt.step(closure)
    assert opt.evaluations.as_dict() == expected
    assert len(forwards) == expected["closure_calls"]
    cost = step_cost(gradspec.load(spec), hyper)  # what `gradspec show --cost` prints, per step
    assert (cost.closure_calls, cost.hvps) == pytest.approx(declared)


def test_a_probe_spec_without_a_closure_names_its_probes():
    model, _, _ = _counting_model()
    model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    opt = gradspec.Optimizer(model.parameters(), "deo(adam)", backend="eager")
    with pytest.raises(RuntimeError, match=r"deo\(adam\) probes the model \(grad_at\): call step\(closure\)"):
        opt.step()


def test_exact_hvps_refuse_a_closure_that_calls_backward_and_a_gradient_probe_accepts_it():
    model, _, _ = _counting_model()
    inputs, targets = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def backward_closure():
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    opt = gradspec.Optimizer(model.parameters(), "sophia", backend="eager")
    with pytest.raises(RuntimeError, match="must return the loss without calling backward"):
        opt.step(backward_closure)

    # DEO only evaluates gradients: both closure styles give the same run
    runs = []
    for style in ("backward", "loss only"):
        torch.manual_seed(3)
        net = torch.nn.Linear(3, 2).double()

        def closure():
            net.zero_grad()
            loss = torch.nn.functional.mse_loss(net(inputs), targets)
            if style == "backward":
                loss.backward()
            return loss
        opt = gradspec.Optimizer(net.parameters(), "deo(adam)", backend="eager", lr=1e-2, T=2)
        for _ in range(7):
            opt.step(closure)
        runs.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_sophia_g_needs_the_logits_and_leaves_no_graph_behind():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    inputs, labels = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    opt = gradspec.Optimizer(model.parameters(), "sophia_g", backend="eager")
    with pytest.raises(RuntimeError, match=r"must return \(loss, logits\)"):
        opt.step(lambda: torch.nn.functional.cross_entropy(model(inputs), labels))

    def closure():
        logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits, labels), logits
    for _ in range(3):
        loss = opt.step(closure)
    assert not loss.requires_grad
    for p in model.parameters():
        assert p.grad.grad_fn is None and not p.grad.requires_grad
    assert float(opt.state[model.weight]["h"].min()) >= 0  # a Gauss-Newton estimate is never negative
    assert float(opt.state[model.weight]["h"].abs().sum()) > 0


@pytest.mark.parametrize("old_format", [False, True], ids=["current", "generator-at-top-level"])
@pytest.mark.parametrize("spec", ["deo(adam)", "sophia", "bulk_dom(adam, k=2, lanczos_steps=6, R=3)"])
def test_a_checkpoint_of_a_probe_spec_resumes_bit_for_bit(spec, old_format):
    """The state dict holds the generator: a resumed run draws the same Gaussian directions
    (DEO's start, Hutchinson's u, Lanczos's start) as the uninterrupted one."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
        return model, gradspec.Optimizer(model.parameters(), spec, backend="eager", lr=1e-2, seed=7)

    inputs, targets = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)

    def closure_of(model):
        return lambda: torch.nn.functional.mse_loss(model(inputs), targets)

    model, opt = make()
    for _ in range(5):
        opt.step(closure_of(model))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = opt.state_dict()
    saved = {**saved, "state": {i: {k: v.clone() for k, v in s.items()} for i, s in saved["state"].items()}}
    if old_format:  # checkpoints written before the generator moved into the first group
        groups = [dict(g) for g in saved["param_groups"]]
        saved = {**saved, "param_groups": groups, "generator": groups[0].pop("generator")}
    for _ in range(6):
        opt.step(closure_of(model))
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    model, opt = make()
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved)
    for _ in range(6):
        opt.step(closure_of(model))
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), expected)


def test_the_generator_state_is_kept_out_of_the_printed_optimizer():
    opt = gradspec.Optimizer([torch.nn.Parameter(torch.zeros(2))], "deo(adam)", seed=3)
    assert "generator" not in repr(opt) and "lr" in repr(opt)
    assert torch.equal(opt.state_dict()["param_groups"][0]["generator"], opt.generator.get_state())


def test_each_parameter_group_probes_its_own_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    inputs, targets = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "alpha": 0.5}]
    opt = gradspec.Optimizer(groups, "deo(adamw)", backend="eager", lr=1e-2, T=2)
    for _ in range(4):
        opt.step(lambda: torch.nn.functional.mse_loss(model(inputs), targets))
    assert opt.evaluations.closure_calls == 4 + 2 * 2  # two rotations, one closure call per group each
    for group in opt.param_groups:  # each group's N is a unit vector over its own parameters
        norm = sum(float((opt.state[p]["deo.N"] ** 2).sum()) for p in group["params"])
        assert abs(norm - 1) < 1e-12


def test_show_cost_prints_the_declared_evaluations(capsys):
    assert cli.main(["show", "deo(adam)", "--cost"]) == 0
    out = capsys.readouterr().out
    assert "closure calls (forward passes)   1.1" in out
    assert "probe every T = 10 steps: grad_at: 1 closure call, 1 gradient, 0 HVP" in out
    assert "40 bytes per parameter (10 float32 buffers" in out  # adam's 7, N, and a pass over grad and N for <g, N>
    assert cli.main(["show", "adam", "--cost"]) == 0
    adam = capsys.readouterr().out
    assert "28 bytes per parameter (7 float32 buffers" in adam  # param r/w, grad, m and v r/w


def test_sophia_matches_pytorch_optimizers_sophia_h_given_the_same_probe_vectors():
    """pytorch-optimizer's SophiaH clips m / max(h, eps) at p; ours clips m / max(gamma h, eps)
    at 1, so theirs with p = gamma, eps / gamma, lr / gamma and weight decay * gamma is ours.
    Its Hutchinson vectors come from torch.randn_like per parameter: here they are handed the
    slices of the flat vector our generator draws, so both runs see the same u."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    hyper = {"lr": 2e-2, "beta1": 0.9, "beta2": 0.95, "gamma": 0.05, "eps": 1e-4, "weight_decay": 0.1, "k": 3}

    def model_and_data():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
        return model, torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)

    model, inputs, targets = model_and_data()
    ours = gradspec.Optimizer(model.parameters(), "sophia", backend="eager", seed=5, **hyper)
    for _ in range(60):
        ours.step(lambda: torch.nn.functional.mse_loss(model(inputs), targets))
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    model, inputs, targets = model_and_data()
    params = list(model.parameters())
    gamma = hyper["gamma"]
    theirs = pytorch_optimizer.SophiaH(params, lr=hyper["lr"] / gamma, betas=(hyper["beta1"], hyper["beta2"]),
                                       weight_decay=hyper["weight_decay"] * gamma, weight_decouple=True,
                                       p=gamma, eps=hyper["eps"] / gamma, update_period=hyper["k"])
    generator = torch.Generator().manual_seed(5)

    def randn_like(p, *args, **kwargs):  # our draw order: one draw per parameter, at its size
        return torch.randn(p.numel(), generator=generator, dtype=torch.float64).view_as(p)

    def closure():
        theirs.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward(create_graph=True)
        return loss

    original = torch.randn_like
    torch.randn_like = randn_like
    try:
        for _ in range(60):
            theirs.step(closure)
    finally:
        torch.randn_like = original
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), float((got - expected).abs().max())
    assert float((got - expected).abs().max()) < 1e-10


def test_parameters_outside_the_loss_or_linear_in_it_get_no_curvature_and_no_update():
    """Found in review: exact HVPs crashed on a gradient without a graph. A parameter the
    loss is linear in has H v = 0; one the loss does not use keeps p.grad None and is not
    updated, as in torch.optim."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    unused = torch.nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = gradspec.Optimizer([w, b, unused], "sophia", backend="eager", k=1, weight_decay=0.1)
    for _ in range(3):
        opt.step(lambda: (w ** 2).sum() + b.sum())
    assert float(opt.state[b]["h"].abs().sum()) == 0  # linear in b: no curvature
    assert float(opt.state[w]["h"].abs().sum()) > 0
    assert unused.grad is None and float(unused) == 3.0


def test_review_findings_give_clear_errors_or_work():
    with pytest.raises(gradspec.SpecError, match="GS018"):
        gradspec.parse("optimizer t\nhyper lr = 0.1 >= 0\nhyper k: int = 2 >= 1\n"
                       "probe every k {\n  param' = param - lr * grad\n}\n")
    # a global state set inside a probe is kept in between; a scalar probe argument broadcasts
    spec = gradspec.parse("optimizer t\nhyper lr = 0.1 >= 0\nhyper k: int = 2 >= 1\nstate s: global = 0\n"
                          "probe every k {\n  s' = global.sum(hvp(lr) * 0 + 1)\n}\n"
                          "param' = param - lr * grad / (1 + abs(s'))\n")
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = gradspec.Optimizer([p], spec, backend="eager")
    for _ in range(3):
        opt.step(lambda: (p ** 2).sum())
    assert float(opt.state[p]["s"]) == 3.0
    opt.param_groups[0]["k"] = 0
    with pytest.raises(ValueError, match="k = 0 breaks the constraint k >= 1"):
        opt.step(lambda: (p ** 2).sum())
    with pytest.raises(RuntimeError, match=r"must return the loss or \(loss, logits\), got 3 values"):
        gradspec.Optimizer([p], "sophia", backend="eager").step(lambda: ((p ** 2).sum(), None, None))
