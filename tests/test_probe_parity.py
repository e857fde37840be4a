"""The probing optimizers against plain-PyTorch transcriptions of their papers' equations
(tests/probe_references.py, written from shared/papers/deo_bulk.md and the Sophia section
of shared/papers/dualadam_baselines.md, never from the spec files' lowering).

Every case: a small float64 model on fixed random data, 100 steps (30 for a second setting
of bulk_dom), the same seed for
gradspec's generator and the reference's, parameters compared at the end to 1e-10
relative (the papers' parity criterion of test_papers.py), on both backends. Measured on
this CPU (torch 2.13), eager and compiled alike: DEO <= 1.1e-13 (the finite-difference H n
divides rounding by dR = 1e-3), Sophia-H and Sophia-G 0 (bit for bit), Bulk/Dom/interpolated
<= 2e-15 (Lanczos on 23 parameters with 40 steps is exact; the reference uses eigh).

deo(sophia) also pins the generator protocol: a discarded draw per step (a bug this file
found: DEO's initial randn() was re-drawn every step) shifts Sophia-H's Hutchinson vectors.

The last section shows that each reference can fail: a reference given a wrong setting
(the other rotation sign, a period off by one, another weight a) parts from gradspec by
far more than 1e-6.
"""
import pytest
import torch
import torch.nn.functional as F

import gradspec
from probe_references import DEO, BulkDom, Sophia, SophiaBase, TorchBase, flat

STEPS = 100
SEED = 7
TOLERANCE = 1e-10
# one xdist worker runs the eager runs, so the can-fail tests find the parity tests' in _OURS
# (the compiled cases go to any worker)
EAGER_RUNS = pytest.mark.xdist_group("probe_parity_eager")
BACKENDS = [pytest.param("eager", marks=EAGER_RUNS), pytest.param("compiled", marks=pytest.mark.compiled)]


def _train(make, backward=False, classify=False, bumpy=0.0, steps=STEPS):
    """``steps`` steps through a closure; returns (the parameters as one flat vector, the optimizer).

    Regression: Linear(4, 3) - tanh - Linear(3, 2) (23 parameters), MSE on 16 fixed rows.
    Classification (``classify``): Linear(4, 3) - tanh - Linear(3, 3) (27 parameters), mean
    cross-entropy on 16 rows; the closure returns (loss, logits), as Sophia-G asks.
    ``backward``: the closure calls loss.backward() itself (allowed for DEO). ``bumpy``: adds
    bumpy * sum(cos(theta)), which lowers the Hessian by about bumpy, so that its most
    negative eigenvalues outweigh the positive ones in magnitude."""
    torch.manual_seed(0)
    classes = 3 if classify else 2
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, classes)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    if classify:
        y = torch.randint(0, classes, (16,), generator=gen)
    else:
        y = torch.randn(16, classes, generator=gen, dtype=torch.float64)
    params = list(model.parameters())
    opt = make(params)

    def closure():
        out = model(x)
        if classify:
            return F.cross_entropy(out, y), out
        loss = F.mse_loss(out, y)
        if bumpy:
            loss = loss + bumpy * sum(torch.cos(p).sum() for p in params)
        if backward:
            loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return flat([p.detach() for p in params]), opt


_OURS = {}


def _ours(spec, backend, backward=False, classify=False, bumpy=0.0, steps=STEPS, **hyper):
    """gradspec's run (cached: the can-fail tests reuse the eager runs of the parity tests)."""
    key = (spec, backend, backward, classify, bumpy, steps, tuple(sorted(hyper.items())))
    if key not in _OURS:
        _OURS[key] = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, seed=SEED, **hyper),
                            backward=backward, classify=classify, bumpy=bumpy, steps=steps)[0]
    return _OURS[key]


def _error(ours, expected):
    return float((ours - expected).abs().max() / expected.abs().max())


def _assert_close(ours, expected):
    error = _error(ours, expected)
    assert error < TOLERANCE, f"relative error {error:.3e}"


def _sgd(**hyper):
    return lambda params: TorchBase(params, lambda p: torch.optim.SGD(p, **hyper))


