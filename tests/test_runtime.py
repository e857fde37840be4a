"""gradspec.Optimizer as a torch.optim.Optimizer: groups, checkpoints, closures, dtypes,
gradients that are missing or non-finite, and hyperparameter validation."""
import io

import pytest
import torch

import gradspec


def _model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


_gen = torch.Generator().manual_seed(3)
X = torch.randn(32, 5, generator=_gen, dtype=torch.float64)
Y = torch.randn(32, 2, generator=_gen, dtype=torch.float64)


def _steps(model, opt, n, set_to_none=True):
    for _ in range(n):
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(X.to(next(model.parameters()).dtype)), Y.to(next(model.parameters()).dtype)).backward()
        opt.step()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_checkpoint_resumes_bit_for_bit(backend):
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend=backend, lr=1e-2, amsgrad=True)
    _steps(model, opt, 10)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _steps(model, opt, 10)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _model(seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = gradspec.Optimizer(resumed.parameters(), "adam", backend=backend, lr=1e-2, amsgrad=True)
    opt2.load_state_dict(saved["opt"])
    assert float(opt2.state[next(iter(resumed.parameters()))]["step"]) == 10
    _steps(resumed, opt2, 10)
    assert torch.equal(_flat(model), _flat(resumed))
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in ("step", "m", "v", "vmax"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), key


def test_state_dict_is_torch_format_with_per_parameter_views():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager")
    _steps(model, opt, 2)
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2, 3]
    weight = next(iter(model.parameters()))
    assert sd["state"][0]["m"].shape == weight.shape and float(sd["state"][0]["step"]) == 2
    assert sd["param_groups"][0]["beta2"] == 0.999 and sd["param_groups"][0]["params"] == [0, 1, 2, 3]


def test_param_groups_have_their_own_hyperparameters():
    model, reference = _model(), _model()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = gradspec.Optimizer([{"params": first, "lr": 0.1}, {"params": second, "momentum": 0.9}],
                             "sgd", backend="eager", lr=0.01)
    r1, r2 = list(reference.parameters())[:2], list(reference.parameters())[2:]
    ref = torch.optim.SGD([{"params": r1, "lr": 0.1}, {"params": r2, "momentum": 0.9}], lr=0.01)
    _steps(model, opt, 20)
    _steps(reference, ref, 20)
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-12, atol=1e-14)
    assert "buf" in opt.state[second[0]] and "buf" not in opt.state[first[0]]


@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30),
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.1, 1.0, 10),
], ids=["step", "onecycle", "lambda", "linear"])
def test_lr_schedulers_drive_the_spec(make_scheduler):
    results = []
    for make in (lambda p: gradspec.Optimizer(p, "adam", backend="eager", lr=0.01),
                 lambda p: torch.optim.Adam(p, lr=0.01)):
        model = _model()
        opt = make(model.parameters())
        scheduler = make_scheduler(opt)
        for _ in range(25):
            _steps(model, opt, 1)
            scheduler.step()
        results.append(_flat(model))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)


def test_reduce_lr_on_plateau_changes_the_lr_used():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "sgd", backend="eager", lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    for _ in range(3):
        scheduler.step(1.0)  # no improvement
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    before = _flat(model)
    _steps(model, opt, 1)
    grads_step = (before - _flat(model)).abs().max().item()
    ref = _model()
    torch_opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    _steps(ref, torch_opt, 1)
    assert grads_step == pytest.approx((before - _flat(ref)).abs().max().item(), rel=1e-12)


def test_torch_style_betas_are_accepted_and_kept_in_sync():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", betas=(0.8, 0.95))
    group = opt.param_groups[0]
    assert (group["beta1"], group["beta2"], group["betas"]) == (0.8, 0.95, (0.8, 0.95))
    group["betas"] = (0.7, 0.9)  # as OneCycleLR and CyclicLR write them
    _steps(model, opt, 1)
    assert (group["beta1"], group["beta2"]) == (0.7, 0.9)
    group["beta2"] = 0.99  # as a user would write it
    _steps(model, opt, 1)
    assert group["betas"] == (0.7, 0.99)


def test_step_with_closure_returns_its_loss_and_enables_grad():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager")

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(X), Y)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0


def test_missing_gradients_are_skipped_and_late_parameters_start_at_step_one():
    def run(make):
        model = _model()
        params = list(model.parameters())
        opt = make(params)
        for i in range(6):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X), Y).backward()
            if i < 3:
                params[0].grad = None  # the first weight gets no gradient for three steps
            opt.step()
        return opt, params

    ours, ours_params = run(lambda p: gradspec.Optimizer(p, "adam", backend="eager", lr=0.01))
    ref, ref_params = run(lambda p: torch.optim.Adam(p, lr=0.01))
    for p, q in zip(ours_params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert float(ours.state[ours_params[0]]["step"]) == 3
    assert float(ours.state[ours_params[1]]["step"]) == 6


def test_parameters_without_gradient_are_untouched_and_have_no_state():
    model = _model()
    frozen = list(model.parameters())[0]
    before = frozen.detach().clone()
    frozen.requires_grad_(False)
    opt = gradspec.Optimizer(model.parameters(), "adamw", backend="eager", weight_decay=0.5)
    _steps(model, opt, 3)
    assert torch.equal(frozen, before) and frozen not in opt.state


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_modes_match_torch(set_to_none):
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), "sgd", backend="eager", lr=0.05, momentum=0.9)
    ref = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    _steps(model, opt, 15, set_to_none)
    _steps(reference, ref, 15, set_to_none)
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-12, atol=1e-14)


