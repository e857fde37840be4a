"""Runtime hardening (issue 17, items 4 and 5): what the optimizer refuses, that a step which
raises changes nothing (first step included), that load_state_dict checks a state dict whole
before it changes anything, and torch.optim interoperation: its state dicts in and out, its
implementation flags, and maximize.

A failing step is compared bit for bit (parameters, gradients, every state tensor, step
counts, the generator, the skip counter) before and after, and the optimizer is then stepped
next to an untouched twin, which it must match exactly.
"""
import copy
import math

import pytest
import torch

import gradspec

F64 = torch.float64


# ---------------------------------------------------------------- helpers
def _model(seed=0, hidden=6):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)).to(F64)


def _batch(i, scale=1.0):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(8, 4, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64) * scale


def _loss(model, i, factor=1.0):
    x, y = _batch(i)
    return torch.nn.functional.mse_loss(model(x), y) * factor


def _step(model, opt, i, factor=1.0):
    """Step ``opt`` on batch ``i`` with the loss times ``factor`` (NaN makes NaN gradients)."""
    if opt.has_probes:
        return opt.step(lambda: _loss(model, i, factor))
    opt.zero_grad()
    loss = _loss(model, i, factor)
    loss.backward()
    return opt.step(loss=loss.detach())


def _bits(t):
    return t.detach().clone().reshape(-1).view(torch.uint8)


def _snapshot(model, opt) -> dict:
    """Everything a step may change, as bytes (NaN compares equal to itself)."""
    state = {}
    for i, p in enumerate(model.parameters()):
        for name, value in opt.state.get(p, {}).items():
            state[(i, name)] = _bits(value) if isinstance(value, torch.Tensor) else value
    return {"params": [_bits(p) for p in model.parameters()],
            "grads": [None if p.grad is None else _bits(p.grad) for p in model.parameters()],
            "state": state, "generator": opt.generator.get_state(), "skipped": opt.skipped_steps}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if key == "state":
            assert a[key].keys() == b[key].keys(), "state entries differ"
            for entry in a[key]:
                assert torch.equal(a[key][entry], b[key][entry]), f"state {entry} changed"
        elif key in ("params", "grads"):
            for x, y in zip(a[key], b[key]):
                assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"{key} changed"
        elif key == "generator":
            assert torch.equal(a[key], b[key]), "the generator advanced"
        else:
            assert a[key] == b[key], f"{key} changed"


def _assert_twins(model, opt, twin_model, twin, steps=range(20, 24)):
    """``opt`` continues exactly as ``twin``, which never saw the failed step."""
    for i in steps:
        _step(model, opt, i)
        _step(twin_model, twin, i)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == twin.state[q].keys()
        for name in opt.state[p]:
            assert torch.equal(opt.state[p][name], twin.state[q][name]), name
    assert torch.equal(opt.generator.get_state(), twin.generator.get_state())


SPECS = {  # a spec with global state, probe specs, and ones drawing from the generator
    "adam": {},
    "sgd_metric": {},
    "deo(adam)": {"T": 2, "lr": 1e-2},  # probes, and N = randn() draws at initialisation
    "sophia": {"k": 2, "lr": 1e-2},     # probes drawing u = randn()
}


def _pair(spec, nonfinite="propagate"):
    """An optimizer and its twin, on identical models."""
    out = []
    for _ in range(2):
        model = _model()
        out += [model, gradspec.Optimizer(model.parameters(), spec, backend="eager", nonfinite=nonfinite,
                                          seed=3, **SPECS[spec])]
    return out


# ---------------------------------------------------------------- runtime input
def test_complex_parameters_are_refused_with_a_type_error():
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex parameters"):
        gradspec.Optimizer([z], "adam")
    opt = gradspec.Optimizer([torch.nn.Parameter(torch.randn(3))], "adam")
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_integer_tensors_are_refused():
    with pytest.raises(TypeError, match="floating-point parameters, got torch.int64"):
        gradspec.Optimizer([torch.zeros(3, dtype=torch.int64)], "sgd")
    with pytest.raises(TypeError, match="torch.bool"):
        gradspec.Optimizer([torch.zeros(3, dtype=torch.bool)], "sgd")


