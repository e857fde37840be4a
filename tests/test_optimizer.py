"""gradspec.Optimizer as a torch.optim.Optimizer: param groups (their own hyperparameters and
switches), schedulers and torch-style ``betas``, checkpoints and state_dict, closures,
validation, dtypes, missing gradients and frozen or moved parameters, zero_grad and the
gradient hook, non-finite policies, the compiled backend's compile count, step counters per
bucket, and specs that read the loss.

(Hardening against bad input, refused loads and torch.optim state dicts is
tests/test_hardening_runtime.py; the functional core is tests/test_functional.py.)

References are torch.optim's own optimizers (float64, so the comparisons are tight) or a
second gradspec optimizer where the claim is bit-for-bit equality.
"""
import copy
import io

import pytest
import torch
from torch._dynamo.utils import counters

import gradspec
from gradspec.compiler import backends

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- helpers
def _model(dtype=F64, seed=0, hidden=6):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))
    return model.to(dtype)


def _batches(n, dtype=F64, seed=123):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g).to(dtype), torch.randn(8, 2, generator=g).to(dtype)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _train(model, opt, batches, scheduler=None, plateau=False, set_to_none=True):
    lrs = []
    for batch in batches:
        opt.zero_grad(set_to_none=set_to_none)
        loss = _loss(model, batch)
        loss.backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler is not None:
            scheduler.step(loss.item()) if plateau else scheduler.step()
    return lrs


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _torch_adam(params, **kw):
    return torch.optim.Adam(params, foreach=False, **kw)


# ---------------------------------------------------------------- param groups
def test_param_groups_with_their_own_lr_equal_two_separate_optimizers():
    batches = _batches(12)
    first, last = 0, 2

    grouped = _model()
    opt = gradspec.Optimizer(
        [{"params": grouped[first].parameters(), "lr": 0.01},
         {"params": grouped[last].parameters(), "lr": 0.05, "betas": (0.8, 0.99)}],
        "adam", backend="eager", lr=1e-3)
    _train(grouped, opt, batches)

    separate = _model()
    opt_a = gradspec.Optimizer(separate[first].parameters(), "adam", backend="eager", lr=0.01)
    opt_b = gradspec.Optimizer(separate[last].parameters(), "adam", backend="eager", lr=0.05, beta1=0.8, beta2=0.99)
    for batch in batches:
        opt_a.zero_grad()
        opt_b.zero_grad()
        _loss(separate, batch).backward()
        opt_a.step()
        opt_b.step()

    for p, q in zip(grouped.parameters(), separate.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[1]["beta1"] == 0.8 and opt.param_groups[1]["betas"] == (0.8, 0.99)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)

    reference = _model()
    torch_opt = _torch_adam([{"params": reference[first].parameters(), "lr": 0.01},
                             {"params": reference[last].parameters(), "lr": 0.05, "betas": (0.8, 0.99)}], lr=1e-3)
    _train(reference, torch_opt, batches)
    torch.testing.assert_close(_flat(grouped), _flat(reference), **TIGHT)

    # and the per-group values matter: one shared lr gives something else
    shared = _model()
    _train(shared, gradspec.Optimizer(shared.parameters(), "adam", backend="eager", lr=0.01), batches)
    assert not torch.allclose(_flat(shared), _flat(grouped), rtol=1e-6, atol=1e-8)


def test_a_switch_set_in_one_param_group_gives_only_that_group_its_state():
    """momentum > 0 switches SGD's buffer on: one group gets a plan with a buffer, the other
    a plain step, and together they match torch.optim.SGD with the same groups."""
    batches = _batches(12)
    results, states = [], []
    for make in (lambda groups: gradspec.Optimizer(groups, "sgd", backend="eager", lr=0.01),
                 lambda groups: torch.optim.SGD(groups, lr=0.01, foreach=False)):
        model = _model()
        opt = make([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "momentum": 0.9}])
        _train(model, opt, batches)
        results.append(_flat(model))
        states.append((set(opt.state[model[0].weight]), set(opt.state[model[2].weight])))
    torch.testing.assert_close(results[0], results[1], **TIGHT)
    assert "buf" not in states[0][0] and "buf" in states[0][1]


def test_a_switch_turned_on_mid_training_rebuilds_the_plan():
    batches = _batches(8)
    results = []
    for make in (lambda p: gradspec.Optimizer(p, "sgd", backend="eager", lr=0.05),
                 lambda p: torch.optim.SGD(p, lr=0.05, foreach=False)):
        model = _model()
        opt = make(model.parameters())
        _train(model, opt, batches[:3])
        opt.param_groups[0]["momentum"] = 0.9
        _train(model, opt, batches[3:])
        results.append(_flat(model))
    torch.testing.assert_close(results[0], results[1], **TIGHT)
    plain = _model()
    _train(plain, gradspec.Optimizer(plain.parameters(), "sgd", backend="eager", lr=0.05), batches)
    assert not torch.allclose(_flat(plain), results[0], rtol=1e-6, atol=1e-8)  # the momentum was used


def test_a_param_group_added_later_is_used_with_its_own_lr():
    model = _model()
    opt = gradspec.Optimizer(model[0].parameters(), "adam", backend="eager", lr=0.01)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.03, "betas": (0.85, 0.995)})
    reference = _model()
    torch_opt = _torch_adam(reference[0].parameters(), lr=0.01)
    torch_opt.add_param_group({"params": reference[2].parameters(), "lr": 0.03, "betas": (0.85, 0.995)})
    batches = _batches(6)
    _train(model, opt, batches)
    _train(reference, torch_opt, batches)
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)


