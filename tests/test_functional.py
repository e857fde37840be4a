"""The functional core, ``gradspec.transform``: a pure update that equals torch.optim and the
Optimizer, differentiates through unrolled steps, vmaps over an ensemble and an lr grid, and
traces inside a user's torch.compile."""
import copy

import pytest
import torch

import gradspec

DT = torch.float64


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g, dtype=DT), torch.randn(4, generator=g, dtype=DT),
            torch.randn(3, 2, 2, generator=g, dtype=DT)]


def _grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=DT) for p in params]


def _run_torch(make, params, steps):
    live = [p.clone().requires_grad_() for p in params]
    opt = make(live)
    for t in range(steps):
        for p, g in zip(live, _grads(params, t)):
            p.grad = g
        opt.step()
    return [p.detach() for p in live]


def _run_transform(tx, params, steps):
    state = tx.init(params)
    for t in range(steps):
        params, state = tx.update(_grads(params, t), state, params)
    return params, state


@pytest.mark.parametrize("name, make", [
    ("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)),
    ("sgd(momentum = 0.9, nesterov = true)", lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True)),
    ("rmsprop", lambda ps: torch.optim.RMSprop(ps, lr=1e-2)),
    ("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=1e-2)),
])
def test_hundred_steps_equal_torch_optim(name, make):
    params = _params()
    ours, state = _run_transform(gradspec.transform(name, lr=1e-2, **({"weight_decay": 0.1} if name == "adamw" else {})),
                                 params, 100)
    theirs = _run_torch(make, params, 100)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(state["step"]) == 100


@pytest.mark.parametrize("spec", ["lamb", "sgd_metric", "lion", "clip_grad_norm(adam)", "lookahead(adam)", "prodigy"])
def test_equals_the_optimizer(spec):
    """Per-tensor, global and groups reductions (prodigy: one group, where groups.* is
    global.*), global states and adaptors: the transform takes the Optimizer's numbers (same
    programs, read functionally)."""
    params = _params()
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = gradspec.Optimizer(live, spec, backend="eager")
    for t in range(30):
        for p, g in zip(live, _grads(params, t)):
            p.grad = g
        opt.step()
    ours, _ = _run_transform(gradspec.transform(spec), params, 30)
    for a, b in zip(ours, live):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("spec, shaped_states", [
    ("adafactor", {"R": [(6,), (0,), (3,)], "C": [(4,), (0,), (4,)], "V": [(0,), (4,), (0,)]}),
    ("shampoo", {"L": [(6, 6), (0,), (3, 3)], "R": [(4, 4), (0,), (4, 4)], "H": [(0,), (4, 4), (0,)]}),
])
def test_shape_aware_specs_equal_the_optimizer_over_100_steps(spec, shaped_states):
    """Axis reductions, states shaped unlike the parameter (per row, per column, matrices) and
    matrix algebra with a periodic refresh (shampoo's every k): the transform's 100 steps are
    the Optimizer's, and its state holds each tensor's part in the state's own shape."""
    params = _params()
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = gradspec.Optimizer(live, spec, backend="eager")
    for t in range(100):
        for p, g in zip(live, _grads(params, t)):
            p.grad = g
        opt.step()
    ours, state = _run_transform(gradspec.transform(spec), params, 100)
    for a, b, start in zip(ours, live, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-14)
        assert not torch.equal(a, start)
    for name, shapes in shaped_states.items():
        assert [tuple(x.shape) for x in state[name]] == shapes
        for ours_state, p in zip(state[name], live):
            torch.testing.assert_close(ours_state, opt.state[p][name], rtol=1e-12, atol=1e-14)


def test_update_is_pure():
    params = _params()
    tx = gradspec.transform("lamb")
    state = tx.init(params)
    grads = _grads(params, 0)
    frozen = copy.deepcopy((params, state, grads))
    new_params, new_state = tx.update(grads, state, params)
    for before, after in zip(frozen[0] + frozen[2], params + grads):
        assert torch.equal(before, after)
    for name, value in frozen[1].items():
        assert all(torch.equal(a, b) for a, b in zip(value if isinstance(value, list) else [value],
                                                     state[name] if isinstance(value, list) else [state[name]]))
    assert not any(torch.equal(a, b) for a, b in zip(new_params, params))
    assert new_state["step"] == 1 and state["step"] == 0


def test_dict_parameters_keep_their_keys():
    params = dict(zip(("w", "b", "c"), _params()))
    tx = gradspec.transform("adam", lr=1e-2)
    state = tx.init(params)
    new, state = tx.update(dict(zip(params, _grads(list(params.values()), 0))), state, params)
    assert list(new) == ["w", "b", "c"] and list(state["m"]) == ["w", "b", "c"]
    listed, _ = _run_transform(tx, list(params.values()), 1)
    assert all(torch.equal(new[k], v) for k, v in zip(params, listed))


def test_a_dict_state_follows_its_keys_whatever_their_order():
    """Gradients and states are matched to parameters by key, never by position: the same
    dictionaries in another order give the same step."""
    tx = gradspec.transform("sgd", lr=1.0, momentum=0.5)
    params = {"a": torch.zeros(3, dtype=DT), "b": torch.zeros(2, 2, dtype=DT)}
    grads = {"a": torch.ones(3, dtype=DT), "b": torch.full((2, 2), 10.0, dtype=DT)}
    params, state = tx.update(grads, tx.init(params), params)
    zero = {"b": torch.zeros(2, 2, dtype=DT), "a": torch.zeros(3, dtype=DT)}
    reordered, _ = tx.update(zero, {"step": state["step"], "buf": dict(reversed(state["buf"].items()))},
                             {"b": params["b"], "a": params["a"]})
    torch.testing.assert_close(reordered["a"], torch.full((3,), -1.5, dtype=DT), rtol=0, atol=0)
    torch.testing.assert_close(reordered["b"], torch.full((2, 2), -15.0, dtype=DT), rtol=0, atol=0)


def test_states_and_gradients_that_do_not_fit_the_parameters_are_refused():
    tx = gradspec.transform("sgd", lr=1.0, momentum=0.5)
    params = [torch.zeros(3, dtype=DT), torch.zeros(2, 2, dtype=DT)]
    grads = [torch.ones(3, dtype=DT), torch.ones(2, 2, dtype=DT)]
    state = tx.init(params)
    swapped = {**state, "buf": state["buf"][::-1]}  # as many numbers, each in the other's shape
    with pytest.raises(ValueError, match=r"the state 'buf' of parameter #0 has shape \(2, 2\), not \(3,\)"):
        tx.update(grads, swapped, params)
    with pytest.raises(ValueError, match="got 1 values of the gradient for 2 parameters"):
        tx.update(grads[:1], state, params)
    with pytest.raises(TypeError, match="the gradient of parameter #1 must be a tensor, got NoneType"):
        tx.update([grads[0], None], state, params)
    keyed = dict(zip("ab", params))
    with pytest.raises(ValueError, match="must be keyed as the parameters are"):
        tx.update(dict(zip("ac", grads)), tx.init(keyed), keyed)
    with pytest.raises(ValueError, match="the state has no 'vmax', which adam keeps"):
        adam = gradspec.transform("adam")
        adam.update(grads, adam.init(params), params, amsgrad=True)
    with pytest.raises(TypeError, match="lr must be a number or a one-element tensor"):
        tx.update(grads, state, params, lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="no parameters"):
        tx.init([])
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)  # nothing was changed


