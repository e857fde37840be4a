"""Boundaries that a hand mutation test of the suite showed no test reaching (issue 17, item
8), and their siblings across the stdlib: zero parameters and gradients, exact ties at a
``>=``, clamps and floors that act only past a threshold, the first step, and the non-finite
policies for specs whose state is not per element (global and subspace states, probes,
global reductions).

Every numeric claim is checked against something independent of the spec files: torch.optim,
pytorch-optimizer (a peer implementation), the plain-PyTorch transcriptions of
tests/references.py, or a closed form written here from the paper's equations. Float64 and
the eager backend throughout.
"""
import re

import pytest
import torch

import gradspec
from gradspec import stdlib
from probe_references import Sophia
from references import Lamb, Lion

F64 = torch.float64
TIGHT = dict(rtol=1e-12, atol=1e-14)


def _trajectory(make, initial, gradients):
    """Each step's parameters (as flat vectors) when ``make``'s optimizer is fed ``gradients``
    (one list per step) from fresh copies of ``initial``."""
    params = [p.clone().requires_grad_() for p in initial]
    opt = make(params)
    out = []
    for grads in gradients:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        out.append(torch.cat([p.detach().reshape(-1) for p in params]))
    return out


def _assert_same_trajectory(ours, reference):
    for t, (a, b) in enumerate(zip(ours, reference), start=1):
        torch.testing.assert_close(a, b, **TIGHT, msg=lambda m, t=t: f"step {t}: {m}")


def _random_gradients(shapes, steps, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=gen, dtype=F64) for s in shapes] for _ in range(steps)]


# ---------------------------------------------------------------- LAMB's trust ratio
# You et al. (ICLR 2020) and both reference codes: ratio = phi(|theta|) / |r|, and 1 where
# either norm is 0. A zero-initialised bias has |theta| = 0 at the first step; a parameter
# whose gradient is always 0 has r = 0 without weight decay.

def _lamb_case():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=gen, dtype=F64)
    zero_bias = torch.zeros(4, dtype=F64)
    frozen = torch.randn(5, generator=gen, dtype=F64)
    gradients = _random_gradients([(4, 3), (4,)], steps=5, seed=1)
    gradients = [[g_w, g_b, torch.zeros(5, dtype=F64)] for g_w, g_b in gradients]
    return [weight, zero_bias, frozen], gradients


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_trust_ratio_is_one_where_a_norm_is_zero(weight_decay):
    initial, gradients = _lamb_case()
    hyper = dict(lr=1e-2, weight_decay=weight_decay)
    ours = _trajectory(lambda p: gradspec.Optimizer(p, "lamb", backend="eager", **hyper), initial, gradients)
    _assert_same_trajectory(ours, _trajectory(lambda p: Lamb(p, **hyper), initial, gradients))

    # the zero bias takes the untrusted first step lr * r, r = g / (|g| + eps) (m_hat = g, v_hat = g^2)
    g = gradients[0][1]
    bias_after_one_step = ours[0][12:16]
    torch.testing.assert_close(bias_after_one_step, -1e-2 * g / (g.abs() + 1e-6), **TIGHT)
    frozen_after = ours[-1][16:]
    if weight_decay == 0:  # r = 0: nothing moves, and nothing becomes NaN
        assert torch.equal(frozen_after, initial[2])
    else:  # r = wd * theta, ratio 1 / wd: each step scales theta by 1 - lr
        torch.testing.assert_close(frozen_after, initial[2] * (1 - 1e-2) ** 5, **TIGHT)


