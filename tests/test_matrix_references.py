"""The matrix-method references of tests/matrix_references.py against pytorch-optimizer 4.1,
120 float64 steps on a small MLP (a tall 16x6 and a wide 3x16 matrix, two bias vectors).

These tests establish that the transcriptions compute what the peer library computes, so the
stdlib specs can be tested against the transcriptions (tests/test_matrix_parity.py). Where
pytorch-optimizer departs from the paper, the reference mirrors it (or offers the paper's form
behind an option); each departure is listed here, with the class and option:

* AdaFactor: momentum (betas[0] = 0.9) on the lr-scaled, clipped update, no bias correction, and
  a beta2 cap of 0.999 (the paper: no momentum, no cap); lr is ignored while relative_step; eps1
  is added to g^2 before the means; the momentum is stored in bfloat16 unless
  momentum_dtype=torch.float64 (used here); with ndim > 2 it factors over the last two
  dimensions, not the matrix view (not exercised); ams_bound keeps a maximum of sqrt(V), not of
  V, and is not transcribed.
* Shampoo: its momentum mixes the raw gradient with the previous *preconditioned* update (not
  transcribed; the reference's beta1 filters the gradient as Distributed Shampoo does); the
  inverse roots start at 0, so with preconditioning_compute_steps = K > 1 steps 1..K-1 do not
  move (the reference refreshes at t = 1, k + 1, ...); roots by SVD without a floor (the
  reference: eigh of L floored at 0, plus matrix_eps; the same on a PSD matrix); conv kernels get
  one factor per dimension (the reference: the matrix view). Compared with momentum = 0, 2-D and
  1-D parameters.
* SOAP: the QR of the basis refresh runs in float32 even for float64 parameters
  (SOAP(qr_dtype=torch.float32)); step 1 only builds the basis; eps is added to the uncorrected
  root and the bias correction folded into the step size; weight decay after the update, always
  decoupled and scaled by lr, not by the step size.
* GaLore: the SVD runs in float32 for float64 gradients (GaLoreAdam(svd_dtype=torch.float32));
  eps on the uncorrected root (GaLoreAdam(eps_on_corrected=False); torch's Adam, and so
  galore(adam), puts it on the corrected one); decay after the update; the paper's and official
  update_proj_gap is 200, pytorch-optimizer's projector default 50; only 2-D parameters are
  projected.
* AGC: for 3-D tensors pytorch-optimizer's unit norm runs over dim 1 only (the paper and the
  reference: every dimension but the first); a vector is clipped as a whole (NFNets' code:
  elementwise).
* Schedule-free AdamW: a hidden 1e-15 inside the root, sqrt(v_hat + 1e-15) + eps
  (ScheduleFreeAdamW(eps_root=1e-15); the paper: 0). The weight uses the largest lr so far.
* Prodigy: lr, betas, beta3 and bias_correction come from the first param group only; the
  numerator and denominator accumulators are float32 tensors even for float64 parameters, so
  float64 parity runs the library with float64 as the default dtype; coupled decay
  (weight_decouple=False) is added to p.grad after the moments and has no effect (not
  transcribed); eps=None (atan2) is not transcribed.
* Muon: the Newton-Schulz iteration runs in bfloat16 whatever the parameters' dtype (patched to
  float64 here, as the reference's ns_dtype); the input is divided by max(|G|, 1e-7)
  (MuonAdamW(clamp_norm=True)), Keller Jordan's code by |G| + 1e-7.
"""
import functools

import pytest
import torch
from pytorch_optimizer import SOAP as PoSOAP
from pytorch_optimizer import AdaFactor as PoAdaFactor
from pytorch_optimizer import GaLore as PoGaLore
from pytorch_optimizer import Muon as PoMuon
from pytorch_optimizer import Prodigy as PoProdigy
from pytorch_optimizer import ScheduleFreeAdamW as PoScheduleFreeAdamW
from pytorch_optimizer import ScheduleFreeSGD as PoScheduleFreeSGD
from pytorch_optimizer import Shampoo as PoShampoo
from pytorch_optimizer.optimizer.agc import agc as po_agc
from pytorch_optimizer.optimizer.gradient_centralization import centralize_gradient as po_centralize

import matrix_references as ref