def test_a_refused_param_group_is_not_left_in_the_optimizer():
    """add_param_group with a bad value raises ValueError; like torch.optim's own checks, the
    refusal must leave param_groups as it was (else the next step runs beta1 = 1.5)."""
    model = _model()
    opt = gradspec.Optimizer(model[0].parameters(), "adam", backend="eager", lr=0.01)
    with pytest.raises(ValueError, match=r"beta1 in \[0, 1\)"):
        opt.add_param_group({"params": model[2].parameters(), "beta1": 1.5})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- lr schedulers
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[4, 9], gamma=0.3),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=15),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.001, max_lr=0.05, step_size_up=3),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1.0 + e)),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=6),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=10, power=2.0),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7)], milestones=[3]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0,
                                                                            threshold=10.0),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("spec, torch_cls, hyper", [
    ("sgd", torch.optim.SGD, dict(lr=0.02, momentum=0.9)),
    ("adam", torch.optim.Adam, dict(lr=0.02)),
], ids=["sgd", "adam"])
def test_lr_schedulers_drive_the_lr_actually_used(name, spec, torch_cls, hyper):
    batches = _batches(15)
    plateau = name == "ReduceLROnPlateau"

    model = _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **hyper)
    lrs = _train(model, opt, batches, SCHEDULERS[name](opt), plateau)

    reference = _model()
    torch_opt = torch_cls(reference.parameters(), foreach=False, **hyper)
    torch_lrs = _train(reference, torch_opt, batches, SCHEDULERS[name](torch_opt), plateau)

    assert lrs == pytest.approx(torch_lrs, rel=1e-15)
    assert len(set(lrs)) > 2  # the schedule really moved the lr
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)

    constant = _model()
    _train(constant, gradspec.Optimizer(constant.parameters(), spec, backend="eager", **hyper), batches)
    assert not torch.allclose(_flat(constant), _flat(model), rtol=1e-6, atol=1e-8)


def test_torch_style_betas_and_beta1_beta2_stay_in_sync_and_are_used():
    """``betas`` (torch.optim's name, which OneCycleLR and CyclicLR write) and the spec's
    beta1/beta2 are one value: whichever a user or scheduler writes is what the step reads."""
    batches = _batches(3)
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.01, betas=(0.8, 0.95))
    torch_opt = _torch_adam(reference.parameters(), lr=0.01, betas=(0.8, 0.95))
    group = opt.param_groups[0]
    assert (group["beta1"], group["beta2"], group["betas"]) == (0.8, 0.95, (0.8, 0.95))
    _train(model, opt, batches[:1])
    _train(reference, torch_opt, batches[:1])
    group["betas"] = torch_opt.param_groups[0]["betas"] = (0.7, 0.9)
    _train(model, opt, batches[1:2])
    _train(reference, torch_opt, batches[1:2])
    assert (group["beta1"], group["beta2"]) == (0.7, 0.9)
    group["beta2"] = 0.99  # as a user would write it
    torch_opt.param_groups[0]["betas"] = (0.7, 0.99)
    _train(model, opt, batches[2:])
    _train(reference, torch_opt, batches[2:])
    assert group["betas"] == (0.7, 0.99)
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)


def test_one_cycle_momentum_cycling_reaches_the_beta1_adam_reads():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    seen = []
    for batch in _batches(5):
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        seen.append((opt.param_groups[0]["betas"][0], opt.param_groups[0]["beta1"]))
        scheduler.step()
    for betas0, beta1 in seen:
        assert betas0 == beta1  # what the scheduler set is what the spec read
    assert len({b for b, _ in seen}) == len(seen)


# ---------------------------------------------------------------- checkpoints
CHECKPOINT_CASES = [
    pytest.param("eager", {}, id="eager-adam"),
    pytest.param("eager", {"amsgrad": True}, id="eager-amsgrad"),
    pytest.param("compiled", {}, id="compiled-adam", marks=pytest.mark.compiled),
    pytest.param("compiled", {"amsgrad": True}, id="compiled-amsgrad", marks=pytest.mark.compiled),
]