@pytest.mark.parametrize("hyper, scale, weight_scale", [
    (dict(bias_correction=False, max_weight_norm=10.0), 1.0, 20.0),  # one tensor past the clamp, one below
    (dict(max_grad_norm=1.0), 10.0, 1.0),  # the global gradient norm is clipped at every step
    (dict(max_grad_norm=100.0), 1.0, 1.0),  # and here never
], ids=["weight-norm-clamped", "gradient-clipped", "gradient-not-clipped"])
def test_lamb_clamps_act_exactly_past_their_thresholds(hyper, scale, weight_scale):
    gen = torch.Generator().manual_seed(3)
    initial = [weight_scale * torch.randn(6, 6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)]
    gradients = _random_gradients([(6, 6), (6,)], steps=4, seed=4, scale=scale)
    total = [float(torch.sqrt(sum((g * g).sum() for g in step))) for step in gradients]
    if "max_weight_norm" in hyper:
        assert float(initial[0].norm()) > 10 > float(initial[1].norm())
    elif hyper["max_grad_norm"] == 1.0:
        assert min(total) > 1.0
    else:
        assert max(total) < 100.0
    hyper = dict(lr=1e-2, **hyper)
    ours = _trajectory(lambda p: gradspec.Optimizer(p, "lamb", backend="eager", **hyper), initial, gradients)
    _assert_same_trajectory(ours, _trajectory(lambda p: Lamb(p, **hyper), initial, gradients))


# ---------------------------------------------------------------- DualAdam at r = s
# The blend is used while r = max(0, 1 - t s) >= s: at a switch rate whose schedule reaches s
# exactly, the tie step is still blended. pytorch-optimizer's DualAdam is the peer.

@pytest.mark.parametrize("switch_rate, tie", [(0.5, 1), (0.25, 3), (0.125, 7)])
def test_dualadam_blends_at_the_step_where_r_equals_the_switch_rate(switch_rate, tie):
    from pytorch_optimizer import DualAdam
    assert 1 - tie * switch_rate == switch_rate  # exact in binary: the tie is really reached
    gen = torch.Generator().manual_seed(5)
    initial = [torch.randn(7, generator=gen, dtype=F64)]
    gradients = _random_gradients([(7,)], steps=tie + 2, seed=6)
    hyper = dict(lr=1e-2, switch_rate=switch_rate)
    ours = _trajectory(lambda p: gradspec.Optimizer(p, "dualadam", backend="eager", **hyper), initial, gradients)
    peer = _trajectory(lambda p: DualAdam(p, foreach=False, **hyper), initial, gradients)
    _assert_same_trajectory(ours, peer)
    adam_only = _trajectory(lambda p: DualAdam(p, foreach=False, lr=1e-2, switch_rate=1.0), initial, gradients)
    assert not torch.allclose(peer[tie - 1], adam_only[tie - 1], rtol=1e-6)  # the tie step is a blend


# ---------------------------------------------------------------- floors and fallbacks at zero

def test_sgd_log_metric_floors_a_zero_or_negative_loss():
    """r = L / (L^2 + S_hat) with L = max(loss, 1e-12) (the spec's documented floor; the
    reference code has none). One step from fresh state: S_hat = xi |g|^2, m_hat = g."""
    lr, xi = 0.1, 0.1
    start = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    g = torch.tensor([0.3, -0.2, 0.1], dtype=F64)

    def one_step(loss, grad):
        p = start.clone().requires_grad_()
        opt = gradspec.Optimizer([p], "sgd_log_metric", backend="eager", lr=lr, xi=xi)
        p.grad = grad.clone()
        opt.step(loss=torch.tensor(loss, dtype=F64))
        return p.detach()

    L = 1e-12
    expected = start - lr * L / (L * L + xi * float((g * g).sum())) * g
    for loss in (-1.0, 0.0):
        moved = one_step(loss, g)
        torch.testing.assert_close(start - moved, start - expected, rtol=1e-10, atol=0)
    assert torch.equal(one_step(0.0, torch.zeros(3, dtype=F64)), start)  # 0 / (0 + 0) is never formed


def test_lion_does_not_move_a_coordinate_whose_interpolation_is_zero():
    """sign(0) = 0 (Chen et al., Program 1): a zero gradient on a zero momentum leaves the
    coordinate alone, apart from the decay."""
    initial = [torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=F64)]
    gradients = [[torch.tensor([0.0, 1.0, 0.0, -1.0], dtype=F64)], [torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64)]]
    hyper = dict(lr=0.1, weight_decay=0.5)
    ours = _trajectory(lambda p: gradspec.Optimizer(p, "lion", backend="eager", **hyper), initial, gradients)
    _assert_same_trajectory(ours, _trajectory(lambda p: Lion(p, **hyper), initial, gradients))
    torch.testing.assert_close(ours[0][0], torch.tensor(1.0 * (1 - 0.1 * 0.5), dtype=F64), **TIGHT)


