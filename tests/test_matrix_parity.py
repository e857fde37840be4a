"""Issue 15's stdlib specs against independent references, 120 float64 steps on the MLP of
tests/test_matrix_references.py (a tall 16x6 and a wide 3x16 matrix, two bias vectors).

* schedule_free_sgd, schedule_free_adamw and prodigy (written in today's elementwise language)
  against pytorch-optimizer 4.1's classes directly, eager for every setting and compiled for
  one;
* the shape-aware specs (adafactor, agc, gc, shampoo, soap, galore(adam), muon_adamw) against
  the transcriptions of tests/matrix_references.py, themselves held equal to pytorch-optimizer
  by tests/test_matrix_references.py. While a spec's file is not yet in gradspec/stdlib, or a case needs what the spec does not compute yet (``missing``), the case is a
  strict xfail: it fails the suite the day it passes, so the mark is taken off.

The hyperparameter names a shape-aware spec is expected to use are in SPEC_NAMES below: a
reference keyword maps to the spec's name for it (identity where not listed), and SPEC_ONLY
gives values only the spec has (its switches). Adjust them there when a spec chooses other names.
"""
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pytorch_optimizer import Prodigy as PoProdigy
from pytorch_optimizer import ScheduleFreeAdamW as PoScheduleFreeAdamW
from pytorch_optimizer import ScheduleFreeSGD as PoScheduleFreeSGD

import gradspec
import matrix_references as ref
from test_matrix_references import STEPS, flat, model, relative_error, split_by_ndim, train

# reference keyword -> the spec's hyperparameter name, where they differ
SPEC_NAMES: dict[str, dict[str, str]] = {
    "adafactor": {},
    "agc(sgd)": {},                     # agc_clip_val, agc_eps, eps: pytorch-optimizer's agc()
    "gc(sgd)": {},                      # gc_conv_only
    "shampoo": {"precondition_frequency": "preconditioning_compute_steps"},
                                        # beta1, beta2, matrix_eps, max_preconditioner_dim, weight_decouple,
                                        # start_preconditioning_step, precondition_1d, graft_beta2, graft_eps
    "soap": {},
    "galore(adam)": {},                 # rank, update_proj_gap, scale; adam's beta1, beta2, eps
    "muon_adamw": {"adamw_beta1": "beta1", "adamw_beta2": "beta2", "adamw_eps": "eps",
                   "adamw_wd": "adamw_weight_decay"},
}
# values only the spec has
SPEC_ONLY: dict[str, dict] = {
    "muon_adamw": {},  # the reference iterates in float64 (a bfloat16 switch, if the spec has one, off)
}

STDLIB = Path(gradspec.__file__).parent / "stdlib"


def in_stdlib(expression):
    """Whether every spec an expression names has its file in gradspec/stdlib."""
    names = expression.replace("(", " ").replace(")", " ").replace(",", " ").split()
    return all((STDLIB / f"{name}.opt").is_file() for name in names if "=" not in name)


def gradspec_optimizer(expression, backend, **hyper):
    return lambda params: gradspec.Optimizer(params, expression, backend=backend, **hyper)


def assert_close(ours, theirs, rtol):
    error = relative_error(ours, theirs)
    assert error < rtol, f"relative error {error:.3e}"
    assert relative_error(flat(model().parameters()), theirs) > 1e-4, "the reference did not train"


# ---------------------------------------------------------------------------------------------
# Specs of today's language: schedule-free SGD and AdamW, Prodigy


def _po_betas(kw):
    kw = dict(kw)
    if "beta1" in kw or "beta2" in kw:
        kw["betas"] = (kw.pop("beta1", 0.9), kw.pop("beta2", 0.999))
    if kw.get("beta3", 0) < 0:
        kw["beta3"] = None
    if kw.get("growth_rate") == 0:
        kw["growth_rate"] = float("inf")
    return kw


