"""Every stdlib spec against an independent reference, 200 float64 steps, both backends.

References: torch.optim for sgd, adam, adamw, rmsprop and adagrad; for lion, the paper's
update transcribed below; for the adaptors, torch's clip_grad_norm_ and a hand-written
lookahead around torch.optim. Nothing here is generated from a spec.

Settings are chosen in a well-conditioned regime: RMSprop with alpha = 0.9 makes nearly sign-
like steps that amplify last-bit differences (one ulp after one step, 7e-6 after 200, while
torch's own foreach and single-tensor paths agree bitwise), so a 1e-10 bar there would test
rounding, not the method.
"""
import pytest
import torch

import gradspec
from references import Lion

STEPS = 200


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


_gen = torch.Generator().manual_seed(1)
X = torch.randn(64, 6, generator=_gen, dtype=torch.float64)
Y = torch.randn(64, 3, generator=_gen, dtype=torch.float64)


def _train(make_optimizer, scheduler=None, before_step=lambda params: None, after_step=lambda opt: None):
    model = _model()
    params = list(model.parameters())
    opt = make_optimizer(params)
    sched = scheduler(opt) if scheduler else None
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        before_step(params)
        opt.step()
        after_step(opt)
        if sched:
            sched.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def _assert_close(ours, reference, rtol=1e-10):
    error = (ours - reference).abs().max() / reference.abs().max()
    assert error < rtol, f"relative error {error:.3e}"
    start = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    assert not torch.equal(reference, start)  # it trained


def _torch(cls, **kw):
    return lambda params: cls(params, **kw)


CASES = [
    ("sgd", dict(lr=0.05), _torch(torch.optim.SGD, lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.3), _torch(torch.optim.SGD, lr=0.05, momentum=0.9, dampening=0.3)),
    ("sgd", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2),
     _torch(torch.optim.SGD, lr=0.05, momentum=0.8, nesterov=True, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2), _torch(torch.optim.Adam, lr=1e-2)),
    ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1), _torch(torch.optim.Adam, lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("adam", dict(lr=3e-3, beta1=0.5, beta2=0.9, eps=1e-3), _torch(torch.optim.Adam, lr=3e-3, betas=(0.5, 0.9), eps=1e-3)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1), _torch(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, amsgrad=True), _torch(torch.optim.AdamW, lr=1e-2, amsgrad=True)),
    ("adamw", dict(lr=5e-3, weight_decay=0.2, beta1=0.85, beta2=0.98, eps=1e-6),
     _torch(torch.optim.AdamW, lr=5e-3, weight_decay=0.2, betas=(0.85, 0.98), eps=1e-6)),
    ("rmsprop", dict(lr=1e-3), _torch(torch.optim.RMSprop, lr=1e-3)),
    ("rmsprop", dict(lr=1e-2, alpha=0.95, eps=1e-6), _torch(torch.optim.RMSprop, lr=1e-2, alpha=0.95, eps=1e-6)),
    ("rmsprop", dict(lr=1e-3, centered=True, momentum=0.5, weight_decay=1e-2),
     _torch(torch.optim.RMSprop, lr=1e-3, centered=True, momentum=0.5, weight_decay=1e-2)),
    ("adagrad", dict(lr=0.05), _torch(torch.optim.Adagrad, lr=0.05)),
    ("adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-2, eps=1e-6),
     _torch(torch.optim.Adagrad, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-2, eps=1e-6)),
    ("lion", dict(lr=1e-3), _torch(Lion, lr=1e-3)),
    ("lion", dict(lr=1e-3, beta1=0.95, beta2=0.98, weight_decay=0.1), _torch(Lion, lr=1e-3, beta1=0.95, beta2=0.98, weight_decay=0.1)),
]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("spec, hyper, reference", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_reference(spec, hyper, reference, backend):
    ours = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, **hyper))
    _assert_close(ours, _train(reference))


SCHEDULED = {
    "sgd": (dict(lr=0.05, momentum=0.9), _torch(torch.optim.SGD, lr=0.05, momentum=0.9)),
    "adam": (dict(lr=1e-2), _torch(torch.optim.Adam, lr=1e-2)),
    "adamw": (dict(lr=1e-2), _torch(torch.optim.AdamW, lr=1e-2)),
    "rmsprop": (dict(lr=1e-3), _torch(torch.optim.RMSprop, lr=1e-3)),
    "adagrad": (dict(lr=0.05), _torch(torch.optim.Adagrad, lr=0.05)),
    "lion": (dict(lr=1e-3, weight_decay=0.1), _torch(Lion, lr=1e-3, weight_decay=0.1)),
}


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("spec", sorted(SCHEDULED))
def test_matches_reference_under_a_scheduler(spec, backend):
    hyper, reference = SCHEDULED[spec]
    cosine = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS, eta_min=1e-4)  # noqa: E731
    ours = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, **hyper), cosine)
    _assert_close(ours, _train(reference, cosine))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_clip_grad_norm_adaptor_matches_torch_clipping(backend):
    ours = _train(lambda p: gradspec.Optimizer(p, "clip_grad_norm(sgd(momentum=0.9))", backend=backend,
                                               lr=0.1, max_norm=0.05))
    clip = lambda params: torch.nn.utils.clip_grad_norm_(params, 0.05)  # noqa: E731
    _assert_close(ours, _train(_torch(torch.optim.SGD, lr=0.1, momentum=0.9), before_step=clip))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_lookahead_adaptor_matches_a_hand_written_lookahead(backend):
    k, alpha = 4, 0.6
    ours = _train(lambda p: gradspec.Optimizer(p, "lookahead(adam)", backend=backend, lr=1e-2,
                                               sync_period=k, slow_step_size=alpha))
    slow, count = {}, [0]

    def lookahead(opt):
        count[0] += 1
        params = opt.param_groups[0]["params"]
        for p in params:
            slow.setdefault(p, _initial[id(p)])
        if count[0] % k == 0:
            with torch.no_grad():
                for p in params:
                    slow[p] = slow[p] + alpha * (p - slow[p])
                    p.copy_(slow[p])

    _initial = {}

    def make(params):
        for p in params:
            _initial[id(p)] = p.detach().clone()
        return torch.optim.Adam(params, lr=1e-2)

    _assert_close(ours, _train(make, after_step=lookahead))


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_float32_adam_tracks_torch(backend):
    def train(make):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = make(model.parameters())
        for _ in range(50):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X.float()), Y.float()).backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    ours = train(lambda p: gradspec.Optimizer(p, "adam", backend=backend, lr=1e-2))
    torch.testing.assert_close(ours, train(lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False)), rtol=1e-5, atol=1e-5)
