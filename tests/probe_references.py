"""Plain-PyTorch transcriptions of the probing optimizers' papers (never generated from a spec).

Every reference treats a model's parameters as ONE flat vector, in ``params`` order, and
counts steps t = 1, 2, ...; a method that looks at the model every k steps does so at
t = 1, k + 1, 2k + 1, ... (``(t - 1) % k == 0``), before that step's update, whose update then
uses the fresh result. Random draws follow gradspec's documented protocol, so a reference
given the same seed sees the same numbers: one ``torch.Generator`` seeded with ``seed``;
a Gaussian vector is drawn parameter by parameter (``normal(params)``): DEO's initial
direction at the first step, Sophia-H's ``u`` at each estimate; Sophia-G samples each row's
label by inverse CDF, the first class whose cumulative float64 softmax exceeds a uniform
``rand(rows)`` draw.

Sources (equations only, see shared/papers/):
* Sophia: Liu et al., ICLR 2024, Algorithm 3 (dualadam_baselines.md §2.1), max form.
* DEO: Hu, Cao & Liu, arXiv 2507.19968, paper form (deo_bulk.md §1.1 and §1.8), with the
  rotation sign ``rot_sign`` of ambiguity A1, the rotation force divided by dR (A2), a single
  global direction (A3), the projection on every step with the post-rotation N (A5, A7),
  and the far end of the dimer evaluated on the same batch (A6).
* Bulk-SGD / Dom-SGD / interpolated: Song, Ahn & Yun (ICLR 2025) and Zakarin & Singh
  (deo_bulk.md §2.1): exact top-k eigenvectors (by algebraic value) of the full Hessian on
  the batch, a * g_dom + b * g_bulk handed to the base optimizer.

A closure computes the loss on the batch at the parameters' current values; it returns the
loss, or (loss, logits) for Sophia-G; it may call ``loss.backward()`` itself, in which case
the gradient is read from ``p.grad``.
"""
import torch
import torch.nn.functional as F


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def normal(params, generator):
    """A Gaussian vector over the model: one draw per parameter, in ``params`` order."""
    return flat([torch.randn(p.numel(), generator=generator, dtype=p.dtype) for p in params])


def unflat(vector, params):
    out, start = [], 0
    for p in params:
        out.append(vector[start:start + p.numel()].view_as(p))
        start += p.numel()
    return out


def _call(closure):
    with torch.enable_grad():
        out = closure()
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def gradient(params, closure, create_graph=False):
    """(loss, logits, g, graph_g): g the flat gradient at the current parameters; graph_g the
    differentiable gradient pieces when ``create_graph`` (the closure must not call backward)."""
    for p in params:
        p.grad = None
    loss, logits = _call(closure)
    if all(p.grad is None for p in params):
        with torch.enable_grad():
            pieces = torch.autograd.grad(loss, params, create_graph=create_graph, retain_graph=True)
        g = flat([x.detach() for x in pieces])
        graph = pieces if create_graph else None
    else:
        assert not create_graph, "a closure that calls backward gives no graph for Hessian products"
        g = flat([p.grad.detach() for p in params])
        graph = None
    for p in params:
        p.grad = None
    return loss, logits, g, graph


def hessian_vector(params, graph_g, v):
    """H v (flat) from the differentiable gradient pieces."""
    with torch.enable_grad():
        pieces = torch.autograd.grad(graph_g, params, grad_outputs=unflat(v, params), retain_graph=True)
    return flat([x.detach() for x in pieces])


def full_hessian(params, graph_g):
    """The d x d Hessian: row i is the gradient of g_i, every row from one batched double
    backward (the identity's rows as the batch of output gradients). The same products as a
    backward per coordinate, a tenth of the CPU: a 100-step Bulk/Dom reference refreshing
    every step spent most of its time here."""
    g = flat(graph_g)
    with torch.enable_grad():
        rows = torch.autograd.grad(g, params, grad_outputs=torch.eye(g.numel(), dtype=g.dtype, device=g.device),
                                   retain_graph=True, is_grads_batched=True)
    return torch.cat([r.detach().reshape(g.numel(), -1) for r in rows], dim=1)


# ---------------------------------------------------------------- base optimizers on a flat gradient

