"""The papers' methods against plain-PyTorch transcriptions of their equations.

DualAdam / InvAdam: the update of the authors' reference code (LongJin-lab/DualAdam,
DualAdam.py), transcribed from the equations in shared/papers/dualadam_baselines.md §1.3:
one step counter for the optimizer, bias-corrected moments, d = sqrt(v_hat) + eps used in
both halves, r = max(0, 1 - t s) computed in Python floats, the blend only while r >= s,
decoupled weight decay applied before the step.
"""
import pytest
import torch

import gradspec
from references import Alto, Lamb, Lion, Muon

STEPS = 200


class DualAdamReference(torch.optim.Optimizer):
    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8, switch_rate=0.01, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, s=switch_rate, wd=weight_decay))
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        t = self.t
        for group in self.param_groups:
            b1, b2, eps, s, lr = group["beta1"], group["beta2"], group["eps"], group["s"], group["lr"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v, g = state["m"], state["v"], p.grad
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
                d = v_hat.sqrt() + eps
                r = max(0.0, 1 - t * s)
                if r >= s:
                    u = (1 - r) * (m_hat / d) + r * (m_hat * d)
                else:
                    u = m_hat / d
                if group["wd"] != 0:
                    p.add_(p, alpha=-lr * group["wd"])
                p.add_(u, alpha=-lr)


def _train(make, with_closure=False):
    """200 float64 steps of a small MLP; ``with_closure`` steps through a closure (for specs
    that read the loss)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    opt = make(model.parameters())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(STEPS):
        if with_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _assert_close(ours, expected):
    """The papers' parity criterion: 200 float64 steps agree to 1e-10 relative."""
    error = (ours - expected).abs().max() / expected.abs().max()
    assert error < 1e-10, f"relative error {error:.3e}"


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("spec, hyper", [
    ("dualadam", dict(lr=1e-2)),  # crosses the cut-off at t = 100
    ("dualadam", dict(lr=1e-2, switch_rate=0.003, beta2=0.99, weight_decay=0.05)),
    ("invadam", dict(lr=1e-2, weight_decay=0.01)),
], ids=["dualadam", "dualadam-slow-switch-wd", "invadam"])
def test_dualadam_family_matches_the_reference(spec, hyper, backend):
    reference_hyper = dict(hyper)
    if spec == "invadam":
        reference_hyper["switch_rate"] = 0.0
    ours = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, **hyper))
    reference = _train(lambda p: DualAdamReference(p, **reference_hyper))
    _assert_close(ours, reference)


def test_the_switch_is_a_hard_cut_off_at_the_float64_boundary():
    """With s = 0.01, t = 99 is the last blended step: 1 - 100 * 0.01 = 0 < s."""
    def one_step_at(t):
        p = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = gradspec.Optimizer([p], "dualadam", backend="eager", lr=1.0, beta1=0.0, beta2=0.0, eps=1e-30)
        p.grad = torch.full_like(p, 4.0)
        opt.step()
        opt.state[p]["step"].fill_(t - 1)  # jump the counter: the next step is step t
        p.grad = torch.full_like(p, 4.0)
        before = p.item()
        opt.step()
        return before - p.item()

    # beta = 0 and a negligible eps: m_hat = 4, d = 4, so Adam's step is 1 and InvAdam's is 16
    r99 = 1 - 99 * 0.01
    assert one_step_at(99) == pytest.approx((1 - r99) * 1 + r99 * 16)
    assert one_step_at(100) == pytest.approx(1.0)


# ---- the E adaptor (Zhao et al., NeurIPS 2025), from equations (E1)-(E2) and Algorithms 3-4
# of shared/papers/alto_induced.md §1.2: a_k = b a + (1 - b)(g_k - g_{k-1}), a_0 = g_0 = 0,
# and the base optimizer sees g + alpha a_k.