STEPS = 120


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


_gen = torch.Generator().manual_seed(1)
X = torch.randn(64, 6, generator=_gen, dtype=torch.float64)
Y = torch.randn(64, 3, generator=_gen, dtype=torch.float64)


def split_by_ndim(params):
    """[matrices, vectors] of a parameter list, in order."""
    params = list(params)
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def train(make_optimizer, steps=STEPS, grouping=None, step_dtype=None, snapshots=None):
    """Train the MLP; returns (the flat parameters, the optimizer). ``grouping(params)`` turns
    the parameter list into what the optimizer is given (param groups); ``step_dtype`` is the
    default dtype while the optimizer steps (what a library's internal scalars follow);
    ``snapshots`` (a dict of step -> None) receives the flat parameters after those steps."""
    net = model()
    params = list(net.parameters())
    opt = make_optimizer(grouping(params) if grouping else params)
    for t in range(1, steps + 1):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(X), Y).backward()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(step_dtype or previous)
        try:
            opt.step()
        finally:
            torch.set_default_dtype(previous)
        if snapshots is not None and t in snapshots:
            snapshots[t] = flat(params)
    return flat(params), opt


def relative_error(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max())


def assert_same(ours, theirs, rtol=1e-10):
    error = relative_error(ours, theirs)
    assert error < rtol, f"relative error {error:.3e}"
    start = flat(model().parameters())
    assert relative_error(start, theirs) > 1e-4, "the reference did not train"


# ---------------------------------------------------------------------------------------------

ADAFACTOR = [
    dict(),
    dict(beta1=0.0, relative_step=False, lr=1e-2, scale_parameter=False),
    dict(weight_decay=0.1, warmup_init=True, clip_threshold=0.5),
    dict(weight_decay=1e-2, weight_decouple=False, beta2=0.99, decay_rate=-0.5),
    dict(weight_decay=1e-3, fixed_decay=True, relative_step=False, lr=3e-3),
]


def _po_adafactor_kwargs(kw):
    kw = dict(kw)
    beta1, beta2 = kw.pop("beta1", 0.9), kw.pop("beta2", 0.999)
    return dict(kw, betas=(beta1 or None, beta2), momentum_dtype=torch.float64)


@pytest.mark.parametrize("kw", ADAFACTOR, ids=range(len(ADAFACTOR)))
def test_adafactor_matches_pytorch_optimizer(kw):
    ours, opt = train(lambda p: ref.Adafactor(p, **kw))
    theirs, _ = train(lambda p: PoAdaFactor(p, **_po_adafactor_kwargs(kw)))
    assert_same(ours, theirs)


def test_adafactor_state_is_factored_for_matrices_only():
    _, opt = train(lambda p: ref.Adafactor(p), steps=2)
    weight, bias = opt.param_groups[0]["params"][:2]
    assert opt.state[weight]["R"].shape == (16,) and opt.state[weight]["C"].shape == (6,)
    assert opt.state[bias]["V"].shape == (16,)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_shampoo_without_graft_is_pytorch_optimizer_shampoo(weight_decay):
    """Gupta et al.'s Algorithm 1: beta2 = 1 (sums), no filtering, no graft, a root every step,
    one d x d factor with root -1/2 for a vector."""
    kw = dict(lr=3e-2, matrix_eps=1e-6, weight_decay=weight_decay)
    ours, _ = train(lambda p: ref.Shampoo(p, beta1=0.0, beta2=1.0, graft="none", precondition_1d=True,
                                          weight_decouple=False, **kw))
    theirs, _ = train(lambda p: PoShampoo(p, momentum=0.0, preconditioning_compute_steps=1, **kw))
    assert_same(ours, theirs, rtol=1e-9)


@pytest.mark.parametrize("weight_decay, torch_class", [(0.0, torch.optim.Adam), (0.1, torch.optim.AdamW)])
def test_shampoo_before_preconditioning_is_its_adam_graft(weight_decay, torch_class):
    """Before start_preconditioning_step the graft runs alone: filtered gradient over the
    graft's root, both bias-corrected, is Adam (AdamW with decoupled decay)."""
    ours, _ = train(lambda p: ref.Shampoo(p, lr=1e-2, start_preconditioning_step=STEPS + 1,
                                          weight_decay=weight_decay))
    theirs, _ = train(lambda p: torch_class(p, lr=1e-2, weight_decay=weight_decay))
    assert_same(ours, theirs)