def test_a_parameter_without_values_is_refused_where_it_is_given():
    """A meta tensor was accepted, and the first step failed ("Unknown device type meta")."""
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="on the meta device"):
        gradspec.Optimizer([meta], "adam", backend="eager")
    opt = gradspec.Optimizer(_model().parameters(), "adam", backend="eager")
    with pytest.raises(ValueError, match="materialise the model first"):
        opt.add_param_group({"params": [meta]})
    assert len(opt.param_groups) == 1


def test_a_spec_that_is_not_a_name_or_spec_is_a_type_error():
    with pytest.raises(TypeError, match="spec must be"):
        gradspec.Optimizer(_model().parameters(), 3)
    for missing in ((), (None,)):  # no default method: Trainer(optimizer_cls_and_kwargs=...) must name one
        with pytest.raises(TypeError, match="needs a spec"):
            gradspec.Optimizer(_model().parameters(), *missing, lr=1e-3)


BAD_VALUES = [  # (value, exception, words of the message)
    (math.inf, ValueError, r"lr must be a finite number \(lr >= 0\), got inf"),
    (math.nan, ValueError, "lr must be a finite number"),
    (True, TypeError, "lr must be a real number, got bool"),
    ("x", TypeError, "lr must be a real number, got str"),
    (None, TypeError, "lr must be a real number"),
    (-1.0, ValueError, "lr >= 0"),
]


@pytest.mark.parametrize("value, error, words", BAD_VALUES)
def test_bad_hyperparameter_values_are_refused_everywhere(value, error, words):
    """At construction, in add_param_group, and before a step after a hand edit."""
    with pytest.raises(error, match=words):
        gradspec.Optimizer(_model().parameters(), "adam", lr=value)
    model = _model()
    params = list(model.parameters())
    opt = gradspec.Optimizer(params[:2], "adam", backend="eager")
    with pytest.raises(error, match=words):
        opt.add_param_group({"params": params[2:], "lr": value})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": params[2:]})
    _step(model, opt, 0)
    opt.param_groups[1]["lr"] = value
    before = _snapshot(model, opt)
    with pytest.raises(error, match=words):
        _step(model, opt, 1)
    after = _snapshot(model, opt)
    before["grads"] = after["grads"]  # the step's own backward wrote them
    _assert_same(before, after)


def test_a_scheduler_that_sets_a_nan_lr_is_refused_before_the_step():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 if epoch == 0 else math.nan)
    _step(model, opt, 0)
    scheduler.step()
    with pytest.raises(ValueError, match="finite"):
        _step(model, opt, 1)