class TorchBase:
    """A torch.optim optimizer fed the transformed gradient through ``p.grad``."""

    def __init__(self, params, make):
        self.params = params
        self.optim = make(params)

    def update(self, g, t, hessian_tools):
        for p, piece in zip(self.params, unflat(g, self.params)):
            p.grad = piece.clone()
        self.optim.step()
        for p in self.params:
            p.grad = None


class SophiaBase:
    """Sophia, Algorithm 3 of Liu et al. (ICLR 2024), max form:
    m_t = b1 m + (1 - b1) g every step; at t = 1, k + 1, ...: h = b2 h + (1 - b2) h_hat (no bias
    correction); theta <- theta - lr wd theta; theta <- theta - lr clip(m / max(gamma h, eps), 1).
    h_hat: Hutchinson u * (H u), u ~ N(0, I) (Sophia-H), or Gauss-Newton-Bartlett
    B * grad(mean CE(logits, y_hat))^2 with y_hat ~ softmax(logits) (Sophia-G)."""

    def __init__(self, params, lr=1e-4, beta1=0.965, beta2=0.99, gamma=0.01, eps=1e-12, weight_decay=0.1, k=10,
                 estimator="hutchinson"):
        self.params = params
        self.lr, self.b1, self.b2, self.gamma, self.eps, self.wd, self.k = lr, beta1, beta2, gamma, eps, weight_decay, k
        self.estimator = estimator
        d = sum(p.numel() for p in params)
        dtype = params[0].dtype
        self.m = torch.zeros(d, dtype=dtype)
        self.h = torch.zeros(d, dtype=dtype)
        self.unclipped = []  # per step, the fraction of coordinates where |m| < gamma h (h matters)

    def due(self, t):
        return (t - 1) % self.k == 0

    def update(self, g, t, hessian_tools):
        self.m = self.b1 * self.m + (1 - self.b1) * g
        if self.due(t):
            h_hat = hessian_tools.estimate(self.estimator)
            self.h = self.b2 * self.h + (1 - self.b2) * h_hat
        ratio = self.m / torch.clamp(self.gamma * self.h, min=self.eps)
        self.unclipped.append(float((ratio.abs() < 1).double().mean()))
        ratio = torch.clamp(ratio, -1.0, 1.0)
        with torch.no_grad():
            theta = flat([p.detach() for p in self.params])
            theta = theta - self.lr * self.wd * theta - self.lr * ratio
            for p, piece in zip(self.params, unflat(theta, self.params)):
                p.copy_(piece)


class HessianTools:
    """What a step knows about the model for the Hessian-diagonal estimators."""

    def __init__(self, params, graph_g, logits, generator):
        self.params, self.graph_g, self.logits, self.generator = params, graph_g, logits, generator

    def estimate(self, estimator):
        if estimator == "hutchinson":
            u = normal(self.params, self.generator)
            return u * hessian_vector(self.params, self.graph_g, u)
        # Gauss-Newton-Bartlett: labels from the model's own softmax, B = rows of logits
        logits = self.logits.reshape(-1, self.logits.shape[-1])
        cumulative = torch.softmax(logits.detach().double(), dim=-1).cumsum(dim=-1)
        uniforms = torch.rand(logits.shape[0], generator=self.generator, dtype=torch.float64)
        labels = (cumulative <= uniforms[:, None]).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
        with torch.enable_grad():
            sampled = F.cross_entropy(logits, labels)
            pieces = torch.autograd.grad(sampled, self.params, retain_graph=True)
        gs = flat([x.detach() for x in pieces])
        return logits.shape[0] * gs * gs


# ---------------------------------------------------------------- the methods

class Sophia:
    """Sophia-H / Sophia-G stepped with a closure (loss, or (loss, logits) for Sophia-G)."""

    def __init__(self, params, seed=0, **hyper):
        self.params = list(params)
        self.base = SophiaBase(self.params, **hyper)
        self.generator = torch.Generator().manual_seed(seed)
        self.t = 0

    def step(self, closure):
        self.t += 1
        due = self.base.due(self.t)
        loss, logits, g, graph = gradient(self.params, closure,
                                          create_graph=due and self.base.estimator == "hutchinson")
        self.base.update(g, self.t, HessianTools(self.params, graph, logits, self.generator))
        return loss.detach()