@pytest.mark.parametrize("backend, hyper", CHECKPOINT_CASES)
def test_checkpoint_resumes_bit_for_bit(backend, hyper):
    batches = _batches(20)

    def make(seed, dtype=F64):
        model = _model(dtype, seed=seed)
        opt = gradspec.Optimizer(model.parameters(), "adam", backend=backend, lr=0.02, weight_decay=1e-3, **hyper)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)

    model, opt, scheduler = make(0)
    _train(model, opt, batches[:10], scheduler)
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}
    in_memory = copy.deepcopy(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    if hyper.get("amsgrad"):
        assert "vmax" in opt.state[model[0].weight]
    _train(model, opt, batches[10:], scheduler)
    expected = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    from_disk = torch.load(buffer, weights_only=False)
    for label, saved in [("in memory", in_memory), ("torch.save", from_disk)]:
        fresh, fresh_opt, fresh_scheduler = make(seed=1)  # another init: only the checkpoint can make it equal
        fresh.load_state_dict(saved["model"])
        fresh_opt.load_state_dict(saved["opt"])
        fresh_scheduler.load_state_dict(saved["sched"])
        assert fresh_opt.state[fresh[0].weight]["step"].item() == 10, label
        _train(fresh, fresh_opt, batches[10:], fresh_scheduler)
        for p, q in zip(fresh.parameters(), expected):
            assert torch.equal(p, q), label
        for p, q in zip(fresh.parameters(), model.parameters()):
            assert fresh_opt.state[p]["step"].item() == opt.state[q]["step"].item() == 20, label
            for name in opt.state[q]:
                assert torch.equal(fresh_opt.state[p][name], opt.state[q][name]), (label, name)
        assert fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize("spec", ["adafactor", "shampoo(preconditioning_compute_steps = 3)"])
def test_a_shape_aware_checkpoint_resumes_bit_for_bit(spec):
    """States shaped unlike the parameter (per row, per column, matrices; (0,) for the shape
    class that keeps none) are checked against the shapes they show, and resume exactly."""
    batches = _batches(12)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager")
    _train(model, opt, batches[:5])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(model, opt, batches[5:])
    fresh = _model(seed=1)
    fresh_opt = gradspec.Optimizer(fresh.parameters(), spec, backend="eager")
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    _train(fresh, fresh_opt, batches[5:])
    for p, q in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(p, q)
        assert {n: tuple(v.shape) for n, v in fresh_opt.state[p].items()} == \
            {n: tuple(v.shape) for n, v in opt.state[q].items()}
    wrong = copy.deepcopy(saved["opt"])
    first = next(iter(wrong["state"].values()))
    name = next(n for n, v in first.items() if n != "step" and v.numel() > 0)
    first[name] = torch.zeros(first[name].numel() + 1, dtype=F64)
    with pytest.raises(ValueError, match=f"{name} has shape"):
        fresh_opt.load_state_dict(wrong)


def test_loading_a_checkpoint_into_an_optimizer_that_already_stepped():
    batches = _batches(16)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.02, amsgrad=True)
    _train(model, opt, batches[:8])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, batches[8:])

    other = _model(seed=5)
    other_opt = gradspec.Optimizer(other.parameters(), "adam", backend="eager", lr=0.02, amsgrad=True)
    _train(other, other_opt, _batches(3, seed=9))  # has its own plan, buffers and step count (3)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    other.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    _train(other, other_opt, batches[8:])
    for p, q in zip(other.parameters(), model.parameters()):
        assert torch.equal(p, q)
        assert other_opt.state[p]["step"].item() == 16


def test_state_dict_is_a_snapshot_only_after_copying_like_torch_optim():
    # torch.optim hands out references; gradspec's per-parameter views behave the same, and a
    # deepcopy is an independent snapshot
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.02)
    _train(model, opt, _batches(2))
    snapshot = copy.deepcopy(opt.state_dict())
    assert sorted(snapshot["state"]) == [0, 1, 2, 3] and snapshot["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert snapshot["state"][0]["step"].item() == 2
    assert set(snapshot["state"][0]) == {"step", "m", "v"}
    assert snapshot["state"][0]["m"].shape == model[0].weight.shape  # per parameter, as torch.optim
    assert snapshot["param_groups"][0]["betas"] == (0.9, 0.999) and snapshot["param_groups"][0]["beta2"] == 0.999
    _train(model, opt, _batches(2, seed=7))
    assert snapshot["state"][0]["step"].item() == 2
    assert opt.state_dict()["state"][0]["step"].item() == 4


# ---------------------------------------------------------------- closures
def test_step_with_closure_returns_its_loss_and_runs_with_grad_enabled():
    batches = _batches(5)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.02)
    calls = []

    for batch in batches:
        def closure():
            calls.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = _loss(model, batch)
            loss.backward()
            closure.loss = loss
            return loss

        with torch.no_grad():  # as in an evaluation-style loop: step enables grad for the closure
            returned = opt.step(closure)
        assert returned is closure.loss
    assert calls == [True] * len(batches)

    reference = _model()
    _train(reference, gradspec.Optimizer(reference.parameters(), "adam", backend="eager", lr=0.02), batches)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert opt.step() is None  # no closure, no loss


# ---------------------------------------------------------------- validation
def _params():
    return [torch.nn.Parameter(torch.randn(3, dtype=F64))]


@pytest.mark.parametrize("spec, hyper, constraint", [
    ("adam", dict(beta1=1.0), "beta1 in [0, 1)"),
    ("adam", dict(betas=(0.9, 1.0)), "beta2 in [0, 1)"),
    ("adam", dict(eps=0.0), "eps > 0"),
    ("adam", dict(lr=-1e-3), "lr >= 0"),
    ("lookahead(sgd)", dict(sync_period=0), "sync_period >= 1"),
    ("sgd", dict(nesterov=True, momentum=0), "Nesterov momentum needs momentum > 0 and dampening = 0"),
    ("sgd", dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov momentum needs momentum > 0"),
    ("esgd", dict(alpha=-200.0), "stable only for |alpha| < 1 / (1 - beta)"),
])
def test_hyperparameters_that_break_a_constraint_are_refused_at_construction(spec, hyper, constraint):
    params = _params()
    before = params[0].detach().clone()
    with pytest.raises(ValueError) as info:
        gradspec.Optimizer(params, spec, backend="eager", **hyper)
    assert constraint in str(info.value)
    assert torch.equal(params[0], before)


def test_a_bad_value_in_one_param_group_is_refused():
    with pytest.raises(ValueError, match=r"beta2 in \[0, 1\)"):
        gradspec.Optimizer([{"params": _params()}, {"params": _params(), "betas": (0.9, 1.2)}], "adam", backend="eager")


def test_valid_edge_values_are_accepted_and_step_as_torch_does():
    """The closed ends of the constraints (beta1 = 0, lr = 0) and Nesterov with its
    requirements met are values, not errors: they build and step like torch.optim."""
    for spec, torch_cls, hyper in [("adam", torch.optim.Adam, dict(betas=(0.0, 0.999), lr=0.0)),
                                   ("adam", torch.optim.Adam, dict(betas=(0.0, 0.999), lr=0.1)),
                                   ("sgd", torch.optim.SGD, dict(lr=0.1, nesterov=True, momentum=0.9))]:
        ours, theirs = _params(), _params()
        theirs[0].data.copy_(ours[0])
        start = ours[0].detach().clone()
        opt = gradspec.Optimizer(ours, spec, backend="eager", **hyper)
        torch_opt = torch_cls(theirs, foreach=False, **hyper)
        for grad in (torch.tensor([1.0, -2.0, 0.5], dtype=F64), torch.tensor([0.3, 0.1, -1.0], dtype=F64)):
            for params, o in ((ours, opt), (theirs, torch_opt)):
                params[0].grad = grad.clone()
                o.step()
        torch.testing.assert_close(ours[0], theirs[0], **TIGHT)
        assert torch.equal(ours[0], start) == (hyper["lr"] == 0.0)


@pytest.mark.parametrize("spec, wrong, right", [("adam", "bta1", "beta1"), ("sgd", "momentun", "momentum"),
                                                ("adamw", "weight_decy", "weight_decay")])
def test_an_unknown_hyperparameter_is_a_type_error_with_a_suggestion(spec, wrong, right):
    with pytest.raises(TypeError, match=f"did you mean '{right}'"):
        gradspec.Optimizer(_params(), spec, backend="eager", **{wrong: 0.5})


def test_unknown_backend_and_policy_are_refused():
    with pytest.raises(ValueError, match="backend"):
        gradspec.Optimizer(_params(), "adam", backend="jit")
    with pytest.raises(ValueError, match="nonfinite"):
        gradspec.Optimizer(_params(), "adam", backend="eager", nonfinite="ignore")


# ---------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, TIGHT), (torch.float32, dict(rtol=1e-5, atol=1e-6))],
                         ids=["float64", "float32"])