def test_clip_grad_norm_leaves_a_gradient_under_the_threshold_alone():
    """torch.nn.utils.clip_grad_norm_ scales by min(1, max_norm / (|g| + 1e-6)): 1 below the
    threshold, and a zero gradient stays zero."""
    initial = [torch.tensor([1.0, -2.0], dtype=F64), torch.tensor([0.5], dtype=F64)]
    gradients = [[torch.tensor([0.3, 0.1], dtype=F64), torch.tensor([-0.2], dtype=F64)],
                 [torch.tensor([3.0, 1.0], dtype=F64), torch.tensor([-2.0], dtype=F64)],
                 [torch.zeros(2, dtype=F64), torch.zeros(1, dtype=F64)]]

    class ClippedSGD(torch.optim.SGD):
        def step(self):
            torch.nn.utils.clip_grad_norm_(self.param_groups[0]["params"], 1.0)
            return super().step()

    ours = _trajectory(lambda p: gradspec.Optimizer(p, "clip_grad_norm(sgd)", backend="eager", lr=0.1, max_norm=1.0),
                       initial, gradients)
    _assert_same_trajectory(ours, _trajectory(lambda p: ClippedSGD(p, lr=0.1), initial, gradients))


def test_deo_with_a_zero_direction_is_its_base():
    """A checkpoint whose N is 0 (no direction): the rotation has nothing to normalise, N
    stays 0 and the projection removes nothing, so deo(sgd) steps as sgd."""
    start = torch.linspace(-1, 1, 5, dtype=F64)
    p = start.clone().requires_grad_()
    opt = gradspec.Optimizer([p], "deo(sgd)", backend="eager", lr=0.1, T=1)
    opt.step(lambda: (p ** 4).sum())
    checkpoint = opt.state_dict()
    checkpoint["state"][0]["deo.N"] = torch.zeros(5, dtype=F64)
    opt.load_state_dict(checkpoint)
    for _ in range(2):
        before = p.detach().clone()
        opt.step(lambda: (p ** 4).sum())
        torch.testing.assert_close(p.detach(), before - 0.1 * 4 * before ** 3, **TIGHT)
    assert torch.equal(opt.state[p]["deo.N"], torch.zeros(5, dtype=F64))


def test_sophia_clips_where_the_curvature_estimate_is_negative():
    """Sophia's denominator is max(gamma h, eps) (Liu et al., Algorithm 3, the max form): where
    Hutchinson's estimate is negative the step is lr * sign(m), never a small step of |h|.
    A quadratic with Hessian diag(4 s), s = +-1: u * (H u) = 4 s u^2 has the sign of s."""
    signs = torch.tensor([1.0, -1.0] * 4, dtype=F64)
    pull = torch.linspace(-1, 1, 8, dtype=F64)

    def run(make):
        x = torch.full((8,), 0.1, dtype=F64, requires_grad=True)
        opt = make([x])
        for _ in range(4):
            opt.step(lambda: (2 * signs * x ** 2).sum() + (pull * x).sum())
        return x.detach(), opt

    hyper = dict(lr=1e-2, gamma=1.0, beta2=0.5, k=1, weight_decay=0.0)
    ours, _ = run(lambda p: gradspec.Optimizer(p, "sophia", backend="eager", seed=3, **hyper))
    expected, reference = run(lambda p: Sophia(p, seed=3, **hyper))
    h, m = reference.base.h, reference.base.m
    assert (h[signs < 0] < 0).all() and (m.abs() < hyper["gamma"] * h)[signs > 0].any()  # both branches
    torch.testing.assert_close(ours, expected, **TIGHT)


# ---------------------------------------------------------------- non-finite policies
# The specs whose state is not per element: a global state (S), a subspace (U), states
# written by probes (N, h), global reductions feeding per-element states, lookahead's
# step-synchronised slow weights over a global state. A skipped or refused step must leave
# every state as it was, or one NaN poisons every later step.