def _quadratic_grads(params, targets):
    """An elementwise loss: each block of a parameter sees only its own entries."""
    for p, target in zip(params, targets):
        p.grad = (torch.sin(p) - target) * torch.cos(p) + 0.1 * p


def test_shampoo_blocks_are_independent_shampoos():
    """A 6 x 9 matrix cut into blocks of at most 4 (rows 4 + 2, columns 4 + 4 + 1) moves as six
    separate parameters, one per block, each with its own factors and graft norm."""
    gen = torch.Generator().manual_seed(3)
    whole = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    target = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    rows, cols = ref.blocks(6, 4), ref.blocks(9, 4)
    pieces = [whole[r, c].clone() for r in rows for c in cols]
    piece_targets = [target[r, c] for r in rows for c in cols]
    kw = dict(lr=1e-2, beta2=0.99, precondition_frequency=3, weight_decay=1e-2)
    blocked = ref.Shampoo([whole], max_preconditioner_dim=4, **kw)
    separate = ref.Shampoo(pieces, max_preconditioner_dim=4, **kw)
    for _ in range(STEPS):
        _quadratic_grads([whole], [target])
        _quadratic_grads(pieces, piece_targets)
        blocked.step()
        separate.step()
    assembled = torch.cat([torch.cat(pieces[i * len(cols):(i + 1) * len(cols)], dim=1) for i in range(len(rows))])
    assert [b["L"].shape[0] for b in blocked.state[whole]["blocks"]] == [4, 4, 4, 2, 2, 2]
    assert relative_error(whole, assembled) < 1e-12
    assert relative_error(whole, torch.randn(6, 9, generator=torch.Generator().manual_seed(3),
                                             dtype=torch.float64)) > 1e-3