def test_float_parameters_match_torch_adam_and_keep_their_dtype(dtype, tolerance):
    batches = _batches(10, dtype)
    model = _model(dtype)
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.01)
    _train(model, opt, batches)
    reference = _model(dtype)
    _train(reference, _torch_adam(reference.parameters(), lr=0.01), batches)
    torch.testing.assert_close(_flat(model), _flat(reference), **tolerance)
    for p in model.parameters():
        assert p.dtype == dtype and p.grad.dtype == dtype
        assert opt.state[p]["m"].dtype == dtype and opt.state[p]["v"].dtype == dtype


def test_bfloat16_parameters_track_float32_adam_and_stay_bfloat16():
    model = _model(torch.bfloat16)
    reference = _model(torch.float32)
    with torch.no_grad():  # start from the same (bfloat16-representable) point
        for p, q in zip(model.parameters(), reference.parameters()):
            q.copy_(p.float())
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.01)
    torch_opt = _torch_adam(reference.parameters(), lr=0.01)
    start = _flat(reference).clone()
    for x, y in _batches(10, torch.float32):
        for m, o, dt in [(model, opt, torch.bfloat16), (reference, torch_opt, torch.float32)]:
            o.zero_grad()
            _loss(m, (x.to(dt), y.to(dt))).backward()
            o.step()
    ours = _flat(model).float()
    torch.testing.assert_close(ours, _flat(reference), rtol=0.0, atol=1e-2)
    # it trained: each coordinate moved about 10 * lr, far beyond bfloat16 noise
    assert (ours - start).abs().mean() > 0.02
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        for name in ("m", "v"):
            assert opt.state[p][name].dtype == torch.bfloat16
        assert torch.isfinite(p).all()


# ---------------------------------------------------------------- missing gradients
def test_a_parameter_without_grad_is_skipped_and_starts_at_step_one_later():
    torch.manual_seed(0)
    shapes = [(3, 4), (4,), (2, 3)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    never = torch.nn.Parameter(torch.randn(5, dtype=F64))
    opt = gradspec.Optimizer(ours + [never], "adam", backend="eager", lr=0.05)
    torch_opt = _torch_adam(theirs, lr=0.05)
    late_start = ours[2].detach().clone()
    g = torch.Generator().manual_seed(1)
    for step in range(1, 9):
        grads = [torch.randn(s, dtype=F64, generator=g) for s in shapes]
        for params, o in [(ours, opt), (theirs, torch_opt)]:
            o.zero_grad()
            for i, (p, grad) in enumerate(zip(params, grads)):
                if i < 2 or step > 3:
                    p.grad = grad.clone()
            o.step()
        if step <= 3:
            assert torch.equal(ours[2], late_start)
            assert ours[2] not in opt.state
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, **TIGHT)
    assert opt.state[ours[0]]["step"].item() == 8
    assert opt.state[ours[2]]["step"].item() == 5 == torch_opt.state[theirs[2]]["step"].item()
    assert never.grad is None and never not in opt.state


def test_a_frozen_parameter_is_untouched_by_weight_decay_and_has_no_state():
    """requires_grad=False before the optimizer is built: AdamW's decay would move it if it
    were stepped with a zero gradient."""
    model = _model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = gradspec.Optimizer(model.parameters(), "adamw", backend="eager", lr=0.01, weight_decay=0.5)
    _train(model, opt, _batches(3))
    assert torch.equal(model[0].weight, frozen) and model[0].weight not in opt.state
    assert opt.state[model[0].bias]["step"].item() == 3