class DEO:
    """Dimer-Enhanced Optimization, paper form, over ``base`` (a TorchBase or SophiaBase).

    At t = 1, T + 1, ...: n = N / |N|; Hn = (g(theta + dR n) - g(theta)) / dR on the same batch;
    F = Hn - <Hn, n> n; N <- normalize(n + rot_sign rot_lr F). Every step: the base sees
    g - alpha <g, N> N. N starts as a Gaussian draw at the first step. ``phase`` moves the
    rotation steps to t = phase (mod T), for the tests that show a reference can fail (0: the
    "t mod T = 0" of deo_bulk.md §1.1; N is then normalised when drawn)."""

    def __init__(self, params, base, seed=0, alpha=1.0, T=10, rot_lr=0.1, dR=1e-3, rot_sign=-1, phase=1):
        self.params = list(params)
        self.phase = phase
        self.base = base(self.params)
        self.alpha, self.T, self.rot_lr, self.dR, self.rot_sign = alpha, T, rot_lr, dR, rot_sign
        self.generator = torch.Generator().manual_seed(seed)
        self.N = None
        self.t = 0

    def gradient_at(self, closure, displaced):
        """g at ``displaced``; the parameters' storage is swapped, not written, so the graph of
        the step's own gradient (kept for a Sophia base's Hessian product) stays valid."""
        originals = [p.data for p in self.params]
        try:
            for p, x in zip(self.params, unflat(displaced, self.params)):
                p.data = x.clone()
            _, _, g, _ = gradient(self.params, closure)
        finally:
            for p, x in zip(self.params, originals):
                p.data = x
        return g

    def step(self, closure):
        self.t += 1
        sophia_due = isinstance(self.base, SophiaBase) and self.base.due(self.t)
        loss, logits, g, graph = gradient(self.params, closure, create_graph=sophia_due)
        if self.N is None:
            self.N = normal(self.params, self.generator)
            if (1 - self.phase) % self.T != 0:  # no rotation at t = 1 normalises it: start from a unit N
                self.N = self.N / self.N.norm()
        if (self.t - self.phase) % self.T == 0:
            n = self.N / self.N.norm()
            theta = flat([p.detach() for p in self.params])
            Hn = (self.gradient_at(closure, theta + self.dR * n) - g) / self.dR
            force = Hn - torch.dot(Hn, n) * n
            rotated = n + self.rot_sign * self.rot_lr * force
            self.N = rotated / rotated.norm()
        g_tilde = g - self.alpha * torch.dot(g, self.N) * self.N
        self.base.update(g_tilde, self.t, HessianTools(self.params, graph, logits, self.generator))
        return loss.detach()


class BulkDom:
    """The interpolated gradient methods: every R steps U = the top-k (algebraic) eigenvectors
    of the exact Hessian on the batch (torch.linalg.eigh); the base sees a g_dom + b g_bulk with
    g_dom = U U^T g. ``gaps`` records (lambda_k - lambda_{k+1}) / max |lambda| at each refresh, to
    show that the top-k subspace is well defined, and ``magnitude_differs`` the refreshes where
    the k largest |lambda| are other eigenvalues (``rank_by="magnitude"`` uses those, a wrong
    reading of "top" for the tests that show a reference can fail)."""

    def __init__(self, params, base, a=0.0, b=1.0, k=10, R=1, rank_by="value"):
        self.params = list(params)
        self.rank_by = rank_by
        self.magnitude_differs = 0
        self.base = base(self.params)
        self.a, self.b, self.k, self.R = a, b, k, R
        self.U = None
        self.gaps = []
        self.t = 0

    def step(self, closure):
        self.t += 1
        due = (self.t - 1) % self.R == 0
        loss, _, g, graph = gradient(self.params, closure, create_graph=due)
        if due:
            H = full_hessian(self.params, graph)
            values, vectors = torch.linalg.eigh(H)  # ascending
            top = torch.arange(values.numel() - self.k, values.numel())
            by_magnitude = torch.argsort(values.abs(), descending=True)[:self.k]
            self.magnitude_differs += set(top.tolist()) != set(by_magnitude.tolist())
            self.U = vectors[:, top if self.rank_by == "value" else by_magnitude]
            self.gaps.append(float((values[-self.k] - values[-self.k - 1]) / values.abs().max()))
        g_dom = self.U @ (self.U.T @ g)
        g_tilde = self.a * g_dom + self.b * (g - g_dom)
        self.base.update(g_tilde, self.t, None)
        return loss.detach()