# (spec, pytorch-optimizer class, hyperparameters, rtol). The fourth schedule-free case trains
# in a regime that amplifies last-bit differences of the averaging weight (pow in a float64
# tensor graph against Python's math): 4e-9 after 120 steps, 1e-16 after 20.
ELEMENTWISE = [
    ("schedule_free_sgd", PoScheduleFreeSGD, dict(lr=0.05), 1e-10),
    ("schedule_free_sgd", PoScheduleFreeSGD, dict(lr=0.05, momentum=0.8, weight_decay=1e-2, warmup_steps=10,
                                                  r=0.5, weight_lr_power=1.0), 1e-10),
    ("schedule_free_adamw", PoScheduleFreeAdamW, dict(lr=1e-2), 1e-10),
    ("schedule_free_adamw", PoScheduleFreeAdamW, dict(lr=1e-2, beta1=0.85, beta2=0.99, weight_decay=0.1,
                                                      warmup_steps=20, r=1.0, eps=1e-6), 1e-8),
    ("schedule_free_adamw", PoScheduleFreeAdamW, dict(lr=1e-2, ams_bound=True, decoupling_c=5), 1e-10),
    ("prodigy", PoProdigy, dict(), 1e-9),
    ("prodigy", PoProdigy, dict(weight_decay=0.1, bias_correction=True), 1e-9),
    ("prodigy", PoProdigy, dict(safeguard_warmup=True, growth_rate=1.02, d_coef=0.5, beta3=0.99), 1e-9),
    ("prodigy", PoProdigy, dict(weight_decay=0.05, fixed_decay=True, lr=0.5, d0=1e-5, beta3=-1), 1e-9),
]


def _peer(cls, kw):
    # Prodigy's accumulators follow the default dtype (float32 otherwise)
    step_dtype = torch.float64 if cls is PoProdigy else None
    return train(lambda p: cls(p, **_po_betas(kw)), step_dtype=step_dtype)


@pytest.mark.parametrize("spec, peer, kw, rtol", ELEMENTWISE,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ELEMENTWISE)])
def test_elementwise_spec_matches_pytorch_optimizer(spec, peer, kw, rtol):
    ours, _ = train(gradspec_optimizer(spec, "eager", **kw))
    theirs, _ = _peer(peer, kw)
    assert_close(ours, theirs, rtol)


@pytest.mark.compiled
@pytest.mark.parametrize("spec, peer, kw", [(ELEMENTWISE[1][:3]), ELEMENTWISE[3][:3], ELEMENTWISE[6][:3]],
                         ids=["schedule_free_sgd", "schedule_free_adamw", "prodigy"])
def test_elementwise_spec_matches_pytorch_optimizer_compiled(spec, peer, kw):
    ours, _ = train(gradspec_optimizer(spec, "compiled", **kw), steps=STEPS)
    theirs, _ = _peer(peer, kw)
    assert_close(ours, theirs, 1e-8)


@pytest.mark.parametrize("spec, peer, kw", [ELEMENTWISE[1][:3], ELEMENTWISE[3][:3]],
                         ids=["schedule_free_sgd", "schedule_free_adamw"])
def test_schedule_free_average_is_what_eval_gives(spec, peer, kw):
    """The averaged point x: opt.state[p]["x"] with keep_average, and z + (param - z) / beta
    from the state without it, both equal to what pytorch-optimizer's eval() writes."""
    _, kept = train(gradspec_optimizer(spec, "eager", keep_average=True, **kw))
    y, plain = train(gradspec_optimizer(spec, "eager", **kw))
    _, theirs = _peer(peer, kw)
    theirs.eval()
    x_theirs = flat(theirs.param_groups[0]["params"])
    beta = kw.get("momentum", kw.get("beta1"))
    params = plain.param_groups[0]["params"]
    x_formula = flat([plain.state[p]["z"] + (p - plain.state[p]["z"]) / beta for p in params])
    x_kept = flat([kept.state[p]["x"] for p in kept.param_groups[0]["params"]])
    assert relative_error(x_formula, x_theirs) < 1e-8
    assert relative_error(x_kept, x_theirs) < 1e-8
    assert relative_error(y, x_theirs) > 1e-4  # the average is not where the gradients were taken


def test_schedule_free_keeps_x_only_when_asked():
    _, plain = train(gradspec_optimizer("schedule_free_adamw", "eager"), steps=1)
    _, kept = train(gradspec_optimizer("schedule_free_adamw", "eager", keep_average=True), steps=1)
    p = plain.param_groups[0]["params"][0]
    assert "x" not in plain.state[p] and "z" in plain.state[p]
    assert kept.state[kept.param_groups[0]["params"][0]]["x"].shape == p.shape