def test_parameters_re_pointed_by_the_user_are_the_ones_stepped():
    """``p.data = ...`` after a step (what a device move does) points a parameter away from
    the optimizer's buffer; the next step must update the parameter, not the stale buffer."""
    batches = _batches(5)
    results = []
    for make in (lambda p: gradspec.Optimizer(p, "adam", backend="eager", lr=0.01),
                 lambda p: _torch_adam(p, lr=0.01)):
        model = _model()
        opt = make(model.parameters())
        _train(model, opt, batches[:2])
        for p in model.parameters():
            p.data = p.data.clone()
        _train(model, opt, batches[2:])
        results.append(_flat(model))
    torch.testing.assert_close(results[0], results[1], **TIGHT)


def test_step_counters_survive_gradients_arriving_in_different_steps():
    """Grads come and go per parameter: each keeps its own count (parameters with different
    counts go to different buckets), matching torch.optim.Adam; and a checkpoint taken with
    mixed counts resumes bit for bit."""
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2), (6,)]
    # which parameters get a gradient at each step
    pattern = [{0}, {0, 1}, {0, 1}, {2}, {0, 2}, {1, 2, 3}, {0, 1, 2, 3}, {3}, {0, 3}, {0, 1, 2, 3}]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=F64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = gradspec.Optimizer(ours, "adam", backend="eager", lr=0.05)
    torch_opt = _torch_adam(theirs, lr=0.05)
    g = torch.Generator().manual_seed(2)
    grads = [[torch.randn(s, dtype=F64, generator=g) for s in shapes] for _ in range(len(pattern) + 3)]

    def run(params, o, steps):
        for step in steps:
            o.zero_grad()
            for i in pattern[step] if step < len(pattern) else range(len(shapes)):
                params[i].grad = grads[step][i].clone()
            o.step()

    run(ours, opt, range(len(pattern)))
    run(theirs, torch_opt, range(len(pattern)))
    counts = [sum(i in s for s in pattern) for i in range(len(shapes))]
    assert counts == [7, 5, 5, 5]
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(p, q, **TIGHT)
        assert opt.state[p]["step"].item() == counts[i] == torch_opt.state[q]["step"].item()

    # a parameter that had state keeps it across steps where it has no gradient
    assert len({opt.state[p]["step"].item() for p in ours}) == 2

    saved = copy.deepcopy(opt.state_dict())
    copies = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    run(ours, opt, range(len(pattern), len(pattern) + 3))
    fresh = gradspec.Optimizer(copies, "adam", backend="eager", lr=0.05)
    fresh.load_state_dict(saved)
    run(copies, fresh, range(len(pattern), len(pattern) + 3))
    for i, (p, q) in enumerate(zip(ours, copies)):
        assert torch.equal(p, q)
        assert fresh.state[q]["step"].item() == counts[i] + 3