NOT_PER_ELEMENT = [
    ("sgd_metric", {}),
    ("sgd_log_metric", {}),
    ("sgd_rms", dict(lr=1e-2)),
    ("bulk_sgd", dict(lr=0.1, k=2, lanczos_steps=15)),
    ("deo(adam)", dict(lr=1e-2, T=1)),
    ("sophia", dict(lr=1e-2, k=1)),
    ("lamb", dict(lr=1e-2, max_grad_norm=0.5)),
    ("clip_grad_norm(adam)", dict(lr=1e-2, max_norm=0.5)),
    ("lookahead(sgd_metric)", dict(sync_period=2)),
]


class _Problem:
    """A least-squares fit of 15 parameters; ``poisoned`` adds NaN * sum(w) to the loss, so
    the loss and w's gradient are NaN."""

    def __init__(self):
        gen = torch.Generator().manual_seed(2)
        self.w = torch.randn(3, 4, generator=gen, dtype=F64).requires_grad_()
        self.b = torch.randn(3, generator=gen, dtype=F64).requires_grad_()
        self.x = torch.randn(8, 4, generator=gen, dtype=F64)
        self.y = torch.randn(8, 3, generator=gen, dtype=F64)
        self.poisoned = False

    @property
    def params(self):
        return [self.w, self.b]

    def closure_for(self, opt):
        def closure():
            loss = torch.nn.functional.mse_loss(torch.tanh(self.x @ self.w.T + self.b), self.y)
            if self.poisoned:
                loss = loss + float("nan") * self.w.sum()
            if not opt.has_probes:
                opt.zero_grad()
                loss.backward()
            return loss
        return closure


def _snapshot(problem, opt):
    params = [p.detach().clone() for p in problem.params]
    states = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
              for i, p in enumerate(problem.params)}
    return params, states


def _assert_unchanged(problem, opt, snapshot):
    params, states = snapshot
    for p, before in zip(problem.params, params):
        assert torch.equal(p.detach(), before)
    for i, p in enumerate(problem.params):
        now = opt.state[p]
        assert set(now) == set(states[i])
        for name, before in states[i].items():
            assert torch.equal(torch.as_tensor(now[name]), torch.as_tensor(before)), f"state {name} changed"


def _bad_step(policy, problem, opt):
    problem.poisoned = True
    try:
        if policy == "raise":
            with pytest.raises(FloatingPointError, match="non-finite"):
                opt.step(problem.closure_for(opt))
        else:
            opt.step(problem.closure_for(opt))
            assert opt.skipped_steps == 1
    finally:
        problem.poisoned = False


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("spec, hyper", NOT_PER_ELEMENT, ids=[s for s, _ in NOT_PER_ELEMENT])
def test_a_nonfinite_step_leaves_every_kind_of_state_as_it_was(spec, hyper, policy):
    problem, twin_problem = _Problem(), _Problem()
    opt = gradspec.Optimizer(problem.params, spec, backend="eager", nonfinite=policy, seed=1, **hyper)
    twin = gradspec.Optimizer(twin_problem.params, spec, backend="eager", nonfinite=policy, seed=1, **hyper)
    for _ in range(3):
        opt.step(problem.closure_for(opt))
        twin.step(twin_problem.closure_for(twin))
    snapshot = _snapshot(problem, opt)
    _bad_step(policy, problem, opt)
    _assert_unchanged(problem, opt, snapshot)
    # later steps are those of a run that never saw the NaN (whatever the failed step drew
    # from the generator is item 4's business: the twin continues from the same draws)
    twin.generator.set_state(opt.generator.get_state())
    for _ in range(3):
        opt.step(problem.closure_for(opt))
        twin.step(twin_problem.closure_for(twin))
    for p, q in zip(problem.params, twin_problem.params):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), q.detach(), **TIGHT)


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("spec, hyper", [("sgd_metric", {}), ("lookahead(sgd_metric)", dict(sync_period=2))],
                         ids=["sgd_metric", "lookahead"])