def _adam(**hyper):
    return lambda params: TorchBase(params, lambda p: torch.optim.Adam(p, **hyper))


def _adamw(**hyper):
    return lambda params: TorchBase(params, lambda p: torch.optim.AdamW(p, **hyper))


def _sophia(**hyper):
    return lambda params: SophiaBase(params, **hyper)


# ---------------------------------------------------------------- DEO, paper form

# rotations every 5 steps (20 in a run) with rot_lr = 0.5, so N moves far from its draw
ROTATION = dict(T=5, rot_lr=0.5)

DEO_CASES = [
    pytest.param("deo(sgd)", dict(lr=0.05, momentum=0.9), _sgd(lr=0.05, momentum=0.9), False, {}, id="sgd-momentum"),
    pytest.param("deo(sgd)", dict(lr=0.05, momentum=0.9), _sgd(lr=0.05, momentum=0.9), True, {},
                 id="sgd-momentum-closure-calls-backward"),
    pytest.param("deo(adam)", dict(lr=1e-2), _adam(lr=1e-2), False, dict(rot_sign=1), id="adam-rot-sign-plus"),
    pytest.param("deo(adamw)", dict(lr=1e-2, weight_decay=0.1), _adamw(lr=1e-2, weight_decay=0.1), True,
                 dict(alpha=0.5), id="adamw-alpha-half-closure-calls-backward"),
    pytest.param("deo(sophia)", dict(lr=3e-2, gamma=0.1, k=3), _sophia(lr=3e-2, gamma=0.1, k=3), False, {},
                 id="sophia"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, base_hyper, base, backward, deo_hyper", DEO_CASES)
def test_deo_matches_the_paper_form(spec, base_hyper, base, backward, deo_hyper, backend):
    ours = _ours(spec, backend, backward=backward, **base_hyper, **ROTATION, **deo_hyper)
    expected = _train(lambda p: DEO(p, base, seed=SEED, **ROTATION, **deo_hyper), backward=backward)[0]
    _assert_close(ours, expected)


@EAGER_RUNS
def test_deo_changes_the_trajectory():
    """The projection and the rotations matter in these runs: DEO is far from its base, and
    a reference that never rotates (rot_lr = 0) is far from DEO."""
    deo = _ours("deo(sgd)", "eager", lr=0.05, momentum=0.9, **ROTATION)
    base = _ours("sgd", "eager", lr=0.05, momentum=0.9)
    frozen = _train(lambda p: DEO(p, _sgd(lr=0.05, momentum=0.9), seed=SEED, T=5, rot_lr=0.0))[0]
    assert _error(deo, base) > 1e-2
    assert _error(deo, frozen) > 1e-4


def test_deo_draws_its_initial_direction_once():
    """The documented protocol: N = randn(numel) once, at the first step; nothing else of
    deo(sgd) draws, so after 20 steps the generator has advanced by exactly one draw."""
    p = torch.nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
    opt = gradspec.Optimizer([p], "deo(sgd)", backend="eager", seed=SEED, lr=0.1, T=10)
    for _ in range(20):
        opt.step(lambda: (p ** 4).sum())
    expected = torch.Generator().manual_seed(SEED)
    torch.randn(5, generator=expected, dtype=torch.float64)
    assert torch.equal(opt.generator.get_state(), expected.get_state())


# ---------------------------------------------------------------- Sophia, Algorithm 3

SOPHIA_CASES = [
    # gamma and lr chosen so that the estimate decides the step: |m| < gamma h (unclipped)
    # in ~37% (Hutchinson) and ~34% (GNB) of coordinate-steps; the defaults clip nearly all
    pytest.param("sophia", dict(lr=3e-2, gamma=0.1, k=3), False, 0.2, id="sophia-h"),
    pytest.param("sophia", dict(lr=1e-2, weight_decay=0.0), False, None, id="sophia-h-defaults-k10-no-wd"),
    pytest.param("sophia_g", dict(lr=3e-2, gamma=0.3, k=3), True, 0.2, id="sophia-g"),
    pytest.param("sophia_g", dict(lr=1e-2), True, None, id="sophia-g-defaults"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, hyper, gauss_newton, unclipped", SOPHIA_CASES)
def test_sophia_matches_algorithm_3(spec, hyper, gauss_newton, unclipped, backend):
    ours = _ours(spec, backend, classify=gauss_newton, **hyper)
    reference_hyper = dict(hyper)
    if gauss_newton:
        reference_hyper.setdefault("gamma", 0.05)  # sophia_g's default (Levanter's constant)
    expected, reference = _train(lambda p: Sophia(p, seed=SEED, estimator="gnb" if gauss_newton else "hutchinson",
                                                  **reference_hyper), classify=gauss_newton)
    _assert_close(ours, expected)
    if unclipped is not None:
        fraction = sum(reference.base.unclipped) / len(reference.base.unclipped)
        assert fraction > unclipped, f"the estimate hardly matters here ({fraction:.3f} unclipped)"


# ---------------------------------------------------------------- Bulk-SGD, Dom-SGD, interpolated

# 23 parameters <= 40 Lanczos steps: the Krylov space closes and Lanczos is exact; the
# reference takes the exact Hessian (a double-backward row per parameter, batched) and eigh.
# bulk_sgd and dom_sgd are bulk_dom(sgd) at (a, b) = (0, 1) and (1, 0); bulk_dom's own
# interpolation is run over adam (a Lanczos refresh every step costs gradspec ~5 s of CPU
# per 100-step run, so the sgd base is not run a third time at other weights).
SUBSPACE = dict(k=3, lanczos_steps=40)
NEGATIVE_CURVATURE_STEPS = 30

BULK_CASES = [
    pytest.param("bulk_sgd", dict(lr=0.1), _sgd(lr=0.1), dict(a=0.0, b=1.0), 0.0, id="bulk-sgd"),
    pytest.param("dom_sgd", dict(lr=0.1), _sgd(lr=0.1), dict(a=1.0, b=0.0), 0.0, id="dom-sgd"),
    pytest.param("bulk_dom(adam)", dict(lr=1e-2, a=0.25, b=1.0), _adam(lr=1e-2), dict(a=0.25, b=1.0), 0.0,
                 id="interpolated-adam"),
    pytest.param("bulk_dom(adam)", dict(lr=1e-2, a=0.25, b=1.0, R=3), _adam(lr=1e-2), dict(a=0.25, b=1.0, R=3),
                 0.0, id="interpolated-adam-R3"),
    # "top" is by value: here the k largest |lambda| are other, negative, eigenvalues at every
    # one of the first 30 refreshes (a setting of bulk_dom, whose 100-step case is above)
    pytest.param("bulk_dom(adam)", dict(lr=1e-2, a=0.25, b=1.0), _adam(lr=1e-2), dict(a=0.25, b=1.0), 2.0,
                 id="interpolated-adam-negative-curvature"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec, hyper, base, reference_hyper, bumpy", BULK_CASES)
def test_bulk_dom_matches_the_exact_eigenspace(spec, hyper, base, reference_hyper, bumpy, backend):
    steps = NEGATIVE_CURVATURE_STEPS if bumpy else STEPS
    ours = _ours(spec, backend, bumpy=bumpy, steps=steps, **hyper, **SUBSPACE)
    expected, reference = _train(lambda p: BulkDom(p, base, k=3, **reference_hyper), bumpy=bumpy, steps=steps)
    _assert_close(ours, expected)
    # no tie at the k-th eigenvalue anywhere: the top-3 subspace is well defined
    assert min(reference.gaps) > 1e-2, f"eigengap {min(reference.gaps):.2e} relative to max |lambda|"
    if bumpy:
        assert reference.magnitude_differs > len(reference.gaps) // 2


# ---------------------------------------------------------------- each reference can fail

FAIL_BY = 1e-6

WRONG_SETTINGS = [
    pytest.param(lambda: _ours("deo(adam)", "eager", lr=1e-2, rot_sign=1, **ROTATION),
                 lambda: _train(lambda p: DEO(p, _adam(lr=1e-2), seed=SEED, **ROTATION, rot_sign=-1))[0],
                 id="deo-rot-sign-flipped"),
    pytest.param(lambda: _ours("deo(sgd)", "eager", lr=0.05, momentum=0.9, **ROTATION),
                 lambda: _train(lambda p: DEO(p, _sgd(lr=0.05, momentum=0.9), seed=SEED, T=6, rot_lr=0.5))[0],
                 id="deo-T-off-by-one"),
    pytest.param(lambda: _ours("deo(sgd)", "eager", lr=0.05, momentum=0.9, **ROTATION),
                 lambda: _train(lambda p: DEO(p, _sgd(lr=0.05, momentum=0.9), seed=SEED, phase=0, **ROTATION))[0],
                 id="deo-rotations-at-t-mod-T-zero"),
    pytest.param(lambda: _ours("deo(adamw)", "eager", backward=True, lr=1e-2, weight_decay=0.1, alpha=0.5,
                               **ROTATION),
                 lambda: _train(lambda p: DEO(p, _adamw(lr=1e-2, weight_decay=0.1), seed=SEED, alpha=0.6,
                                              **ROTATION), backward=True)[0],
                 id="deo-alpha"),
    pytest.param(lambda: _ours("sophia", "eager", lr=3e-2, gamma=0.1, k=3),
                 lambda: _train(lambda p: Sophia(p, seed=SEED, lr=3e-2, gamma=0.1, k=4))[0],
                 id="sophia-k-off-by-one"),
    pytest.param(lambda: _ours("sophia", "eager", lr=3e-2, gamma=0.1, k=3),
                 lambda: _train(lambda p: Sophia(p, seed=SEED + 1, lr=3e-2, gamma=0.1, k=3))[0],
                 id="sophia-other-seed"),
    pytest.param(lambda: _ours("sophia_g", "eager", classify=True, lr=3e-2, gamma=0.3, k=3),
                 lambda: _train(lambda p: Sophia(p, seed=SEED + 1, lr=3e-2, gamma=0.3, k=3, estimator="gnb"),
                                classify=True)[0],
                 id="sophia-g-other-seed"),
    pytest.param(lambda: _ours("bulk_dom(adam)", "eager", lr=1e-2, a=0.25, b=1.0, **SUBSPACE),
                 lambda: _train(lambda p: BulkDom(p, _adam(lr=1e-2), a=0.5, b=1.0, k=3))[0],
                 id="bulk-dom-other-a"),
    pytest.param(lambda: _ours("bulk_dom(adam)", "eager", lr=1e-2, a=0.25, b=1.0, R=3, **SUBSPACE),
                 lambda: _train(lambda p: BulkDom(p, _adam(lr=1e-2), a=0.25, b=1.0, k=3, R=4))[0],
                 id="bulk-dom-R-off-by-one"),
    pytest.param(lambda: _ours("bulk_sgd", "eager", lr=0.1, **SUBSPACE),
                 lambda: _train(lambda p: BulkDom(p, _sgd(lr=0.1), a=0.0, b=1.0, k=2))[0],
                 id="bulk-sgd-k-off-by-one"),
    pytest.param(lambda: _ours("bulk_dom(adam)", "eager", bumpy=2.0, steps=NEGATIVE_CURVATURE_STEPS, lr=1e-2,
                               a=0.25, b=1.0, **SUBSPACE),
                 lambda: _train(lambda p: BulkDom(p, _adam(lr=1e-2), a=0.25, b=1.0, k=3, rank_by="magnitude"),
                                bumpy=2.0, steps=NEGATIVE_CURVATURE_STEPS)[0],
                 id="bulk-dom-top-k-by-magnitude"),
]


@EAGER_RUNS
@pytest.mark.parametrize("ours, wrong", WRONG_SETTINGS)
def test_a_reference_with_a_wrong_setting_fails(ours, wrong):
    error = _error(ours(), wrong())
    assert error > FAIL_BY, f"a wrong setting is only {error:.3e} away: the comparison is blind to it"