@pytest.mark.parametrize("spec", ["adam", "deo(adam)", "lamb", "sophia"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_model_and_optimizer_continue_exactly_like_the_original(spec, how):
    """copy.deepcopy((model, opt)) and torch.save/load of both: the copy steps on bit for bit
    (states, step counts and the random generator's position, which Sophia's Hutchinson
    vectors draw from at every step here, included)."""
    model = _model()
    hyper = {"k": 1} if spec == "sophia" else {}
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", lr=0.02, **hyper)
    batches = _batches(8)

    def train(model, opt, batches):
        for batch in batches:
            def closure():
                opt.zero_grad()
                loss = _loss(model, batch)
                if spec != "sophia":  # sophia differentiates the gradient itself
                    loss.backward()
                return loss
            opt.step(closure)

    train(model, opt, batches[:4])
    if how == "deepcopy":
        copied_model, copied_opt = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        copied_model, copied_opt = torch.load(buffer, weights_only=False)
    train(model, opt, batches[4:])
    train(copied_model, copied_opt, batches[4:])
    assert torch.equal(_flat(model), _flat(copied_model))


# ---------------------------------------------------------------- zero_grad
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_modes_match_torch_including_accumulation(set_to_none):
    batches = _batches(12)
    results = []
    for make in (lambda p: gradspec.Optimizer(p, "adam", backend="eager", lr=0.02),
                 lambda p: _torch_adam(p, lr=0.02)):
        model = _model()
        opt = make(model.parameters())
        for i in range(0, len(batches), 2):  # two micro-batches accumulated per step
            opt.zero_grad(set_to_none=set_to_none)
            for batch in batches[i:i + 2]:
                _loss(model, batch).backward()
            opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        for p in model.parameters():
            assert (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros_like(p))
        results.append(_flat(model))
    torch.testing.assert_close(results[0], results[1], **TIGHT)


def test_fresh_gradients_land_in_the_flat_buffer_as_backward_makes_them():
    """With torch's default zero_grad(set_to_none=True), backward's fresh gradients are copied
    into the optimizer's gradient buffer by a hook, and p.grad is a view of it again."""
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.02)
    batch = _batches(1)[0]
    _loss(model, batch).backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _loss(model, batch).backward()
    expected = torch.autograd.grad(_loss(model, batch), list(model.parameters()))
    storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 1  # one flat buffer holds every gradient
    for p, g in zip(model.parameters(), expected):
        assert torch.equal(p.grad, g)


def test_a_gradient_with_a_graph_is_left_to_the_step_and_matches_torch():
    """backward(create_graph=True), as for a gradient penalty: the hook must not tie the flat
    buffer into the graph; the step copies the values in and matches torch.optim.Adam."""
    results = []
    for make in (lambda p: gradspec.Optimizer(p, "adam", backend="eager", lr=0.02),
                 lambda p: _torch_adam(p, lr=0.02)):
        model = _model()
        opt = make(model.parameters())
        for batch in _batches(4):
            opt.zero_grad()
            _loss(model, batch).backward(create_graph=True)
            opt.step()
        results.append(_flat(model))
        if isinstance(opt, gradspec.Optimizer):
            for plan in opt._plans.values():
                assert not any(b.grad.requires_grad for b in plan.buckets)
    torch.testing.assert_close(results[0], results[1], **TIGHT)


def test_a_gradient_kept_from_an_earlier_backward_is_never_overwritten():
    """zero_grad(set_to_none=True) promises new gradient tensors: a gradient kept without a
    clone (per-task gradients for gradient surgery), or a slice of one, must not change when
    the hook captures the next backward's gradients."""
    kept = {}
    for name, make in (("ours", lambda p: gradspec.Optimizer(p, "adam", backend="eager", lr=0.02)),
                       ("torch", lambda p: _torch_adam(p, lr=0.02))):
        model = _model()
        opt = make(model.parameters())
        batches = _batches(3)
        _loss(model, batches[0]).backward()
        opt.step()
        opt.zero_grad()
        _loss(model, batches[1]).backward()
        task_a, row_of_a = model[0].weight.grad, model[2].bias.grad[:1]
        saved = task_a.clone(), row_of_a.clone()
        opt.zero_grad()
        _loss(model, batches[2]).backward()
        assert torch.equal(task_a, saved[0]) and torch.equal(row_of_a, saved[1]), name
        opt.step()
        kept[name] = _flat(model)
    torch.testing.assert_close(kept["ours"], kept["torch"], **TIGHT)


@pytest.mark.parametrize("zero_first", [True, False])
def test_parameters_that_move_or_are_frozen_keep_stepping_like_torch(zero_first):
    """model.to(dtype) between steps, in either order with zero_grad, and a parameter that
    has a gradient but no longer requires one: the hook must step aside and the step match
    torch.optim.SGD."""
    results = []
    for make in (lambda p: gradspec.Optimizer(p, "sgd", backend="eager", lr=0.01),
                 lambda p: torch.optim.SGD(p, lr=0.01)):
        model = _model(dtype=torch.float32)
        opt = make(model.parameters())
        batch = [t.float() for t in _batches(1)[0]]
        for _ in range(2):
            opt.zero_grad()
            _loss(model, batch).backward()
            opt.step()
        if zero_first:
            opt.zero_grad()
        model.to(torch.float64)
        if not zero_first:
            opt.zero_grad()
        batch = [t.double() for t in batch]
        for _ in range(3):
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
        model[0].weight.requires_grad_(False)  # frozen, its gradient assigned by hand
        model[0].weight.grad = torch.ones_like(model[0].weight)
        opt = make(model.parameters())  # whose buckets are built with it
        _loss(model, batch).backward()
        opt.step()
        results.append(_flat(model))
    torch.testing.assert_close(results[0], results[1], **TIGHT)


def test_a_dropped_or_rebuilt_optimizer_leaves_no_gradient_hook_behind():
    import gc
    model = _model()
    batch = _batches(1)[0]
    for _ in range(2):  # the first optimizer is dropped when the name is rebound
        opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.02)
        opt.zero_grad()
        _loss(model, batch).backward()
        opt.step()
        gc.collect()
    model.to(torch.float32)  # parameters move: the step rebuilds its buckets
    opt.zero_grad()
    _loss(model, [t.float() for t in batch]).backward()
    opt.step()
    gc.collect()
    for p in model.parameters():
        assert len(p._post_accumulate_grad_hooks) == 1


# ---------------------------------------------------------------- non-finite gradients
def _poison(model):
    model[0].weight.grad[1, 2] = float("nan")


def _poisoned_step(model, opt, batch):
    opt.zero_grad()
    _loss(model, batch).backward()
    _poison(model)
    opt.step()


def test_nonfinite_propagate_lets_nan_into_the_parameters():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.01)
    opt.zero_grad()
    _loss(model, _batches(1)[0]).backward()
    _poison(model)
    opt.step()
    assert torch.isnan(model[0].weight[1, 2])
    assert torch.isfinite(model[2].weight).all()  # other parameters are untouched by the NaN
    assert opt.skipped_steps == 0


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.compiled)])
def test_nonfinite_skip_leaves_everything_unchanged_then_trains_normally(backend):
    batches = _batches(6)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend=backend, nonfinite="skip", lr=0.02)
    _train(model, opt, batches[:3])
    params = [p.detach().clone() for p in model.parameters()]
    states = copy.deepcopy(opt.state_dict()["state"])
    _poisoned_step(model, opt, batches[0])
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)  # all of the group, not only the poisoned parameter
    for index, saved in states.items():
        now = opt.state_dict()["state"][index]
        assert now["step"].item() == saved["step"].item() == 3
        for name in ("m", "v"):
            assert torch.equal(now[name], saved[name])

    _train(model, opt, batches[3:])
    assert opt.skipped_steps == 1
    assert opt.state[model[0].weight]["step"].item() == 6
    reference = _model()
    _train(reference, _torch_adam(reference.parameters(), lr=0.02), batches)
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.compiled)])
@pytest.mark.parametrize("spec", ["adafactor", "shampoo", "soap", "galore(adam)"])
def test_nonfinite_skip_keeps_shaped_states_and_parameters(spec, backend):
    """A shape-aware step writes the buffers piece by piece (per run of equal shapes): a
    skipped step must keep every piece, and the run then equal one that never saw the bad
    batch."""
    batches = _batches(5)
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend=backend, nonfinite="skip")
    ref_opt = gradspec.Optimizer(reference.parameters(), spec, backend="eager")
    _train(model, opt, batches[:2])
    _train(reference, ref_opt, batches[:2])
    params = _flat(model).clone()
    states = copy.deepcopy(opt.state_dict()["state"])
    _poisoned_step(model, opt, batches[0])
    assert opt.skipped_steps == 1
    assert torch.equal(_flat(model), params)
    for index, saved in states.items():
        for name, value in saved.items():
            assert torch.equal(opt.state_dict()["state"][index][name], value), name
    _train(model, opt, batches[2:])
    _train(reference, ref_opt, batches[2:])
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)


