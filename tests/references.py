"""Plain-PyTorch transcriptions shared by the parity tests (never generated from a spec)."""
import torch


class Lion(torch.optim.Optimizer):
    """Lion as the paper writes it (Chen et al. 2023, Program 1)."""

    def __init__(self, params, lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                m = self.state[p].setdefault("m", torch.zeros_like(p))
                c = group["beta1"] * m + (1 - group["beta1"]) * p.grad
                p -= group["lr"] * (torch.sign(c) + group["weight_decay"] * p)
                m.mul_(group["beta2"]).add_((1 - group["beta2"]) * p.grad)


class Lamb(torch.optim.Optimizer):
    """LAMB per tensor, transcribed from shared/papers/dualadam_baselines.md §5 (paper form,
    with the options of pytorch-lamb and apex FusedLAMB) and the zero-proofing of the ALTO
    paper's Algorithm 2: ratio = phi / (|r| + trust_eps * phi), phi = |theta| + norm_eps
    (|theta| clamped to max_weight_norm first when that is > 0), and 1 where either is 0."""

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01,
                 bias_correction=True, trust_eps=0.0, norm_eps=0.0, max_weight_norm=0.0, max_grad_norm=0.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, wd=weight_decay,
                                      bias_correction=bias_correction, trust_eps=trust_eps,
                                      norm_eps=norm_eps, max_weight_norm=max_weight_norm,
                                      max_grad_norm=max_grad_norm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            grads = [p.grad for p in group["params"]]
            scale = 1.0
            if group["max_grad_norm"] > 0:
                total = torch.sqrt(sum((g * g).sum() for g in grads))
                scale = 1.0 / max(1.0, float(total) / group["max_grad_norm"])
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["t"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                state["t"] += 1
                t, m, v, g = state["t"], state["m"], state["v"], p.grad * scale
                m.mul_(group["beta1"]).add_((1 - group["beta1"]) * g)
                v.mul_(group["beta2"]).add_((1 - group["beta2"]) * g * g)
                m_hat, v_hat = m, v
                if group["bias_correction"]:
                    m_hat, v_hat = m / (1 - group["beta1"] ** t), v / (1 - group["beta2"] ** t)
                r = m_hat / (v_hat.sqrt() + group["eps"]) + group["wd"] * p
                weight_norm = p.norm()
                if group["max_weight_norm"] > 0:
                    weight_norm = weight_norm.clamp(max=group["max_weight_norm"])
                phi = weight_norm + group["norm_eps"]
                r_norm = r.norm()
                ratio = phi / (r_norm + group["trust_eps"] * phi) if phi > 0 and r_norm > 0 else 1.0
                p.sub_(group["lr"] * ratio * r)


class Alto(torch.optim.Optimizer):
    """ALTO, Algorithms 1 (bias_correction=False) and 2 of Zhao et al. (NeurIPS 2025), as
    shared/papers/alto_induced.md §1.2 writes them, in its indexing: beta1 drives a, beta2 m,
    beta3 v; g_0 = 0 and a_0 = 0."""

    def __init__(self, params, lr, alpha=-5.0, beta1=0.99, beta2=0.9, beta3=0.99, eps1=1e-6, eps2=1e-6,
                 eps3=1e-10, weight_decay=1e-4, bias_correction=True):
        super().__init__(params, dict(lr=lr, alpha=alpha, b1=beta1, b2=beta2, b3=beta3, e1=eps1, e2=eps2,
                                      e3=eps3, wd=weight_decay, bc=bias_correction))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(k=0, a=torch.zeros_like(p), g_prev=torch.zeros_like(p),
                                 m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["k"] += 1
                k, g = state["k"], p.grad.clone()
                state["a"] = group["b1"] * state["a"] + (1 - group["b1"]) * (g - state["g_prev"])
                state["g_prev"] = g
                g_tilde = g + group["alpha"] * state["a"]
                state["m"] = group["b2"] * state["m"] + (1 - group["b2"]) * g_tilde
                state["v"] = group["b3"] * state["v"] + (1 - group["b3"]) * g_tilde ** 2
                m, v = state["m"], state["v"]
                if group["bc"]:
                    m, v = m / (1 - group["b2"] ** k), v / (1 - group["b3"] ** k)
                r = m / (v.sqrt() + group["e1"]) + group["wd"] * p
                phi = p.norm() + group["e3"]
                p.sub_(group["lr"] * r * phi / (r.norm() + group["e2"] * phi))


class Muon(torch.optim.Optimizer):
    """Muon as shared/papers/dualadam_baselines.md §3.1 writes KellerJordan/Muon's
    muon_update: B <- lerp(B, G, 1 - mu); U = lerp(G, B, mu) (Nesterov) or B; U viewed as
    [rows, rest]; NS5 (a, b, c = 3.4445, -4.7750, 2.0315, 5 steps, wide orientation, X / (|X|_F
    + 1e-7)) in ``ns_dtype``; times sqrt(max(1, size(-2) / size(-1))); decoupled decay."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, mu=momentum, nesterov=nesterov, wd=weight_decay, ns_dtype=ns_dtype))

    @staticmethod
    def newton_schulz(g, dtype):
        a, b, c = 3.4445, -4.7750, 2.0315
        x = g.to(dtype)
        if g.size(-2) > g.size(-1):
            x = x.mT
        x = x / (x.norm() + 1e-7)
        for _ in range(5):
            s = x @ x.mT
            x = a * x + (b * s + c * s @ s) @ x
        if g.size(-2) > g.size(-1):
            x = x.mT
        return x

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("B", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["mu"])
                u = p.grad.lerp(buf, group["mu"]) if group["nesterov"] else buf
                o = self.newton_schulz(u.reshape(u.size(0), -1), group["ns_dtype"]).to(p.dtype)
                o = o * max(1, p.size(-2) / p.size(-1)) ** 0.5
                p.mul_(1 - group["lr"] * group["wd"])
                p.sub_(group["lr"] * o.reshape(p.shape))