def _decay_exempt_vectors(params):
    matrices, vectors = split_by_ndim(params)
    return [dict(params=matrices), dict(params=vectors, weight_decay=0.0)]


# (hyperparameters, per backend): d is one estimate over both groups (groups.* reductions)
PRODIGY_GROUPS = [
    (dict(weight_decay=0.1), ["eager", "compiled"]),
    (dict(weight_decay=0.1, bias_correction=True, safeguard_warmup=True, growth_rate=1.02), ["eager"]),
    (dict(weight_decay=0.05, fixed_decay=True, lr=0.5, d0=1e-5, d_coef=0.5), ["eager"]),
]


@pytest.mark.parametrize("kw, backend", [
    pytest.param(kw, backend, marks=[pytest.mark.compiled] if backend == "compiled" else [], id=f"{i}-{backend}")
    for i, (kw, backends) in enumerate(PRODIGY_GROUPS) for backend in backends])
def test_prodigy_with_a_decay_exempt_group_matches_pytorch_optimizer(kw, backend):
    """pytorch-optimizer learns one d for the whole optimizer; so does the spec, whose inner
    product and denominator run over every group: the second group's d is the first's."""
    ours, opt = train(gradspec_optimizer("prodigy", backend, **kw), grouping=_decay_exempt_vectors)
    theirs, peer = train(lambda p: PoProdigy(p, **_po_betas(kw)), grouping=_decay_exempt_vectors,
                         step_dtype=torch.float64)
    assert_close(ours, theirs, 1e-9)
    d = [float(opt.state[group["params"][0]]["d"]) for group in opt.param_groups]
    assert d[0] == d[1] == pytest.approx(peer.param_groups[0]["d"], rel=1e-9)
    assert d[0] > 5 * opt.param_groups[0]["d0"]  # the estimate grew (growth_rate 1.02 caps case 1)


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.compiled)])
def test_prodigy_atan2_update_matches_pytorch_optimizer_without_eps(backend):
    """use_atan2 is pytorch-optimizer's eps=None: d_lr atan2(m, sqrt(v)) instead of the ratio."""
    kw = dict(weight_decay=0.1, bias_correction=True)
    ours, _ = train(gradspec_optimizer("prodigy", backend, use_atan2=True, **kw), grouping=_decay_exempt_vectors)
    theirs, _ = train(lambda p: PoProdigy(p, eps=None, **kw), grouping=_decay_exempt_vectors,
                      step_dtype=torch.float64)
    assert_close(ours, theirs, 1e-9)
    ratio, _ = train(gradspec_optimizer("prodigy", backend, **kw), grouping=_decay_exempt_vectors)
    assert relative_error(ratio, theirs) > 1e-6  # the switch changes the update


# ---------------------------------------------------------------------------------------------
# Shape-aware specs (issue 15's new syntax) against the transcriptions


def with_grad_transform(cls, transform):
    """``cls`` stepping on transform(p, p.grad): an adaptor over a base optimizer that only
    rewrites the gradient."""

    class Transformed(cls):
        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad = transform(p, p.grad)
            return super().step()

    return Transformed


@dataclasses.dataclass(frozen=True)
class MatrixCase:
    spec: str                             # a spec expression
    reference: Callable                   # params, **hyper -> optimizer
    hyper: dict                           # in the reference's names, given to both
    reference_only: dict = dataclasses.field(default_factory=dict)  # settings the spec has no name for
    spec_only: dict = dataclasses.field(default_factory=dict)  # the spec's own for them (its switches)
    rtol: float = 1e-9                    # above 1e-9: the reason is in the case's comment
    missing: str | None = None            # a known gap of the spec: the case is a strict xfail until it closes