def test_nonfinite_skip_count_survives_a_plan_rebuild():
    """skipped_steps is the optimizer's count; it must not drop when the group's layout
    changes (a parameter gets its first gradient)."""
    a = torch.nn.Parameter(torch.ones(3, dtype=F64))
    b = torch.nn.Parameter(torch.ones(2, dtype=F64))
    opt = gradspec.Optimizer([a, b], "adam", backend="eager", nonfinite="skip", lr=0.1)
    a.grad = torch.tensor([1.0, float("inf"), 1.0], dtype=F64)
    opt.step()
    assert opt.skipped_steps == 1
    a.grad = torch.ones(3, dtype=F64)
    b.grad = torch.ones(2, dtype=F64)  # b joins: a new layout for the group
    opt.step()
    assert opt.skipped_steps == 1


def test_nonfinite_raise_raises_and_changes_nothing():
    batches = _batches(3)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", nonfinite="raise", lr=0.02)
    _train(model, opt, batches[:2])
    params = [p.detach().clone() for p in model.parameters()]
    states = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    _loss(model, batches[2]).backward()
    _poison(model)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for index, saved in states.items():
        now = opt.state_dict()["state"][index]
        assert now["step"].item() == 2
        assert all(torch.equal(now[k], saved[k]) for k in ("m", "v"))
    # a clean gradient afterwards trains as if nothing had happened
    _train(model, opt, batches[2:])
    reference = _model()
    _train(reference, _torch_adam(reference.parameters(), lr=0.02), batches)
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)


def test_nonfinite_raise_changes_nothing_in_any_param_group():
    """The error says "nothing was updated": with two groups and a NaN in the second, the
    first group must not have stepped either."""
    model = _model()
    opt = gradspec.Optimizer([{"params": model[0].parameters()}, {"params": model[2].parameters()}],
                             "sgd", backend="eager", nonfinite="raise", lr=0.1)
    opt.zero_grad()
    _loss(model, _batches(1)[0]).backward()
    model[2].bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError):
        opt.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    assert all(opt.state[p].get("step", 0) == 0 for p in model.parameters())


# ---------------------------------------------------------------- the compiled backend
@pytest.mark.compiled
def test_scheduler_and_hand_changed_beta2_never_recompile():
    # a length-free step is shared by every optimizer of the same spec and dtype: start empty
    backends._CACHE.clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 11), torch.nn.Tanh(), torch.nn.Linear(11, 2)).double()
    reference = copy.deepcopy(model)
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="compiled", lr=0.02)
    torch_opt = _torch_adam(reference.parameters(), lr=0.02)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20) for o in (opt, torch_opt)]
    batches = _batches(20)

    graphs_before = counters["stats"]["unique_graphs"]
    graphs = []
    for i, batch in enumerate(batches):
        if i == 10:
            opt.param_groups[0]["beta2"] = 0.9
            torch_opt.param_groups[0]["betas"] = (0.9, 0.9)
        for m, o, s in ((model, opt, schedulers[0]), (reference, torch_opt, schedulers[1])):
            o.zero_grad()
            _loss(m, batch).backward()
            o.step()
            s.step()
        graphs.append(counters["stats"]["unique_graphs"] - graphs_before)
    assert graphs == [1] * 20  # one compile at the first step, none after
    assert opt.param_groups[0]["betas"] == (0.9, 0.9)
    assert opt.param_groups[0]["lr"] < 0.02
    # the new beta2 and the scheduled lr were really used
    torch.testing.assert_close(_flat(model), _flat(reference), **TIGHT)


# ---------------------------------------------------------------- specs that read the loss
LOSS_SGD = """
optimizer loss_sgd
hyper lr = 0.1 >= 0
param' = param - lr * loss * grad
"""


def test_a_spec_that_reads_the_loss_needs_a_closure_or_a_loss():
    spec = gradspec.parse(LOSS_SGD)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, dtype=F64))
    x = torch.randn(5, 3, dtype=F64)
    opt = gradspec.Optimizer([w], spec, backend="eager", lr=0.1)

    w.grad = torch.ones(3, dtype=F64)
    before = w.detach().clone()
    with pytest.raises(RuntimeError, match=r"reads the loss.*step\(closure\).*loss="):
        opt.step()
    assert torch.equal(w, before)

    def closure():
        opt.zero_grad()
        loss = (x @ w).pow(2).mean()
        loss.backward()
        return loss

    before = w.detach().clone()
    loss = opt.step(closure)
    expected = before - 0.1 * loss.item() * w.grad
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=0.0)

    before = w.detach().clone()
    grad = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    w.grad = grad.clone()
    assert opt.step(loss=3.0) == 3.0
    torch.testing.assert_close(w.detach(), before - 0.1 * 3.0 * grad, rtol=1e-14, atol=0.0)

    w.grad = grad.clone()
    before = w.detach().clone()
    opt.step(loss=torch.tensor(0.5, requires_grad=True) * 2)  # a loss tensor with history is fine
    torch.testing.assert_close(w.detach(), before - 0.1 * 1.0 * grad, rtol=1e-14, atol=0.0)
    assert opt.state[w]["step"].item() == 3