class EReference:
    """Wraps a base torch optimizer: rewrites p.grad to g + alpha * a, then steps the base."""

    def __init__(self, base, alpha, beta):
        self.base, self.alpha, self.beta = base, alpha, beta
        self.a, self.previous = {}, {}

    def zero_grad(self):
        self.base.zero_grad()

    @torch.no_grad()
    def step(self):
        for group in self.base.param_groups:
            for p in group["params"]:
                g = p.grad.clone()
                a = self.a.setdefault(p, torch.zeros_like(p))
                previous = self.previous.setdefault(p, torch.zeros_like(p))
                a.mul_(self.beta).add_((1 - self.beta) * (g - previous))
                self.previous[p] = g
                p.grad = g + self.alpha * a
        self.base.step()


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("spec, hyper, reference", [
    ("eadam", dict(lr=1e-2, alpha=-5.0, beta=0.99),
     lambda p: EReference(torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99)), -5.0, 0.99)),
    ("eadam", dict(lr=1e-2, alpha=0.5, beta=0.01),
     lambda p: EReference(torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.99)), 0.5, 0.01)),
    ("esgd", dict(lr=1e-2, alpha=-5.0, beta=0.9),
     lambda p: EReference(torch.optim.SGD(p, lr=1e-2, momentum=0.9), -5.0, 0.9)),
    ("e(lion)", dict(lr=1e-3, alpha=0.5, beta=0.5),
     lambda p: EReference(Lion(p, lr=1e-3), 0.5, 0.5)),
], ids=["eadam-large-batch", "eadam-small-batch", "esgd", "e-lion"])
def test_e_adaptor_matches_the_paper(spec, hyper, reference, backend):
    ours = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, **hyper))
    expected = _train(lambda p: reference(list(p)))
    _assert_close(ours, expected)


def test_e_adaptor_at_alpha_zero_is_its_base():
    assert torch.equal(_train(lambda p: gradspec.Optimizer(p, "eadam", backend="eager", alpha=0.0, lr=1e-2)),
                       _train(lambda p: gradspec.Optimizer(p, "adam(beta2=0.99)", backend="eager", lr=1e-2)))


def test_e_adaptor_refuses_an_unstable_alpha():
    with pytest.raises(ValueError, match=r"stable only for \|alpha\| < 1 / \(1 - beta\)"):
        gradspec.Optimizer([torch.zeros(2, requires_grad=True)], "eadam", alpha=-200.0, beta=0.99)


# ---- the induced-metric optimizers (Harvey, arXiv 2509.03594), the practical algorithm of
# shared/papers/alto_induced.md §2.2: s = xi * sum over all parameters of g * (P g),
# S = beta S + (1 - beta) s, S_hat = S / (1 - beta^t), EMA momentum with bias correction,
# theta -= lr * r * P m_hat + lr * wd * theta, with r = 1 / (1 + |S_hat|) (plain, rms) or
# r = L / (L^2 + S_hat) (log); P = 1 / (sqrt(v_hat) + eps) for the rms variant.