def _loss(params, x, y):
    w1, w2 = params
    return ((torch.tanh(x @ w1) @ w2 - y) ** 2).mean()


def _data():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 5, generator=g, dtype=DT), torch.randn(16, 1, generator=g, dtype=DT)
    w = [torch.randn(5, 8, generator=g, dtype=DT) * 0.5, torch.randn(8, 1, generator=g, dtype=DT) * 0.5]
    return x, y, w


def _validation_after(lr, steps=5):
    """The validation loss after ``steps`` unrolled adam steps (train and validation halves)."""
    x, y, w = _data()
    tx = gradspec.transform("adam")
    params = [p.clone() for p in w]
    state = tx.init(params)
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params, x[:8], y[:8])  # differentiable by the outer autograd
        params, state = tx.update(grads, state, params, lr=lr)
    return _loss(params, x[8:], y[8:])


def test_hypergradient_of_lr_equals_finite_differences():
    lr = torch.tensor(0.01, dtype=DT, requires_grad=True)
    (hypergradient,) = torch.autograd.grad(_validation_after(lr), lr)
    h = 1e-6
    central = (_validation_after(0.01 + h) - _validation_after(0.01 - h)) / (2 * h)
    assert float(hypergradient) != 0
    torch.testing.assert_close(hypergradient, central.detach(), rtol=1e-6, atol=0)