def test_a_bfloat16_checkpoint_keeps_the_float32_global_state_exactly():
    """`state S: global` is kept in float32 for half-precision groups, and the runtime
    promises a checkpoint resumes exactly; torch.optim's load_state_dict casts every state to
    the parameter's dtype, so S must survive that cast."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50).bfloat16())
    grads = [torch.randn(50).bfloat16() for _ in range(6)]
    opt = gradspec.Optimizer([w], "sgd_metric", backend="eager", lr=0.1)
    for grad in grads[:3]:
        w.grad = grad.clone()
        opt.step()
    assert opt.state[w]["S"].dtype == torch.float32
    saved = copy.deepcopy(opt.state_dict())
    copy_w = torch.nn.Parameter(w.detach().clone())
    for grad in grads[3:]:
        w.grad = grad.clone()
        opt.step()

    fresh = gradspec.Optimizer([copy_w], "sgd_metric", backend="eager", lr=0.1)
    fresh.load_state_dict(saved)
    for grad in grads[3:]:
        copy_w.grad = grad.clone()
        fresh.step()
    assert torch.equal(fresh.state[copy_w]["S"].float(), opt.state[w]["S"].float())
    assert torch.equal(copy_w, w)


# ---------------------------------------------------------------- groups.*: over every param group
GROUPS_SPEC = '''"""Over every group: centred by the mean of every gradient, scaled by the largest entry of
any, weighted by its share of the elements, and a switch that changes what a group adds."""
optimizer over_groups
hyper lr = 0.1 >= 0
hyper eps = 1e-3 > 0
hyper doubled = false
if doubled {
    x = 2 * grad
} else {
    x = grad
}
share = global.numel / groups.numel
param' = param - lr * share * (x - groups.mean(x)) / (groups.max(abs(x)) + groups.norm(x) + eps)
'''


def _over_groups_reference(params, grads, groups):
    """The spec above transcribed: each group's x (doubled where its switch says), reduced over
    every group."""
    xs = [[(2 if g.get("doubled") else 1) * grad for grad in group_grads] for g, group_grads in zip(groups, grads)]
    every = torch.cat([x.reshape(-1) for group_xs in xs for x in group_xs])
    mean, top, norm = every.mean(), every.abs().max(), every.norm()
    out = []
    for g, group_params, group_xs in zip(groups, params, xs):
        share = sum(p.numel() for p in group_params) / every.numel()
        lr = g.get("lr", 0.1)
        out.append([p - lr * share * (x - mean) / (top + norm + 1e-3) for p, x in zip(group_params, group_xs)])
    return out


def test_groups_reductions_run_over_every_param_group():
    """groups.mean, max, norm and numel over three groups, one of which doubles what it adds
    (its switch): 100 steps equal the transcription, while global.* would see one group."""
    spec = gradspec.parse(GROUPS_SPEC)
    gen = torch.Generator().manual_seed(7)
    shapes = [[(5, 3), (5,)], [(4, 2)], [(3,), (2, 2)]]
    params = [[torch.randn(s, generator=gen, dtype=F64) for s in group] for group in shapes]
    settings = [{}, {"doubled": True, "lr": 0.05}, {"lr": 0.2}]
    live = [[p.clone().requires_grad_() for p in group] for group in params]
    opt = gradspec.Optimizer([{"params": group, **s} for group, s in zip(live, settings)], spec, backend="eager")
    expected = params
    for _ in range(100):
        grads = [[torch.randn(p.shape, generator=gen, dtype=F64) for p in group] for group in params]
        for group, group_grads in zip(live, grads):
            for p, g in zip(group, group_grads):
                p.grad = g
        opt.step()
        expected = _over_groups_reference(expected, grads, settings)
    for group, group_expected in zip(live, expected):
        for p, q in zip(group, group_expected):
            torch.testing.assert_close(p.detach(), q, **TIGHT)
    alone = gradspec.Optimizer([p.detach().clone().requires_grad_() for p in params[0]], spec, backend="eager")
    for p, g in zip(alone.param_groups[0]["params"], grads[0]):
        p.grad = g
    alone.step()  # alone, the group reduces over itself only (groups.* is then global.*)
    moved = alone.param_groups[0]["params"][0].detach()
    with_all = _over_groups_reference([params[0]], [grads[0]], settings[:1])[0][0]
    torch.testing.assert_close(moved, with_all, **TIGHT)
    assert not torch.allclose(moved, _over_groups_reference(params, grads, settings)[0][0])


def test_a_nonfinite_gradient_in_one_group_skips_every_group_that_reads_the_totals():
    """Under "skip", a NaN in one group leaves a groups.* total NaN: every group skips the step
    (each counts it), and the next finite step trains them all."""
    groups = [torch.ones(3, dtype=F64, requires_grad=True), torch.ones(2, 2, dtype=F64, requires_grad=True)]
    opt = gradspec.Optimizer([{"params": [groups[0]]}, {"params": [groups[1]], "weight_decay": 0.0}], "prodigy",
                             backend="eager", nonfinite="skip", weight_decay=0.1)
    groups[0].grad, groups[1].grad = torch.full((3,), 0.5, dtype=F64), torch.full((2, 2), float("nan"), dtype=F64)
    opt.step()
    assert opt.skipped_steps == 1  # the NaN group, before its states exist; the other steps alone
    groups[1].grad = torch.full((2, 2), 0.5, dtype=F64)
    opt.step()
    before = [p.detach().clone() for p in groups]
    groups[1].grad = torch.full((2, 2), float("nan"), dtype=F64)
    opt.step()
    assert opt.skipped_steps == 3  # both groups skipped
    for p, b in zip(groups, before):
        assert torch.equal(p.detach(), b)
    groups[1].grad = torch.full((2, 2), 0.25, dtype=F64)
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(groups, before))