def test_an_integer_hyperparameter_is_an_int_and_a_boolean_switch_a_bool():
    with pytest.raises(TypeError, match="T must be a real number, got bool"):
        gradspec.Optimizer(_model().parameters(), "deo(adam)", T=True)
    with pytest.raises(ValueError, match="T must be an integer"):
        gradspec.Optimizer(_model().parameters(), "deo(adam)", T=2.5)
    with pytest.raises(TypeError, match="nesterov must be True or False"):
        gradspec.Optimizer(_model().parameters(), "sgd", nesterov=1)
    # an integer is a 64-bit integer in the step: a larger one is refused before anything changes
    with pytest.raises(ValueError, match=r"T must be below 2\^63 in size, got 1.18059e\+21"):
        gradspec.Optimizer(_model().parameters(), "deo(adam)", T=2 ** 70)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "deo(adam)", backend="eager", T=2 ** 63 - 1)
    _step(model, opt, 0)
    opt.param_groups[0]["T"] = 1e30
    with pytest.raises(ValueError, match="T must be below 2"):
        _step(model, opt, 1)
    # a real hyperparameter given as a Python int past int64 is the real number it names
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = gradspec.Optimizer([p], "sgd", backend="eager", lr=10 ** 30)
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert torch.equal(p.detach(), torch.full((2,), 1 - 1e30, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_one_element_tensor_lr_of_any_shape_steps_as_its_number(shape):
    model = _model()
    twin_model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adam", backend="eager", lr=torch.full(shape, 0.01, dtype=F64))
    twin = gradspec.Optimizer(twin_model.parameters(), "adam", backend="eager", lr=0.01)
    for i in range(3):
        _step(model, opt, i)
        _step(twin_model, twin, i)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


def test_a_require_inside_a_loop_holds_as_one_outside_does():
    spec = gradspec.parse("optimizer looped\nhyper lr = 0.01 >= 0\nx = grad\nrepeat 2 {\n"
                          "  require lr < 0.05 \"lr must be below 0.05\"\n  x' = x\n}\nparam' = param - lr * x'\n")
    with pytest.raises(ValueError, match="lr must be below 0.05"):
        gradspec.Optimizer(_model().parameters(), spec, backend="eager", lr=0.1)
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager")
    _step(model, opt, 0)
    opt.param_groups[0]["lr"] = 0.1
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="lr must be below 0.05"):
        _step(model, opt, 1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_require_broken_after_construction_is_a_value_error_as_documented():
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "sgd", backend="eager", momentum=0.9, nesterov=True)
    _step(model, opt, 0)
    opt.param_groups[0]["dampening"] = 0.5
    with pytest.raises(ValueError, match="sgd: Nesterov momentum needs momentum > 0 and dampening = 0"):
        _step(model, opt, 1)
    opt.param_groups[0]["dampening"] = 0
    _step(model, opt, 1)  # usable again


# ---------------------------------------------------------------- a failing step changes nothing
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
def test_a_nan_step_under_raise_changes_nothing(spec, first):
    model, opt, twin_model, twin = _pair(spec, "raise")
    for i in range(0 if first else 3):
        _step(model, opt, i)
        _step(twin_model, twin, i)
    if not opt.has_probes:  # the NaN gradient is the user's; the check must not touch it
        opt.zero_grad()
        _loss(model, 99, math.nan).backward()
    before = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        _step(model, opt, 99, math.nan) if opt.has_probes else opt.step(loss=torch.tensor(math.nan))
    _assert_same(before, _snapshot(model, opt))
    _assert_twins(model, opt, twin_model, twin)


@pytest.mark.parametrize("spec", SPECS)
def test_a_nan_first_step_under_skip_leaves_no_state_and_draws_nothing(spec):
    model, opt, twin_model, twin = _pair(spec, "skip")
    before = _snapshot(model, opt)
    _step(model, opt, 99, math.nan)
    after = _snapshot(model, opt)
    assert after["state"] == {} and opt.skipped_steps == 1
    before["grads"], before["skipped"] = after["grads"], 1
    _assert_same(before, after)
    _assert_twins(model, opt, twin_model, twin)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("first", [True, False], ids=["first step", "later step"])
def test_a_closure_that_raises_changes_nothing(spec, first):
    model, opt, twin_model, twin = _pair(spec)
    for i in range(0 if first else 3):
        _step(model, opt, i)
        _step(twin_model, twin, i)
    if first:  # a gradient the user left there must survive the failed step
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.25)
    before = _snapshot(model, opt)

    def closure():
        raise KeyError("the data loader failed")

    with pytest.raises(KeyError, match="data loader"):
        opt.step(closure)
    _assert_same(before, _snapshot(model, opt))
    _assert_twins(model, opt, twin_model, twin)


@pytest.mark.parametrize("spec", SPECS)
def test_a_bad_hyperparameter_set_before_a_step_changes_nothing(spec):
    model, opt, twin_model, twin = _pair(spec)
    for i in range(3):
        _step(model, opt, i)
        _step(twin_model, twin, i)
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = math.nan
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        opt.step(lambda: _loss(model, 5)) if opt.has_probes else opt.step(loss=torch.tensor(1.0))
    _assert_same(before, _snapshot(model, opt))
    opt.param_groups[0]["lr"] = lr
    _assert_twins(model, opt, twin_model, twin)


def test_a_probe_that_fails_after_the_first_closure_call_undoes_the_states_and_draws():
    """deo's rotation calls the closure a second time (grad_at); failing there, on the first
    step, leaves no state (N = randn() was drawn for it) and the generator where it was."""
    model, opt, twin_model, twin = _pair("deo(adam)")
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the probe")
        return _loss(model, 0)

    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step(closure)
    after = _snapshot(model, opt)
    assert len(calls) == 2 and after["state"] == {}
    for p in model.parameters():
        assert p.grad is None  # as before the step
    _assert_same(before, after)
    _assert_twins(model, opt, twin_model, twin, steps=range(0, 4))


# ---------------------------------------------------------------- load_state_dict checks first
def _trained(spec="adam", hidden=6, steps=3, **hyper):
    model = _model(hidden=hidden)
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **hyper)
    for i in range(steps):
        _step(model, opt, i)
    return model, opt