def test_shampoo_graft_sets_each_blocks_step_norm():
    """At step 1 each block moves by lr times the norm of Adam's direction on that block
    (sign(g) for Adam's first step)."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    before = w.clone()
    opt = ref.Shampoo([w], lr=0.1, max_preconditioner_dim=3)
    _quadratic_grads([w], [torch.zeros_like(w)])
    adam_step = w.grad / (w.grad.abs() + 1e-8)
    opt.step()
    for r in ref.blocks(5, 3):
        for c in ref.blocks(7, 3):
            moved = (before - w)[r, c].norm()
            torch.testing.assert_close(moved, 0.1 * adam_step[r, c].norm(), rtol=1e-12, atol=0)
    assert not torch.allclose((before - w) / 0.1, adam_step)  # the direction itself is Shampoo's


# ---------------------------------------------------------------------------------------------

# The first basis refresh comes after the 3 x 16 weight's 16 x 16 statistic has full rank
# (3 per step): on a rank-deficient statistic, QR picks an arbitrary basis of the null space,
# and which one is decided by rounding, so no two implementations agree there (why precondition_1d
# is tried on the 3-vector only: a 16-vector's statistic gains one rank per step).
# The refresh's QR runs in float32 (the library's cast, mirrored): two float64 computations
# that differ by 1e-11 before the cast now and then round one entry differently after it, which
# puts a float32-sized (1e-7) difference into the basis (an ill-conditioned statistic makes it
# larger). So the parity is to rounding (1e-9) until the first refreshed basis is used (step
# precondition_frequency + 2), and about 1e-5 after 120 steps.
SOAP_CASES = [
    dict(),
    dict(precondition_frequency=7, weight_decay=0.0, beta1=0.9, beta2=0.99, normalize_gradient=True,
         shampoo_beta=0.9),
    dict(precondition_frequency=6, max_precondition_dim=8, precondition_1d=True, correct_bias=False, lr=1e-3),
]


@pytest.mark.parametrize("kw", SOAP_CASES, ids=range(len(SOAP_CASES)))
def test_soap_matches_pytorch_optimizer(kw):
    po = dict(kw)
    po["betas"] = (po.pop("beta1", 0.95), po.pop("beta2", 0.95))
    po["shampoo_beta"] = po.pop("shampoo_beta", None)
    before_qr = po.get("precondition_frequency", 10) + 1
    early_ours, early_theirs = {before_qr: None}, {before_qr: None}
    ours, _ = train(lambda p: ref.SOAP(p, **kw), snapshots=early_ours)
    theirs, _ = train(lambda p: PoSOAP(p, **po), snapshots=early_theirs)
    assert relative_error(early_ours[before_qr], early_theirs[before_qr]) < 1e-9
    assert_same(ours, theirs, rtol=1e-4)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, beta1=0.8, scale=0.25, rank=3)])
def test_galore_adam_matches_pytorch_optimizer(kw):
    kw = dict(dict(lr=1e-2, rank=2, update_proj_gap=10), **kw)
    ours, _ = train(lambda p: ref.GaLoreAdam(p, **kw))
    po = dict(kw)
    projection = dict(rank=po.pop("rank"), update_proj_gap=po.pop("update_proj_gap"),
                      scale=po.pop("scale", 1.0), projection_type="std")
    po["betas"] = (po.pop("beta1", 0.9), 0.999)

    def groups(params):
        matrices, vectors = split_by_ndim(params)
        return [dict(params=matrices, **projection), dict(params=vectors)]

    theirs, _ = train(lambda p: PoGaLore(p, **po), grouping=groups)
    assert_same(ours, theirs, rtol=1e-9)


# ---------------------------------------------------------------------------------------------


def _tensors_for_clipping(ndim):
    gen = torch.Generator().manual_seed(10 + ndim)
    shape = (5, 4, 3, 2)[:ndim] if ndim else ()
    p = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if ndim >= 2:  # rows of very different sizes: some are clipped, some not
        g = g * torch.logspace(-4, 0, shape[0], dtype=torch.float64).reshape(-1, *[1] * (ndim - 1))
    return p, g * 0.05


@pytest.mark.parametrize("ndim", [1, 2, 4])
def test_agc_matches_pytorch_optimizer(ndim):
    p, g = _tensors_for_clipping(ndim)
    for clip in (1e-2, 5e-2):
        ours = ref.agc_clip(p, g, agc_clip_val=clip)
        assert torch.equal(ours, po_agc(p, g, agc_clip_val=clip))
    clipped = ~torch.isclose(ref.agc_clip(p, g), g)
    assert clipped.any() and (ndim < 2 or not clipped.all())


def test_agc_three_dimensional_tensors_are_where_pytorch_optimizer_differs():
    """pytorch-optimizer's unit norm of a 3-D tensor runs over dim 1 only; the paper's (and the
    reference's) over every dimension but the first."""
    p, g = _tensors_for_clipping(3)
    assert not torch.allclose(ref.agc_clip(p, g), po_agc(p, g))


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
@pytest.mark.parametrize("gc_conv_only", [False, True])
def test_centralize_matches_pytorch_optimizer(ndim, gc_conv_only):
    _, g = _tensors_for_clipping(ndim)
    theirs = g.clone()
    po_centralize(theirs, gc_conv_only=gc_conv_only)
    ours = ref.centralize(g, gc_conv_only=gc_conv_only)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-17)
    assert torch.equal(ours, g) == (ndim <= (3 if gc_conv_only else 1))


# ---------------------------------------------------------------------------------------------

SCHEDULE_FREE = [
    (ref.ScheduleFreeSGD, PoScheduleFreeSGD, dict(lr=0.05)),
    (ref.ScheduleFreeSGD, PoScheduleFreeSGD, dict(lr=0.05, momentum=0.8, weight_decay=1e-2, warmup_steps=10,
                                                  r=0.5, weight_lr_power=1.0)),
    (ref.ScheduleFreeAdamW, PoScheduleFreeAdamW, dict(lr=1e-2)),
    (ref.ScheduleFreeAdamW, PoScheduleFreeAdamW, dict(lr=1e-2, beta1=0.85, beta2=0.99, weight_decay=0.1,
                                                      warmup_steps=20, r=1.0, eps=1e-6)),
]


def _po_betas(kw):
    kw = dict(kw)
    if "beta1" in kw or "beta2" in kw:
        kw["betas"] = (kw.pop("beta1", 0.9), kw.pop("beta2", 0.999))
    return kw