def test_vmap_over_models_and_learning_rates_equals_separate_runs():
    x, y, _ = _data()
    g = torch.Generator().manual_seed(5)
    models = [torch.randn(8, 5, 8, generator=g, dtype=DT) * 0.5, torch.randn(8, 8, 1, generator=g, dtype=DT) * 0.5]
    lrs = torch.tensor([1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 0.5, 1.0], dtype=DT)
    tx = gradspec.transform("adam")

    def train(w1, w2, lr):
        params = [w1, w2]
        state = tx.init(params)
        for _ in range(10):
            grads = torch.func.grad(_loss)(params, x, y)
            params, state = tx.update(grads, state, params, lr=lr)
        return params

    batched = torch.func.vmap(train)(*models, lrs)
    for i in range(8):
        single = train(models[0][i], models[1][i], lrs[i])
        for a, b in zip(batched, single):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-14)


@pytest.mark.compiled
def test_inside_a_users_compiled_step_without_graph_breaks():
    x, y, w = _data()
    tx = gradspec.transform("adamw", lr=1e-2, weight_decay=0.01)
    params = [p.clone() for p in w]
    state = tx.init(params)

    def train_step(params, state):
        grads = torch.func.grad(_loss)(params, x, y)
        return tx.update(grads, state, params)

    torch._dynamo.reset()
    compiled = torch.compile(train_step, fullgraph=True, backend="eager")  # fullgraph raises on a break
    eager_params, eager_state = params, state
    for _ in range(3):
        params, state = compiled(params, state)
        eager_params, eager_state = train_step(eager_params, eager_state)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_probing_spec_takes_a_loss_function_and_matches_the_optimizer():
    """deo(adam): a seeded random start and a gradient at the dimer's far end every T steps."""
    x, y, w = _data()
    live = [torch.nn.Parameter(p.clone()) for p in w]
    opt = gradspec.Optimizer(live, "deo(adam, T = 2)", backend="eager", seed=7)

    def closure():
        opt.zero_grad()
        return _loss(live, x, y)

    for _ in range(6):
        loss = closure()
        loss.backward()
        opt.step(closure)

    tx = gradspec.transform("deo(adam, T = 2)")
    params = [p.clone() for p in w]
    state = tx.init(params, generator=torch.Generator().manual_seed(7))
    for _ in range(6):
        grads = torch.func.grad(_loss)(params, x, y)
        params, state = tx.update(grads, state, params, loss_fn=lambda ps: _loss(ps, x, y))
    for a, b in zip(params, live):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(grads, tx.init(params), params)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no hyperparameter 'lrr'"):
        gradspec.transform("adam", lrr=1e-3)
    with pytest.raises(ValueError, match="beta1"):
        gradspec.transform("adam", beta1=1.5)
    tx = gradspec.transform("adam", betas=(0.8, 0.9))
    assert (tx.hyper["beta1"], tx.hyper["beta2"]) == (0.8, 0.9)
    with pytest.raises(ValueError, match="beta3"):
        gradspec.transform("adam", betas=(0.8, 0.9, 0.99))
    params = _params()
    with pytest.raises(ValueError, match="lr"):
        tx.update(_grads(params, 0), tx.init(params), params, lr=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        tx.init([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.compiled
def test_compiled_backend_equals_eager():
    params = _params()
    eager, _ = _run_transform(gradspec.transform("lamb"), params, 5)
    compiled, _ = _run_transform(gradspec.transform("lamb", backend="compiled"), params, 5)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