def test_a_failed_first_step_is_as_if_it_never_happened(spec, hyper, policy):
    problem, twin_problem = _Problem(), _Problem()
    opt = gradspec.Optimizer(problem.params, spec, backend="eager", nonfinite=policy, **hyper)
    twin = gradspec.Optimizer(twin_problem.params, spec, backend="eager", nonfinite=policy, **hyper)
    _bad_step(policy, problem, opt)
    for _ in range(3):
        opt.step(problem.closure_for(opt))
        twin.step(twin_problem.closure_for(twin))
    for p, q in zip(problem.params, twin_problem.params):
        torch.testing.assert_close(p.detach(), q.detach(), **TIGHT)
    assert opt.state[problem.w]["step"] == 3


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("poisoned", [0, 1])
def test_a_nan_in_any_bucket_stops_the_whole_group(policy, poisoned):
    """Parameters of two dtypes live in two buckets; the finiteness test must read both."""
    params = [torch.ones(3, dtype=torch.float32, requires_grad=True), torch.ones(2, dtype=F64, requires_grad=True)]
    opt = gradspec.Optimizer(params, "sgd_metric", backend="eager", nonfinite=policy, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    S = opt.state[params[0]]["S"].clone()
    for p in params:
        p.grad = torch.ones_like(p)
    params[poisoned].grad[0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    assert all(torch.equal(p.detach(), q) for p, q in zip(params, before))
    assert torch.equal(opt.state[params[0]]["S"], S)


# ---------------------------------------------------------------- constraint boundaries
# Every stdlib hyperparameter at the edge of its declared range: a closed end is accepted,
# an open end refused. The expectation is read from the .opt text with a regular expression,
# not from the parser, so a parser or checker that confuses the two ends is caught.

BOUND = re.compile(r"^hyper (\w+)(?:: int)? = \S+ (?:(>=|>|<=|<) (-?[\d.e-]+)|in ([\[(])(-?[\d.e-]+), (-?[\d.e-]+)([\])]))",
                   re.M)


def _edges():
    for name in stdlib.names():
        for m in BOUND.finditer(stdlib.source(name)):
            hyper, op, value, left, low, high, right = m.groups()
            integer = ": int" in m.group(0)
            number = int if integer else float
            if op:
                yield name, hyper, number(value), op in (">=", "<=")
            else:
                yield name, hyper, number(low), left == "["
                yield name, hyper, number(high), right == "]"


EDGES = list(_edges())


def test_the_edge_table_reads_every_constrained_hyperparameter():
    constrained = {(name, line.split()[1].rstrip(":")) for name in stdlib.names()
                   for line in stdlib.source(name).splitlines()
                   if line.startswith("hyper ") and re.search(r"[<>]| in [\[(]", line.split("#")[0])}
    assert len(constrained) > 60 and constrained == {(e[0], e[1]) for e in EDGES}


@pytest.mark.parametrize("name, hyper, value, allowed", EDGES, ids=[f"{e[0]}.{e[1]}={e[2]}" for e in EDGES])
def test_a_hyperparameter_at_the_edge_of_its_range(name, hyper, value, allowed):
    spec = gradspec.load(name)
    if allowed:
        assert spec.with_hyper(**{hyper: value}).hypers[hyper].default == value
    else:
        with pytest.raises(gradspec.SpecError, match=re.escape(hyper)):
            spec.with_hyper(**{hyper: value})


@pytest.mark.parametrize("spec, hyper, allowed", [
    ("e(sgd)", dict(alpha=-2.0, beta=0.5), False),  # |alpha| (1 - beta) = 1 exactly: refused (< 1)
    ("e(sgd)", dict(alpha=-1.5, beta=0.5), True),
    ("bulk_dom(sgd)", dict(k=3, lanczos_steps=3), True),  # lanczos_steps >= k: equal is fine
    ("bulk_dom(sgd)", dict(k=3, lanczos_steps=2), False),
    ("sgd", dict(nesterov=True, momentum=0.0), False),  # Nesterov needs momentum > 0
    ("sgd", dict(nesterov=True, momentum=0.5, dampening=0.0), True),
])
def test_a_require_at_its_boundary(spec, hyper, allowed):
    param = torch.zeros(2, dtype=F64, requires_grad=True)
    if allowed:
        gradspec.Optimizer([param], spec, backend="eager", **hyper)
    else:
        with pytest.raises(ValueError):
            gradspec.Optimizer([param], spec, backend="eager", **hyper)