def _other_model(hidden=7):
    return _trained(hidden=hidden)[1].state_dict()


def _edited(edit):
    def make():
        state_dict = _trained()[1].state_dict()
        edit(state_dict)
        return state_dict
    return make


REFUSED_LOADS = {
    "another model's shapes": (_other_model, r"shape \(7, 4\), expected \(6, 4\)"),
    "sgd into adam": (lambda: _trained("sgd", momentum=0.9)[1].state_dict(), "saved from sgd, this optimizer runs adam"),
    "sgd into adam, spec key dropped": (
        lambda: {k: v for k, v in _trained("sgd", momentum=0.9)[1].state_dict().items() if k != "spec"},
        "lacks beta1, beta2, eps, amsgrad"),
    "beta1=1.5": (_edited(lambda sd: sd["param_groups"][0].update(betas=(1.5, 0.999))),
                  r"beta1 = 1.5 breaks the constraint beta1 in \[0, 1\)"),
    "lr='x'": (_edited(lambda sd: sd["param_groups"][0].update(lr="x")), "lr must be a real number, got str"),
    "a missing state key": (_edited(lambda sd: sd["state"][0].pop("v")), "lacks v"),
    "an extra state key": (_edited(lambda sd: sd["state"][1].update(w=torch.zeros(6))), "has w, which adam does not keep"),
    "an integer state": (_edited(lambda sd: sd["state"][1].update(m=torch.zeros(6, dtype=torch.int64))),
                         "m must be a floating-point tensor"),
    "a group more": (_edited(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))),
                      "2 parameter groups, this optimizer 1"),
    "a bad generator state": (_edited(lambda sd: sd["param_groups"][0].update(generator=torch.zeros(3, dtype=torch.uint8))),
                              "generator state"),
    "a state no group lists": (_edited(lambda sd: sd["state"].update({7: sd["state"][0]})),
                               "the state of parameter 7, which no parameter group of it lists"),
}


@pytest.mark.parametrize("case", REFUSED_LOADS)
def test_a_refused_load_names_the_difference_and_changes_nothing(case):
    make, words = REFUSED_LOADS[case]
    state_dict = make()
    model, opt = _trained()
    twin_model, twin = _trained()
    before = _snapshot(model, opt)
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(state_dict)
    _assert_same(before, _snapshot(model, opt))
    assert [dict(g) for g in opt.param_groups] == groups
    _assert_twins(model, opt, twin_model, twin)


def test_an_accepted_load_still_resumes_exactly():
    model, opt = _trained(steps=3)
    saved = copy.deepcopy(opt.state_dict())  # a snapshot, as with torch.optim
    twin_model = _model()
    twin_model.load_state_dict(model.state_dict())
    twin = gradspec.Optimizer(twin_model.parameters(), "adam", backend="eager", lr=0.5)
    twin.load_state_dict(saved)
    assert twin.param_groups[0]["lr"] == 1e-3  # the checkpoint's, as torch.optim loads it
    _assert_twins(model, opt, twin_model, twin)


# ---------------------------------------------------------------- torch.optim interoperation
TORCH_RUNS = {  # spec -> (torch.optim class, its settings, gradspec's switches)
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), dict(nesterov=True, momentum=0.5)),
    "adam": (torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.99), amsgrad=True, weight_decay=0.01), dict(amsgrad=True)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1, maximize=False), {}),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True), dict(centered=True, momentum=0.1)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1), {}),
}


def _torch_steps(model, opt, steps):
    for i in steps:
        opt.zero_grad()
        _loss(model, i).backward()
        opt.step()


def _torch_run(spec, steps):
    cls, settings, _ = TORCH_RUNS[spec]
    model = _model()
    opt = cls(model.parameters(), foreach=False, **settings)
    _torch_steps(model, opt, steps)
    return model, opt


@pytest.mark.parametrize("spec", TORCH_RUNS)
def test_a_run_switched_from_torch_optim_to_gradspec_matches_torch_optim(spec):
    reference, _ = _torch_run(spec, range(100))
    model, torch_opt = _torch_run(spec, range(50))
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **TORCH_RUNS[spec][2])
    opt.load_state_dict(torch_opt.state_dict())
    for i in range(50, 100):
        _step(model, opt, i)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", TORCH_RUNS)