@pytest.mark.parametrize("ours_cls, theirs_cls, kw", SCHEDULE_FREE, ids=range(len(SCHEDULE_FREE)))
def test_schedule_free_matches_pytorch_optimizer_at_y_and_at_the_average(ours_cls, theirs_cls, kw):
    ours, ours_opt = train(lambda p: ours_cls(p, **kw))
    theirs, theirs_opt = train(lambda p: theirs_cls(p, **_po_betas(kw)))
    assert_same(ours, theirs, rtol=1e-8)  # x and z kept apart here, y alone there: other roundings
    theirs_opt.eval()  # pytorch-optimizer writes x into the parameters
    x_ours = torch.cat([ours_opt.averaged(p).reshape(-1) for p in ours_opt.param_groups[0]["params"]])
    x_theirs = flat(theirs_opt.param_groups[0]["params"])
    assert relative_error(x_ours, x_theirs) < 1e-8
    assert relative_error(x_ours, ours) > 1e-4  # x is not y


# ---------------------------------------------------------------------------------------------

PRODIGY = [
    dict(),
    dict(weight_decay=0.1, bias_correction=True),
    dict(safeguard_warmup=True, growth_rate=1.02, d_coef=0.5, beta3=0.99),
    dict(weight_decay=0.05, fixed_decay=True, lr=0.5, d0=1e-5),
]


@pytest.mark.parametrize("kw", PRODIGY, ids=range(len(PRODIGY)))
@pytest.mark.parametrize("two_groups", [False, True])
def test_prodigy_matches_pytorch_optimizer(kw, two_groups):
    """With two groups the vectors are exempt from weight decay: d is still one estimate over
    both groups."""
    def grouping(params):
        if not two_groups:
            return params
        matrices, vectors = split_by_ndim(params)
        return [dict(params=matrices), dict(params=vectors, weight_decay=0.0)]

    ours, ours_opt = train(lambda p: ref.Prodigy(p, **kw), grouping=grouping)
    # the library's num/den accumulators follow the default dtype
    theirs, theirs_opt = train(lambda p: PoProdigy(p, **_po_betas(kw)), grouping=grouping, step_dtype=torch.float64)
    assert_same(ours, theirs)
    assert ours_opt.d == pytest.approx(theirs_opt.param_groups[0]["d"], rel=1e-10)
    assert ours_opt.d > 10 * ours_opt.d0  # the estimate grew


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(nesterov=False, weight_decay=0.1, adamw_wd=0.05, lr=0.01,
                                             adamw_lr=5e-3, momentum=0.9)])
def test_muon_adamw_matches_pytorch_optimizer_muon(kw, monkeypatch):
    """pytorch-optimizer's Muon with a use_muon group of matrices and an AdamW group of vectors;
    its iteration patched from bfloat16 to float64, the reference's ns_dtype."""
    import pytorch_optimizer.optimizer.muon.base as muon_base

    monkeypatch.setattr(muon_base, "zero_power_via_newton_schulz_5",
                        functools.partial(muon_base.zero_power_via_newton_schulz_5, dtype=torch.float64))
    ours, _ = train(lambda p: ref.MuonAdamW(p, ns_dtype=torch.float64, clamp_norm=True, **kw))

    def groups(params):
        matrices, vectors = split_by_ndim(params)
        return [dict(params=matrices, use_muon=True), dict(params=vectors, use_muon=False)]

    theirs, _ = train(lambda p: PoMuon(p, foreach=False, **kw), grouping=groups)
    assert_same(ours, theirs, rtol=1e-9)


def test_newton_schulz_matches_pytorch_optimizer_iteration():
    from pytorch_optimizer.optimizer.utils.matrix import zero_power_via_newton_schulz_5

    gen = torch.Generator().manual_seed(5)
    for shape in [(7, 3), (3, 7), (5, 5)]:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        theirs = zero_power_via_newton_schulz_5(g, dtype=torch.float64)
        torch.testing.assert_close(ref.newton_schulz(g, clamp_norm=True), theirs, rtol=1e-12, atol=1e-13)
        singular = torch.linalg.svdvals(theirs)
        assert singular.min() > 0.5 and singular.max() < 1.3  # near-orthogonal, the iteration's band