class InducedMetricReference:
    def __init__(self, params, variant, lr, momentum=0.9, xi=0.1, beta=0.8, beta_rms=0.99, eps=1e-8,
                 weight_decay=0.0):
        self.params = list(params)
        self.variant, self.lr, self.mu, self.xi, self.beta = variant, lr, momentum, xi, beta
        self.beta_rms, self.eps, self.wd = beta_rms, eps, weight_decay
        self.t, self.S = 0, 0.0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.t += 1
        t = self.t
        grads = [p.grad for p in self.params]
        if self.variant == "rms":
            for v, g in zip(self.v, grads):
                v.mul_(self.beta_rms).add_((1 - self.beta_rms) * g * g)
            precond = [1 / ((v / (1 - self.beta_rms ** t)).sqrt() + self.eps) for v in self.v]
        else:
            precond = [torch.ones_like(g) for g in grads]
        s = self.xi * sum(float((g * g * P).sum()) for g, P in zip(grads, precond))
        self.S = self.beta * self.S + (1 - self.beta) * s
        S_hat = self.S / (1 - self.beta ** t)
        if self.variant == "log":
            L = max(float(loss), 1e-12)
            r = L / (L * L + S_hat)
        else:
            r = 1 / (1 + abs(S_hat))
        for p, m, g, P in zip(self.params, self.m, grads, precond):
            m.mul_(self.mu).add_((1 - self.mu) * g)
            m_hat = m / (1 - self.mu ** t)
            p -= self.lr * r * P * m_hat + self.lr * self.wd * p
        return loss


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("spec, variant, hyper", [
    ("sgd_metric", "plain", dict(lr=0.1)),
    ("sgd_metric", "plain", dict(lr=0.3, momentum=0.5, xi=2.0, beta=0.0, weight_decay=1e-2)),
    ("sgd_log_metric", "log", dict(lr=0.05, xi=0.5)),
    ("sgd_rms", "rms", dict(lr=1e-2, xi=0.01, beta=0.6, weight_decay=1e-3)),
], ids=["metric", "metric-exact-wd", "log", "rms"])
def test_induced_metric_matches_the_reference_algorithm(spec, variant, hyper, backend):
    ours = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, **hyper), with_closure=True)
    expected = _train(lambda p: InducedMetricReference(p, variant, **hyper), with_closure=True)
    _assert_close(ours, expected)


def test_induced_metric_at_xi_zero_is_ema_momentum_sgd():
    plain = _train(lambda p: gradspec.Optimizer(p, "sgd_metric", backend="eager", xi=0.0, momentum=0.5))
    ema = gradspec.parse('''optimizer ema_sgd
hyper lr = 0.1 >= 0
hyper momentum = 0.5 in [0, 1)
state m = 0
m' = momentum * m + (1 - momentum) * grad
param' = param - lr * (1 / (1 + abs(0))) * (m' / (1 - momentum^step)) - lr * 0 * param
''')
    # the hand-written spec's redundant terms are folded by the SymPy pass, which reorders its
    # arithmetic: equal to rounding, not bit for bit
    torch.testing.assert_close(plain, _train(lambda p: gradspec.Optimizer(p, ema, backend="eager")),
                               rtol=1e-13, atol=1e-15)