def test_a_run_switched_from_gradspec_to_torch_optim_matches_torch_optim(spec):
    cls, settings, _ = TORCH_RUNS[spec]
    reference, _ = _torch_run(spec, range(100))
    model = _model()
    hyper = {k: v for k, v in settings.items() if k != "maximize"}
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **hyper)
    for i in range(50):
        _step(model, opt, i)
    torch_opt = cls(model.parameters(), foreach=False, lr=123.0)
    torch_opt.load_state_dict(opt.torch_state_dict())
    assert torch_opt.param_groups[0]["lr"] == settings["lr"]
    _torch_steps(model, torch_opt, range(50, 100))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


UNMAPPABLE = {
    "amsgrad state into adam without amsgrad": ("adam", {}, "amsgrad=True and this optimizer amsgrad=False"),
    "nesterov mismatch": ("sgd", dict(momentum=0.9), "nesterov=True and this optimizer nesterov=False"),
    "AdamW's dict into adam": ("adam", {}, "decoupled_weight_decay=True.*load it into adamw"),
    "a torch.optim dict into lamb": ("lamb", {}, "torch.optim has no lamb"),
}


@pytest.mark.parametrize("case", UNMAPPABLE)
def test_an_unmappable_torch_optim_state_dict_is_refused(case):
    spec, hyper, words = UNMAPPABLE[case]
    source = {"amsgrad state into adam without amsgrad": "adam", "nesterov mismatch": "sgd",
              "AdamW's dict into adam": "adamw", "a torch.optim dict into lamb": "adam"}[case]
    _, torch_opt = _torch_run(source, range(3))
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **hyper)
    with pytest.raises(ValueError, match=words):
        opt.load_state_dict(torch_opt.state_dict())


def test_torch_optim_implementation_flags_are_accepted_and_change_nothing():
    plain_model, flagged_model = _model(), _model()
    plain = gradspec.Optimizer(plain_model.parameters(), "adam", backend="eager")
    flagged = gradspec.Optimizer(flagged_model.parameters(), "adam", backend="eager", foreach=True, fused=False,
                                 capturable=True, differentiable=False)
    for i in range(5):
        _step(plain_model, plain, i)
        _step(flagged_model, flagged, i)
    assert all(torch.equal(p, q) for p, q in zip(plain_model.parameters(), flagged_model.parameters()))
    with pytest.raises(TypeError, match="foreach must be True or False or None"):
        gradspec.Optimizer(_model().parameters(), "adam", foreach="yes")
    with pytest.raises(TypeError, match="fuse"):  # a misspelt flag is still unknown
        gradspec.Optimizer(_model().parameters(), "adam", fuse=True)


@pytest.mark.parametrize("spec, cls, hyper", [
    ("adam", torch.optim.Adam, dict(lr=0.01, weight_decay=0.01)),
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
])
def test_maximize_matches_torch_optim_and_leaves_the_gradient_alone(spec, cls, hyper):
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", maximize=True, **hyper)
    ref = cls(reference.parameters(), foreach=False, maximize=True, **hyper)
    for i in range(20):
        _step(model, opt, i)
        _torch_steps(reference, ref, [i])
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)  # not left negated
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", ["lamb", "lion", "sgd_metric", "clip_grad_norm(adam)", "deo(adam)", "sophia"])
def test_maximize_is_minimising_the_negated_loss_for_every_kind_of_spec(spec):
    """The spec reads -grad and -loss, probes evaluate -loss: the same as a plain optimizer
    given the negated loss (the sign flip is exact, so the runs agree to rounding of -0)."""
    hyper = SPECS.get(spec, {})
    model, reference = _model(), _model()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", maximize=True, seed=1, **hyper)
    ref = gradspec.Optimizer(reference.parameters(), spec, backend="eager", seed=1, **hyper)
    for i in range(12):
        _step(model, opt, i)
        _step(reference, ref, i, factor=-1.0)
        if not opt.has_probes:
            for p, q in zip(model.parameters(), reference.parameters()):
                assert torch.equal(p.grad, -q.grad)  # the user's gradient is the loss's
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-13)
    assert not torch.allclose(torch.cat([p.reshape(-1) for p in model.parameters()]),
                              torch.cat([p.reshape(-1) for p in _model().parameters()]))