MATRIX_CASES = [
    MatrixCase("adafactor", ref.Adafactor, dict(beta1=0.9)),
    MatrixCase("adafactor", ref.Adafactor, dict(beta1=0.0, relative_step=False, lr=1e-2, weight_decay=1e-2,
                                                clip_threshold=0.5)),
    MatrixCase("agc(sgd)", lambda p, agc_clip_val, **kw: with_grad_transform(
        torch.optim.SGD, lambda w, g: ref.agc_clip(w, g, agc_clip_val=agc_clip_val))(p, **kw),
        dict(lr=0.1, momentum=0.9, agc_clip_val=1e-2)),
    MatrixCase("gc(sgd)", lambda p, **kw: with_grad_transform(torch.optim.SGD, lambda w, g: ref.centralize(g))(p, **kw),
               dict(lr=0.1, momentum=0.9)),
    # Distributed Shampoo: blocks of at most 8 x 8 (the 16x6 matrix is two blocks of 8x6, the 3x16 one two of
    # 3x8), statistics EMA, gradient filtering, Adam grafting per block, decoupled decay, vectors grafted
    MatrixCase("shampoo", ref.Shampoo, dict(lr=1e-2, beta1=0.9, beta2=0.99, precondition_frequency=5,
                                            max_preconditioner_dim=8, weight_decay=1e-2, weight_decouple=True,
                                            precondition_1d=False),
               reference_only=dict(graft="adam"), spec_only=dict(graft=True)),
    # Gupta et al.'s Algorithm 1 (pytorch-optimizer's Shampoo at momentum 0)
    MatrixCase("shampoo", ref.Shampoo, dict(lr=3e-2, weight_decay=1e-3, matrix_eps=1e-6, precondition_frequency=1),
               reference_only=dict(beta1=0.0, beta2=1.0, graft="none", precondition_1d=True, weight_decouple=False)),
    # the float32 QR of every basis refresh (see tests/test_matrix_references.py); measured 2.4e-5
    # (eager and compiled), the reference against pytorch-optimizer 1.1e-5
    MatrixCase("soap", ref.SOAP, dict(precondition_frequency=10), rtol=1e-4),
    # the authors' refresh phase (steps 1, T + 1, ...: galore's every T { }), the SVD in float64
    MatrixCase("galore(adam)", lambda p, **kw: ref.GaLoreAdam(p, eps=1e-8, svd_dtype=None, eps_on_corrected=True,
                                                             refresh="authors", **kw),
               dict(lr=1e-2, rank=2, update_proj_gap=10, scale=0.25)),
    MatrixCase("muon_adamw", lambda p, **kw: ref.MuonAdamW(p, ns_dtype=torch.float64, **kw),
               dict(lr=0.02, weight_decay=0.01, adamw_lr=3e-3, adamw_wd=0.01)),
]


def _spec_hyper(case):
    names = SPEC_NAMES.get(case.spec, {})
    hyper = {names.get(k, k): v for k, v in case.hyper.items()}
    return dict(hyper, **SPEC_ONLY.get(case.spec, {}), **case.spec_only)


def _matrix_param(case, i):
    marks = [pytest.mark.xfail(strict=True, reason="spec not yet in stdlib")] if not in_stdlib(case.spec) else \
        [pytest.mark.xfail(strict=True, reason=case.missing)] if case.missing else []
    return pytest.param(case, marks=marks, id=f"{case.spec}-{i}")


@pytest.mark.parametrize("case", [_matrix_param(c, i) for i, c in enumerate(MATRIX_CASES)])
def test_shape_aware_spec_matches_reference(case):
    ours, _ = train(gradspec_optimizer(case.spec, "eager", **_spec_hyper(case)))
    theirs, _ = train(lambda p: case.reference(p, **case.hyper, **case.reference_only))
    assert_close(ours, theirs, case.rtol)


COMPILED_MATRIX = {c.spec: c for c in MATRIX_CASES if not c.missing}  # one compiled run per spec, its last case


@pytest.mark.compiled
@pytest.mark.parametrize("case", [_matrix_param(c, i) for i, c in enumerate(COMPILED_MATRIX.values())])
def test_shape_aware_spec_matches_reference_compiled(case):
    ours, _ = train(gradspec_optimizer(case.spec, "compiled", **_spec_hyper(case)))
    theirs, _ = train(lambda p: case.reference(p, **case.hyper, **case.reference_only))
    assert_close(ours, theirs, max(case.rtol, 1e-8))