def test_a_global_state_lives_once_per_group_and_resumes_exactly():
    import io
    torch.manual_seed(0)
    params = [torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = gradspec.Optimizer(params, "sgd_metric", backend="eager")
    for _ in range(3):
        for p in params:
            p.grad = p.detach() * 2
        opt.step()
    S = opt.state[params[0]]["S"]
    assert S.dim() == 0 and S.data_ptr() == opt.state[params[1]]["S"].data_ptr() and float(S) > 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    copies = [p.detach().clone().requires_grad_() for p in params]
    buffer.seek(0)
    resumed = gradspec.Optimizer(copies, "sgd_metric", backend="eager")
    resumed.load_state_dict(torch.load(buffer))
    for ps, o in ((params, opt), (copies, resumed)):
        for p in ps:
            p.grad = p.detach() * 2
        o.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
    assert torch.equal(opt.state[params[0]]["S"], resumed.state[copies[0]]["S"])


# ---- LAMB (You et al., ICLR 2020) with its code variants, and ALTO (Zhao et al., Algorithms
# 1-2): against the transcriptions in references.py, written from the papers' equations.

@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("spec, hyper, reference", [
    ("lamb", dict(lr=1e-2), lambda p: Lamb(p, lr=1e-2)),
    ("lamb", dict(lr=1e-2, bias_correction=False, max_weight_norm=10.0, weight_decay=0.0),
     lambda p: Lamb(p, lr=1e-2, bias_correction=False, max_weight_norm=10.0, weight_decay=0.0)),
    ("lamb", dict(lr=1e-2, max_grad_norm=1.0, trust_eps=1e-6, norm_eps=1e-10),
     lambda p: Lamb(p, lr=1e-2, max_grad_norm=1.0, trust_eps=1e-6, norm_eps=1e-10)),
    ("alto", dict(lr=1e-2), lambda p: Alto(p, lr=1e-2)),
    ("alto", dict(lr=1e-2, alpha=0.5, beta=0.01), lambda p: Alto(p, lr=1e-2, alpha=0.5, beta1=0.01)),
    ("alto_vanilla", dict(lr=1e-2), lambda p: Alto(p, lr=1e-2, bias_correction=False)),
], ids=["lamb", "lamb-pytorch-lamb", "lamb-apex-clipping", "alto-large-batch", "alto-small-batch",
        "alto-vanilla"])
def test_lamb_and_alto_match_the_papers(spec, hyper, reference, backend):
    ours = _train(lambda p: gradspec.Optimizer(p, spec, backend=backend, **hyper))
    expected = _train(lambda p: reference(list(p)))
    _assert_close(ours, expected)


def test_the_e_adaptor_applies_to_adamw():
    ours = _train(lambda p: gradspec.Optimizer(p, "e(adamw)", backend="eager", lr=1e-2, alpha=-5.0, beta=0.99))
    expected = _train(lambda p: EReference(torch.optim.AdamW(list(p), lr=1e-2), -5.0, 0.99))
    _assert_close(ours, expected)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("hyper", [dict(lr=1e-2), dict(lr=1e-2, switch_rate=0.003, weight_decay=0.05)],
                         ids=["default", "slow-switch-wd"])
def test_dualadam_matches_pytorch_optimizer(hyper, backend):
    """pytorch-optimizer's DualAdam (a peer implementation) uses the same blend, cut-off and
    bias correction; with weight_decouple=True its decay is ours (decoupled, scaled by lr)."""
    from pytorch_optimizer import DualAdam
    ours = _train(lambda p: gradspec.Optimizer(p, "dualadam", backend=backend, **hyper))
    peer = _train(lambda p: DualAdam(p, lr=hyper["lr"], switch_rate=hyper.get("switch_rate", 0.01),
                                     weight_decay=hyper.get("weight_decay", 0.0), weight_decouple=True))
    _assert_close(ours, peer)



# ---- Muon (KellerJordan/Muon), float64 with the iteration in float64: 2-D weights and a
# 4-D filter (viewed as [out, in * kh * kw]). The gradients are a quadratic pull plus seeded
# noise: once a model's gradient is tiny, orthogonalising it amplifies rounding without
# bound (singular values near 0 are pushed towards 1), and two exact implementations part
# after ~100 steps for that reason alone; noise keeps the comparison about the update rule.

def _train_matrices(make, steps=STEPS):
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 6), (3, 16), (4, 2, 3, 3)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p, target in zip(params, targets):
            p.grad = (p.detach() - target) + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("hyper", [dict(lr=0.02), dict(lr=0.02, nesterov=False, weight_decay=0.01, momentum=0.9)],
                         ids=["nesterov", "heavy-ball-wd"])
def test_muon_matches_the_reference_in_float64(hyper, backend):
    ours = _train_matrices(lambda p: gradspec.Optimizer(p, "muon", backend=backend, ns_bfloat16=False, **hyper))
    expected = _train_matrices(lambda p: Muon(p, ns_dtype=torch.float64, **hyper))
    _assert_close(ours, expected)


def test_muon_in_bfloat16_stays_near_the_float64_iteration():
    """The reference's own bf16 iteration is 2.5% off float64 (the paper notes); ours too."""
    ours = _train_matrices(lambda p: gradspec.Optimizer(p, "muon", backend="eager"), steps=20)
    exact = _train_matrices(lambda p: Muon(p, ns_dtype=torch.float64), steps=20)
    assert ((ours - exact).norm() / exact.norm()).item() < 0.05


def test_muon_for_hidden_weights_and_adamw_for_the_rest_as_the_docs_say():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    hidden = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opts = [gradspec.Optimizer(hidden, "muon", lr=0.02, backend="eager"),
            gradspec.Optimizer(rest, "adamw", lr=3e-3, backend="eager")]
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    losses = []
    for _ in range(50):
        for opt in opts:
            opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