def test_gradient_accumulation_into_the_flat_buffer():
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager")
    ref = torch.optim.Adam(reference.parameters())
    for m, o in ((model, opt), (reference, ref)):
        for _ in range(3):
            o.zero_grad(set_to_none=False)
            for half in (X[:16], X[16:]):  # two backward passes accumulate
                torch.nn.functional.mse_loss(m(half), Y[:16]).backward()
            o.step()
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-12, atol=1e-14)


def test_float32_and_bfloat16_parameters_keep_their_dtype():
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        model, reference = _model(dtype), _model(torch.float32)
        opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=1e-2)
        ref = torch.optim.Adam(reference.parameters(), lr=1e-2)
        _steps(model, opt, 10)
        _steps(reference, ref, 10)
        weight = next(iter(model.parameters()))
        assert weight.dtype == dtype and opt.state[weight]["m"].dtype == dtype
        torch.testing.assert_close(_flat(model).float(), _flat(reference), rtol=tolerance, atol=tolerance)


def _nan_step(model, opt):
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(X), Y).backward()
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    return opt.step()


def test_nonfinite_propagate_lets_nan_through():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager")
    _nan_step(model, opt)
    assert torch.isnan(next(iter(model.parameters()))[0, 0])


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_nonfinite_skip_leaves_everything_unchanged_and_counts(backend):
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend=backend, nonfinite="skip")
    ref = torch.optim.Adam(reference.parameters())
    _steps(model, opt, 3)
    _steps(reference, ref, 3)
    weight = next(iter(model.parameters()))
    snapshot = (_flat(model), opt.state[weight]["m"].clone(), float(opt.state[weight]["step"]))
    _nan_step(model, opt)
    assert torch.equal(_flat(model), snapshot[0]) and torch.equal(opt.state[weight]["m"], snapshot[1])
    assert float(opt.state[weight]["step"]) == snapshot[2] == 3
    assert opt.skipped_steps == 1
    _steps(model, opt, 3)  # then trains on as if the bad step never happened
    _steps(reference, ref, 3)
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-10, atol=1e-12)


def test_nonfinite_raise_changes_nothing():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", nonfinite="raise")
    _steps(model, opt, 1)
    before = _flat(model)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        _nan_step(model, opt)
    assert torch.equal(_flat(model), before)


def test_bad_hyperparameters_are_refused_at_construction():
    params = list(_model().parameters())
    with pytest.raises(ValueError, match=r"beta1 in \[0, 1\)"):
        gradspec.Optimizer(params, "adam", beta1=1.0)
    with pytest.raises(ValueError, match="lr >= 0"):
        gradspec.Optimizer([{"params": params[:2], "lr": -1.0}], "adam")
    with pytest.raises(ValueError, match="Nesterov momentum needs"):
        gradspec.Optimizer(params, "sgd", nesterov=True)
    with pytest.raises(TypeError, match="did you mean 'beta1'"):
        gradspec.Optimizer(params, "adam", bta1=0.5)
    with pytest.raises(TypeError, match="amsgrad must be True or False"):  # a wrong type, as torch.optim says
        gradspec.Optimizer(params, "adam", amsgrad=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        gradspec.Optimizer(params, "adam", backend="jit")
    with pytest.raises(ValueError, match="unknown nonfinite policy"):
        gradspec.Optimizer(params, "adam", nonfinite="ignore")


LOSS_SPEC = '''
"""Steps scaled by the loss: a test of the loss input."""
optimizer loss_scaled
hyper lr = 0.1 >= 0
param' = param - lr * loss * grad
'''


def test_a_spec_that_reads_the_loss():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), gradspec.parse(LOSS_SPEC), backend="eager")
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(X), Y)
    loss.backward()
    with pytest.raises(RuntimeError, match="reads the loss"):
        opt.step()
    weight = next(iter(model.parameters()))
    before, grad = weight.detach().clone(), weight.grad.clone()
    opt.step(loss=loss)
    torch.testing.assert_close(weight.detach(), before - 0.1 * loss.item() * grad)

    def closure():
        opt.zero_grad()
        value = torch.nn.functional.mse_loss(model(X), Y)
        value.backward()
        return value

    assert opt.step(closure).item() > 0


def test_switch_change_rebuilds_the_plan():
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), "sgd", backend="eager", lr=0.05)
    ref = torch.optim.SGD(reference.parameters(), lr=0.05)
    _steps(model, opt, 3)
    _steps(reference, ref, 3)
    for o in (opt, ref):
        o.param_groups[0]["momentum"] = 0.9
    _steps(model, opt, 5)
    _steps(reference, ref, 5)
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-12, atol=1e-14)


def test_parameters_moved_by_the_user_are_picked_up():
    """model.to(...) or p.data = ... after a step re-points parameters away from the flat
    buffer; the next step must update the parameters, not the stale buffer."""
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=0.01)
    ref = torch.optim.Adam(reference.parameters(), lr=0.01)
    _steps(model, opt, 2)
    _steps(reference, ref, 2)
    for p in model.parameters():
        p.data = p.data.clone()  # what a device or dtype move does
    _steps(model, opt, 3)
    _steps(reference, ref, 3)
    torch.testing.assert_close(_flat(model), _flat(reference), rtol=1e-12, atol=1e-14)
