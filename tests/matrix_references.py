"""Plain-PyTorch transcriptions of the matrix-aware, factored and distance-adaptive methods
(issue 15), written from the papers' algorithm boxes, never generated from a spec.

Each class is a ``torch.optim.Optimizer`` whose ``step()`` reads ``p.grad``; the functions
``agc_clip`` and ``centralize`` transform one gradient. Hyperparameters carry
pytorch-optimizer 4.1's names and defaults (``betas`` split into ``beta1``, ``beta2``) where it
has the method, so a spec written with those names can be compared against these classes
directly. Where pytorch-optimizer departs from the paper, the class says which form it
computes and, when the departure changes numbers, offers the paper's form behind an option;
``tests/test_matrix_references.py`` holds each class equal to pytorch-optimizer's over 100+
float64 steps and lists the departures that had to be mirrored.

Shapes: a parameter with two or more dimensions is read as a matrix, its first dimension
against the rest (``p.reshape(p.shape[0], -1)``, Muon's view, the language's matrix view);
a vector (0-D or 1-D) is a vector. For 2-D parameters this is every paper's and
pytorch-optimizer's reading; for conv kernels pytorch-optimizer factors otherwise (see each
class).

Sources (equations only):
* Adafactor: Shazeer & Stern, ICML 2018, Algorithms 4-5 with relative step (Sec. 8), update
  clipping (Sec. 6) and the beta2 schedule 1 - t^-0.8 (Sec. 7.2); momentum on the clipped
  update and the beta2 cap as in Zhai et al. 2021 (pytorch-optimizer's "BigVision" form).
* Shampoo: Gupta, Koren & Singer, ICML 2018, Algorithm 1 (matrix case); blocking, the beta2
  EMA, gradient filtering (beta1) and grafting to Adam's per-block step norm from Shi et al.
  2023, "A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo
  Optimizer" (Sec. 3; the README's "grafting only grafts the second moment").
* SOAP: Vyas et al. 2024, Algorithm 3 (Adam in Shampoo's eigenbasis; one power-iteration + QR
  refresh of the basis every precondition_frequency steps).
* GaLore: Zhao et al., ICML 2024, Algorithm 2 (Adam on the rank-r projection from an SVD of
  the gradient refreshed every update_proj_gap steps).
* AGC: Brock et al. 2021 (NFNets), Sec. 4, unit-wise: one norm per output unit (row).
* Gradient centralisation: Yong et al., ECCV 2020, Eq. 1: each output row minus its mean.
* Schedule-free SGD / AdamW: Defazio et al., NeurIPS 2024, Algorithm 1 (y, z and x sequences).
* Prodigy: Mishchenko & Defazio, ICML 2024, Algorithm 3 (Adam version), in the official
  code's normalisation (the (1 - sqrt(beta2)) factors of the box cancel in d_hat).
* Muon: Jordan et al. 2024, the quintic Newton-Schulz iteration (3.4445, -4.7750, 2.0315) on
  the Nesterov momentum, scaled by sqrt(max(1, rows / cols)); AdamW for vectors.
"""
import math

import torch


def as_matrix(t):
    """A parameter's matrix view: its first dimension against the rest."""
    return t.reshape(t.shape[0], -1)


def rms(t):
    return t.norm() / math.sqrt(t.numel())


def _lazy_state(optimizer, p, **init):
    state = optimizer.state[p]
    if not state:
        state.update({k: (v() if callable(v) else v) for k, v in init.items()})
    return state


# ---------------------------------------------------------------------------------------------
# Adafactor


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018), with pytorch-optimizer's options.

    Per step t (counting from 1): beta2_t = min(beta2, 1 - t^decay_rate); the relative step
    rho_t = min(1e-6 t if warmup_init else 1e-2, 1 / sqrt(t)) (or lr when relative_step is
    off); alpha_t = max(eps2, RMS(X_{t-1})) rho_t when scale_parameter. For a matrix the
    second moment is factored into row sums R and column sums C of G^2 + eps1, with
    V = R C^T / (1^T R) (Algorithm 4); a vector keeps the full EMA (Algorithm 5).
    U = G / sqrt(V), clipped to U / max(1, RMS(U) / clip_threshold), times alpha_t; with
    beta1 > 0 the parameter moves by the EMA of these updates (no bias correction), else by
    the update itself. beta1 = 0 is the paper's setting (pytorch-optimizer: betas[0] None).
    Weight decay (not in the paper) as pytorch-optimizer: decoupled p *= 1 - wd * alpha_t
    (1 - wd with fixed_decay), or coupled G += wd * p, applied after alpha_t is read.
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, decay_rate=-0.8, weight_decay=0.0,
                 weight_decouple=True, fixed_decay=False, clip_threshold=1.0, scale_parameter=True,
                 relative_step=True, warmup_init=False, eps1=1e-30, eps2=1e-3):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, decay_rate=decay_rate,
                                      weight_decay=weight_decay, weight_decouple=weight_decouple,
                                      fixed_decay=fixed_decay, clip_threshold=clip_threshold,
                                      scale_parameter=scale_parameter, relative_step=relative_step,
                                      warmup_init=warmup_init, eps1=eps1, eps2=eps2))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                factored = p.dim() >= 2
                rows = p.shape[0] if factored else 0
                cols = p.numel() // rows if factored else 0
                state = _lazy_state(
                    self, p, t=0, m=lambda: torch.zeros_like(p),
                    R=lambda: torch.zeros(rows, dtype=p.dtype), C=lambda: torch.zeros(cols, dtype=p.dtype),
                    V=lambda: torch.zeros_like(p))
                state["t"] += 1
                t = state["t"]
                beta2_t = min(group["beta2"], 1.0 - t ** group["decay_rate"])
                if group["relative_step"]:
                    rho = min(1e-6 * t if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(t))
                else:
                    rho = group["lr"]
                alpha = max(group["eps2"], float(rms(p))) * rho if group["scale_parameter"] else rho
                g = p.grad
                wd = group["weight_decay"]
                if wd != 0:
                    if group["weight_decouple"]:
                        p.mul_(1 - wd * (1.0 if group["fixed_decay"] else alpha))
                    else:
                        g = g + wd * p
                sq = g * g + group["eps1"]
                if factored:
                    sq = as_matrix(sq)
                    state["R"] = beta2_t * state["R"] + (1 - beta2_t) * sq.sum(dim=1)
                    state["C"] = beta2_t * state["C"] + (1 - beta2_t) * sq.sum(dim=0)
                    v = torch.outer(state["R"], state["C"]) / state["R"].sum()
                    v = v.reshape(p.shape)
                else:
                    state["V"] = beta2_t * state["V"] + (1 - beta2_t) * sq
                    v = state["V"]
                u = g / v.sqrt()
                u = u / max(1.0, float(rms(u)) / group["clip_threshold"])
                u = alpha * u
                if group["beta1"]:
                    state["m"] = group["beta1"] * state["m"] + (1 - group["beta1"]) * u
                    u = state["m"]
                p.sub_(u)


# ---------------------------------------------------------------------------------------------
# Shampoo, blocked and grafted


def inverse_root(matrix, root, eps):
    """(A + eps I)^(-1/root) for a symmetric positive semi-definite A, by eigendecomposition;
    eigenvalues that rounding pushed below 0 count as 0."""
    evals, evecs = torch.linalg.eigh(matrix)
    evals = evals.clamp_min(0) + eps
    return (evecs * evals.pow(-1.0 / root)) @ evecs.mT


def blocks(length, size):
    """The index ranges cutting ``length`` into chunks of at most ``size`` (the last shorter)."""
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


class Shampoo(torch.optim.Optimizer):
    """Shampoo (Gupta et al. 2018) in Distributed Shampoo's form (Shi et al. 2023).

    Each matrix view G (rows x cols) is cut into blocks of at most max_preconditioner_dim
    rows and columns; each block B keeps L = sum/EMA of B B^T and R of B^T B (beta2 = 1: the
    AdaGrad sum of Gupta et al.; beta2 < 1: L <- beta2 L + (1 - beta2) B B^T), starting at 0.
    At steps t = 1, k + 1, 2k + 1, ... (k = precondition_frequency) the roots
    (L + matrix_eps I)^(-1/4) and (R + matrix_eps I)^(-1/4) are recomputed from the statistics
    that include the step's gradient; in between the stale roots are used. A vector is
    preconditioned by one factor per block with root -1/2 when precondition_1d, else it takes
    the graft's direction only.

    The search direction is computed from the filtered gradient F (beta1 > 0: EMA of the
    gradient, divided by 1 - beta1^t when bias_correction; beta1 = 0: the gradient). With the
    Adam graft (graft="adam") the graft direction is A = F / (sqrt(v / (1 - graft_beta2^t)) +
    graft_eps), v the EMA of g^2, and each block's Shampoo direction L^-1/4 F_B R^-1/4 is
    rescaled to the norm of A on that block (0 where the Shampoo direction is 0). Before
    start_preconditioning_step the graft's direction alone is used. graft="none" takes the
    Shampoo direction unscaled. Weight decay: decoupled p *= 1 - lr * wd, or coupled
    g += wd * p before anything else. With graft="none", beta1 = 0, beta2 = 1,
    precondition_frequency = 1, precondition_1d and blocks larger than every dimension this
    is Gupta et al.'s Algorithm 1 with statistics starting at matrix_eps * I
    (pytorch-optimizer's Shampoo with momentum = 0).
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=1.0, matrix_eps=1e-6, weight_decay=0.0,
                 weight_decouple=True, precondition_frequency=1, start_preconditioning_step=1,
                 max_preconditioner_dim=1024, graft="adam", graft_beta2=0.999, graft_eps=1e-8,
                 bias_correction=True, precondition_1d=False):
        if graft not in ("adam", "none"):
            raise ValueError(f"graft must be 'adam' or 'none', not {graft!r}")
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, matrix_eps=matrix_eps,
                                      weight_decay=weight_decay, weight_decouple=weight_decouple,
                                      precondition_frequency=precondition_frequency,
                                      start_preconditioning_step=start_preconditioning_step,
                                      max_preconditioner_dim=max_preconditioner_dim, graft=graft,
                                      graft_beta2=graft_beta2, graft_eps=graft_eps,
                                      bias_correction=bias_correction, precondition_1d=precondition_1d))

    @staticmethod
    def _accumulate(stat, outer, beta2):
        return stat + outer if beta2 == 1 else beta2 * stat + (1 - beta2) * outer

    def _block_layout(self, p, group):
        """[(row slice, col slice or None)] of the parameter's blocks; None for no Shampoo."""
        size = group["max_preconditioner_dim"]
        if p.dim() >= 2:
            matrix = as_matrix(p)
            return [(r, c) for r in blocks(matrix.shape[0], size) for c in blocks(matrix.shape[1], size)]
        if group["precondition_1d"]:
            return [(r, None) for r in blocks(p.numel(), size)]
        return None

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2, eps = group["beta1"], group["beta2"], group["matrix_eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                layout = self._block_layout(p, group)
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), blocks=[])
                    for r, c in layout or []:
                        n_r = r.stop - r.start
                        block = dict(L=torch.zeros(n_r, n_r, dtype=p.dtype), Linv=None)
                        if c is not None:
                            n_c = c.stop - c.start
                            block.update(R=torch.zeros(n_c, n_c, dtype=p.dtype), Rinv=None)
                        state["blocks"].append(block)
                state["t"] += 1
                t = state["t"]
                g = p.grad
                wd = group["weight_decay"]
                if wd != 0 and not group["weight_decouple"]:
                    g = g + wd * p
                if beta1 > 0:
                    state["m"] = beta1 * state["m"] + (1 - beta1) * g
                    filtered = state["m"] / (1 - beta1 ** t) if group["bias_correction"] else state["m"]
                else:
                    filtered = g
                if group["graft"] == "adam":
                    gb2 = group["graft_beta2"]
                    state["v"] = gb2 * state["v"] + (1 - gb2) * g * g
                    v_hat = state["v"] / (1 - gb2 ** t) if group["bias_correction"] else state["v"]
                    graft = filtered / (v_hat.sqrt() + group["graft_eps"])
                else:
                    graft = filtered
                if layout is None:
                    direction = graft
                else:
                    refresh = (t - 1) % group["precondition_frequency"] == 0
                    preconditioning = t >= group["start_preconditioning_step"]
                    g_mat, f_mat, a_mat = (x.reshape(x.shape[0], -1) if p.dim() >= 2 else x.reshape(-1, 1)
                                           for x in (g, filtered, graft))
                    out = torch.empty_like(f_mat)
                    for (r, c), block in zip(layout, state["blocks"]):
                        cols = c if c is not None else slice(0, 1)
                        gb, fb, ab = g_mat[r, cols], f_mat[r, cols], a_mat[r, cols]
                        block["L"] = self._accumulate(block["L"], gb @ gb.mT, beta2)
                        if c is not None:
                            block["R"] = self._accumulate(block["R"], gb.mT @ gb, beta2)
                        if refresh:
                            root = 4 if c is not None else 2
                            block["Linv"] = inverse_root(block["L"], root, eps)
                            if c is not None:
                                block["Rinv"] = inverse_root(block["R"], root, eps)
                        if not preconditioning:
                            out[r, cols] = ab
                            continue
                        sb = block["Linv"] @ fb
                        if c is not None:
                            sb = sb @ block["Rinv"]
                        if group["graft"] == "adam":
                            s_norm = sb.norm()
                            sb = sb * (ab.norm() / s_norm) if s_norm > 0 else torch.zeros_like(sb)
                        out[r, cols] = sb
                    direction = out.reshape(p.shape)
                if wd != 0 and group["weight_decouple"]:
                    p.mul_(1 - group["lr"] * wd)
                p.sub_(group["lr"] * direction)


# ---------------------------------------------------------------------------------------------
# SOAP


class SOAP(torch.optim.Optimizer):
    """SOAP (Vyas et al. 2024, Algorithm 3): Adam whose second moment lives in the eigenbasis
    of Shampoo's statistics, as the authors' code and pytorch-optimizer compute it.

    For a matrix view G: GG_L <- lerp(GG_L, G G^T, 1 - shampoo_beta) and GG_R with G^T G
    (shampoo_beta < 0 means beta2, pytorch-optimizer's None). Step 1 only builds the
    statistics and the basis Q = eigenvectors of GG + 1e-30 I, largest eigenvalue first; the
    parameters do not move. From step t = 2 on, with s = t - 1: G' = Q_L^T G Q_R;
    m <- lerp(m, G, 1 - beta1) in the original space; v <- lerp(v, G'^2, 1 - beta2) in the
    rotated one; N = Q_L (Q_L^T m Q_R / (sqrt(v) + eps)) Q_R^T; optionally N /= RMS(N) + eps;
    p -= lr sqrt(1 - beta2^s) / (1 - beta1^s) N (correct_bias), then p *= 1 - lr wd. Then the
    statistics take G, and when s % precondition_frequency == 0 each basis is refreshed by one
    power iteration: M = GG Q, order = argsort(diag(Q^T GG Q), descending), v permuted along
    that side by the order, Q = qr(M[:, order]).Q. pytorch-optimizer runs that QR in float32
    even for float64 parameters (``qr_dtype``). A side longer than max_precondition_dim, and a
    vector unless precondition_1d, keeps the identity basis.
    """

    def __init__(self, params, lr=3e-3, beta1=0.95, beta2=0.95, shampoo_beta=-1.0, weight_decay=1e-2,
                 precondition_frequency=10, max_precondition_dim=10000, precondition_1d=False,
                 correct_bias=True, normalize_gradient=False, eps=1e-8, qr_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, shampoo_beta=shampoo_beta,
                                      weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                                      max_precondition_dim=max_precondition_dim, precondition_1d=precondition_1d,
                                      correct_bias=correct_bias, normalize_gradient=normalize_gradient,
                                      eps=eps, qr_dtype=qr_dtype))

    @staticmethod
    def _view(x):
        return as_matrix(x) if x.dim() >= 2 else x.reshape(-1, 1)

    @staticmethod
    def _eigenbasis(stat):
        eye = torch.eye(stat.shape[0], dtype=stat.dtype)
        return torch.linalg.eigh(stat + 1e-30 * eye).eigenvectors.flip(dims=[1])

    @staticmethod
    def _rotate(x, bases, back=False):
        """Q_L^T X Q_R (or Q_L X Q_R^T with back); a missing side is the identity."""
        left, right = bases
        if left is not None:
            x = (left if back else left.mT) @ x
        if right is not None:
            x = x @ (right.mT if back else right)
        return x

    def _sides(self, p, group):
        view = self._view(p)
        preconditioned = p.dim() >= 2 or group["precondition_1d"]
        return [preconditioned and n <= group["max_precondition_dim"] and (side == 0 or p.dim() >= 2)
                for side, n in enumerate(view.shape)]

    def _accumulate(self, state, g, sb):
        gm = self._view(g)
        outers = (gm @ gm.mT, gm.mT @ gm)
        for side, stat in enumerate(state["GG"]):
            if stat is not None:
                state["GG"][side] = stat + (1 - sb) * (outers[side] - stat)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["beta1"], group["beta2"]
            sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else beta2
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    view = self._view(p)
                    state.update(t=1, m=torch.zeros_like(view), v=torch.zeros_like(view),
                                 GG=[torch.zeros(n, n, dtype=p.dtype) if keep else None
                                     for n, keep in zip(view.shape, self._sides(p, group))])
                    self._accumulate(state, g, sb)
                    state["Q"] = [None if stat is None else self._eigenbasis(stat) for stat in state["GG"]]
                    continue
                state["t"] += 1
                s = state["t"] - 1
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1 - beta2 ** s) / (1 - beta1 ** s)
                gm = self._view(g)
                rotated = self._rotate(gm, state["Q"])
                state["m"] = state["m"] + (1 - beta1) * (gm - state["m"])
                state["v"] = state["v"] + (1 - beta2) * (rotated * rotated - state["v"])
                n = self._rotate(self._rotate(state["m"], state["Q"]) / (state["v"].sqrt() + group["eps"]),
                                 state["Q"], back=True)
                if group["normalize_gradient"]:
                    n = n / (n.square().mean().sqrt() + group["eps"])
                p.sub_(step_size * n.reshape(p.shape))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                self._accumulate(state, g, sb)
                if s % group["precondition_frequency"] == 0:
                    self._refresh(state, group["qr_dtype"])

    @staticmethod
    def _refresh(state, qr_dtype):
        for side, (stat, q) in enumerate(zip(state["GG"], state["Q"])):
            if stat is None:
                continue
            power = stat @ q
            estimate = (q * power).sum(dim=0)
            order = torch.argsort(estimate, descending=True)
            state["v"] = state["v"].index_select(side, order)
            state["Q"][side] = torch.linalg.qr(power[:, order].to(qr_dtype)).Q.to(stat.dtype)


# ---------------------------------------------------------------------------------------------
# GaLore


class GaLoreAdam(torch.optim.Optimizer):
    """Adam with GaLore's low-rank gradient projection (Zhao et al. 2024, Algorithm 2), for
    2-D parameters; every other parameter takes the same Adam update unprojected.

    At t = 1 and whenever t % update_proj_gap == 0 (``refresh="pytorch-optimizer"``; the
    authors' code, ``refresh="authors"``, at t = 1, T + 1, 2T + 1, ...: 0-based steps 0, T, 2T),
    the basis is recomputed from the SVD of the current gradient: rows >= cols keeps
    P = Vh[:rank] (rank x cols) and projects R = G P^T; otherwise P = U[:, :rank] and R = P^T G. Adam runs on R (moments of R's shape,
    never reset or rotated when the basis changes): m <- lerp(m, R, 1 - beta1),
    v <- beta2 v + (1 - beta2) R^2, N = m / (sqrt(v) + eps), back-projected (N P or P N) and
    times scale; p -= lr sqrt(1 - beta2^t) / (1 - beta1^t) N, then p *= 1 - lr wd.
    That is pytorch-optimizer's GaLore: eps on the uncorrected root, decay after the update.
    ``eps_on_corrected=True`` instead divides by sqrt(v / (1 - beta2^t)) + eps, as
    torch.optim.Adam (and so galore(adam)) does. pytorch-optimizer computes the SVD in
    float32 unless the gradient already is float32 (``svd_dtype``; None: the gradient's).
    """

    def __init__(self, params, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.0, rank=128,
                 update_proj_gap=50, scale=1.0, svd_dtype=torch.float32, eps_on_corrected=False,
                 refresh="pytorch-optimizer"):
        if refresh not in ("authors", "pytorch-optimizer"):
            raise ValueError(f"refresh is 'authors' or 'pytorch-optimizer', not {refresh!r}")
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                                      rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                                      svd_dtype=svd_dtype, eps_on_corrected=eps_on_corrected, refresh=refresh))

    @staticmethod
    def basis(g, rank, svd_dtype):
        u, _, vh = torch.linalg.svd(g.to(svd_dtype or g.dtype), full_matrices=False)
        wide = g.shape[0] < g.shape[1]
        return (u[:, :rank] if wide else vh[:rank, :]).to(g.dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["beta1"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                state["t"] = t = state.get("t", 0) + 1
                projected = p.dim() == 2
                wide = projected and p.shape[0] < p.shape[1]
                if projected:
                    phase = t - 1 if group["refresh"] == "authors" else t
                    if "P" not in state or phase % group["update_proj_gap"] == 0:
                        state["P"] = self.basis(g, group["rank"], group["svd_dtype"])
                    g = state["P"].mT @ g if wide else g @ state["P"].mT
                if "m" not in state:
                    state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
                state["m"] = state["m"] + (1 - beta1) * (g - state["m"])
                state["v"] = beta2 * state["v"] + (1 - beta2) * g * g
                bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
                if group["eps_on_corrected"]:
                    n = state["m"] / bc1 / ((state["v"] / bc2).sqrt() + group["eps"])
                else:
                    n = math.sqrt(bc2) / bc1 * state["m"] / (state["v"].sqrt() + group["eps"])
                if projected:
                    n = group["scale"] * (state["P"] @ n if wide else n @ state["P"])
                p.sub_(group["lr"] * n)
                p.mul_(1 - group["lr"] * group["weight_decay"])


# ---------------------------------------------------------------------------------------------
# AGC and gradient centralisation (gradient transforms: adaptors over any base)


def unit_norm(x):
    """One L2 norm per output unit (row of the matrix view), broadcastable to x; the whole
    norm for a vector (timm's and pytorch-optimizer's choice; NFNets' own code clips a
    vector elementwise)."""
    if x.dim() <= 1:
        return x.norm()
    return as_matrix(x).norm(dim=1).reshape(x.shape[0], *([1] * (x.dim() - 1)))


def agc_clip(p, g, agc_clip_val=1e-2, agc_eps=1e-3, eps=1e-6):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, Sec. 4): where
    |G_i| / max(|W_i|, agc_eps) > agc_clip_val, G_i <- agc_clip_val max(|W_i|, agc_eps) / |G_i| G_i.
    eps floors |G_i| (pytorch-optimizer's guard; it never changes a clipped row)."""
    max_norm = unit_norm(p).clamp_min(agc_eps) * agc_clip_val
    g_norm = unit_norm(g).clamp_min(eps)
    return torch.where(g_norm > max_norm, g * (max_norm / g_norm), g)


def centralize(g, gc_conv_only=False):
    """Gradient centralisation (Yong et al. 2020, Eq. 1): each output row of the matrix view
    minus its mean; vectors (and, with gc_conv_only, anything below 4-D) unchanged."""
    if g.dim() <= (3 if gc_conv_only else 1):
        return g
    matrix = as_matrix(g)
    return (matrix - matrix.mean(dim=1, keepdim=True)).reshape(g.shape)


# ---------------------------------------------------------------------------------------------
# Schedule-free SGD and AdamW


class _ScheduleFree(torch.optim.Optimizer):
    """Defazio et al. 2024, Algorithm 1, keeping the three sequences apart: the parameters
    hold y (where gradients are taken), the state z (the base SGD/Adam sequence) and x (the
    average, where the model is evaluated).

        y_t = (1 - beta) z_t + beta x_t,     z_{t+1} = z_t - lr_t g_hat,
        x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}

    with lr_t = lr min(1, t / warmup_steps) and c = w_t / sum w, w_t = t^r lr_max^weight_lr_power,
    lr_max the largest lr_t so far (the official code's weighting; the paper's box writes
    lr_t^2, which is the same during warm-up and at a constant rate). Weight decay is coupled
    and evaluated at y, added after the Adam normalisation. Counters and weights are per
    param group, as in pytorch-optimizer. ``averaged(p)`` gives x.
    """

    def _direction(self, group, p, state, t):
        raise NotImplementedError

    def averaged(self, p):
        return self.state[p]["x"]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["t"] = t = group.get("t", 0) + 1
            warmup = group["warmup_steps"]
            lr_t = group["lr"] * (t / warmup if t < warmup else 1.0)
            group["lr_max"] = max(group.get("lr_max", -1.0), lr_t)
            weight = t ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
            group["weight_sum"] = group.get("weight_sum", 0.0) + weight
            c = weight / group["weight_sum"] if group["weight_sum"] != 0 else 0.0
            beta = group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = _lazy_state(self, p, z=p.clone, x=p.clone, v=lambda: torch.zeros_like(p))
                g_hat = self._direction(group, p, state, t) + group["weight_decay"] * p
                state["z"] = state["z"] - lr_t * g_hat
                state["x"] = (1 - c) * state["x"] + c * state["z"]
                p.copy_((1 - beta) * state["z"] + beta * state["x"])


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-free SGD: g_hat = g + wd y; beta is ``momentum``."""

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, r=0.0, weight_lr_power=2.0,
                 warmup_steps=0):
        super().__init__(params, dict(lr=lr, beta=momentum, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, warmup_steps=warmup_steps))

    def _direction(self, group, p, state, t):
        return p.grad


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-free AdamW: v <- beta2 v + (1 - beta2) g^2,
    g_hat = g / (sqrt(v / (1 - beta2^t) + eps_root) + eps) + wd y; beta is beta1.
    eps_root = 1e-15 is pytorch-optimizer's hidden term inside the root; the paper and the
    official code have none (eps_root = 0)."""

    def __init__(self, params, lr=2.5e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, r=0.0,
                 weight_lr_power=2.0, warmup_steps=0, eps=1e-8, eps_root=1e-15):
        super().__init__(params, dict(lr=lr, beta=beta1, beta2=beta2, weight_decay=weight_decay, r=r,
                                      weight_lr_power=weight_lr_power, warmup_steps=warmup_steps,
                                      eps=eps, eps_root=eps_root))

    def _direction(self, group, p, state, t):
        beta2 = group["beta2"]
        state["v"] = beta2 * state["v"] + (1 - beta2) * p.grad * p.grad
        den = (state["v"] / (1 - beta2 ** t) + group["eps_root"]).sqrt() + group["eps"]
        return p.grad / den


# ---------------------------------------------------------------------------------------------
# Prodigy


class Prodigy(torch.optim.Optimizer):
    """Prodigy (Mishchenko & Defazio 2024, Algorithm 3, Adam version), over every parameter
    group at once: one distance estimate d for the whole optimizer.

    With d_lr = d lr / bc (bc = (1 - beta1^k) / sqrt(1 - beta2^k) when bias_correction, else 1):
        num <- beta3 num + (d / d0) d_lr <g, p0 - p>           (summed over all parameters)
        m <- beta1 m + d (1 - beta1) g,   v <- beta2 v + d^2 (1 - beta2) g^2
        s <- beta3 s + (d / d0) (d if safeguard_warmup else d_lr) g,   den = sum |s|
    If den = 0 nothing moves (the moments have been updated). Else d_hat = d_coef num / den;
    d <- max(d, d_hat) while d is still d0; d_max <- max(d_max, d_hat); d <- min(d_max,
    growth_rate d). Then each group decays its own parameters, p *= 1 - wd d_lr (1 - wd with
    fixed_decay), and p -= d_lr m / (sqrt(v) + d_new eps). beta3 None means sqrt(beta2).
    As in pytorch-optimizer, lr, betas, beta3 and bias_correction are read from the first
    group only; weight_decay and fixed_decay are per group.
    """

    def __init__(self, params, lr=1.0, beta1=0.9, beta2=0.999, beta3=None, d0=1e-6, d_coef=1.0,
                 growth_rate=float("inf"), weight_decay=0.0, fixed_decay=False, bias_correction=False,
                 safeguard_warmup=False, eps=1e-8):
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, weight_decay=weight_decay,
                                      fixed_decay=fixed_decay, bias_correction=bias_correction,
                                      safeguard_warmup=safeguard_warmup, eps=eps))
        self.d0, self.d_coef, self.growth_rate = d0, d_coef, growth_rate
        self.d, self.d_max, self.numerator, self.k = d0, d0, 0.0, 0

    @torch.no_grad()
    def step(self):
        first = self.param_groups[0]
        beta1, beta2 = first["beta1"], first["beta2"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        self.k += 1
        bc = (1 - beta1 ** self.k) / math.sqrt(1 - beta2 ** self.k) if first["bias_correction"] else 1.0
        d, d0 = self.d, self.d0
        d_lr = d * first["lr"] / bc
        self.numerator *= beta3
        den = 0.0
        live = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in live:
            g = p.grad
            state = _lazy_state(self, p, p0=p.clone, s=lambda: torch.zeros_like(p),
                                m=lambda: torch.zeros_like(p), v=lambda: torch.zeros_like(p))
            self.numerator += (d / d0) * d_lr * float(torch.dot(g.reshape(-1), (state["p0"] - p).reshape(-1)))
            state["m"] = beta1 * state["m"] + d * (1 - beta1) * g
            state["v"] = beta2 * state["v"] + d * d * (1 - beta2) * g * g
            state["s"] = beta3 * state["s"] + (d / d0) * (d if first["safeguard_warmup"] else d_lr) * g
            den += float(state["s"].abs().sum())
        if den == 0:
            return
        d_hat = self.d_coef * self.numerator / den
        if d == d0:
            d = max(d, d_hat)
        self.d_max = max(self.d_max, d_hat)
        self.d = d = min(self.d_max, d * self.growth_rate)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["weight_decay"] * (1.0 if group["fixed_decay"] else d_lr))
                p.sub_(d_lr * state["m"] / (state["v"].sqrt() + d * group["eps"]))


# ---------------------------------------------------------------------------------------------
# Muon (on matrices) with AdamW (on the rest)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g, steps=5, coefficients=NS_COEFFICIENTS, eps=1e-7, dtype=None, clamp_norm=False):
    """The quintic Newton-Schulz iteration towards U V^T of G = U S V^T: X = G / |G|_F, then
    X <- a X + (b A + c A^2) X with A = X X^T, worked on the wide orientation (rows <= cols).
    The norm is |G| + eps (Keller Jordan's code) or max(|G|, eps) with clamp_norm
    (pytorch-optimizer's). ``dtype`` is the iteration's precision (None: g's)."""
    a, b, c = coefficients
    tall = g.shape[-2] > g.shape[-1]
    x = (g.mT if tall else g).to(dtype or g.dtype)
    norm = x.norm()
    x = x / (norm.clamp_min(eps) if clamp_norm else norm + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    x = x.mT if tall else x
    return x.to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for every parameter with two or more dimensions, AdamW for the rest, as
    pytorch-optimizer's Muon computes its use_muon / AdamW groups.

    Muon: p *= 1 - lr wd; B <- lerp(B, g, 1 - momentum); U = lerp(g, B, momentum) with
    nesterov, else B; O = NewtonSchulz(matrix view of U); p -= lr sqrt(max(1, rows / cols)) O.
    AdamW (adamw_* hyperparameters): p *= 1 - adamw_lr adamw_wd; m <- lerp(m, g, 1 - beta1),
    v <- lerp(v, g^2, 1 - beta2); p -= adamw_lr / (1 - beta1^t) m / (sqrt(v) / sqrt(1 - beta2^t)
    + adamw_eps). ``ns_dtype`` and ``clamp_norm`` choose the iteration's precision and
    normalisation (pytorch-optimizer: bfloat16, clamp).
    """

    def __init__(self, params, lr=2e-2, momentum=0.95, nesterov=True, weight_decay=0.0, ns_steps=5,
                 adamw_lr=3e-4, adamw_beta1=0.9, adamw_beta2=0.95, adamw_wd=0.0, adamw_eps=1e-10,
                 ns_dtype=torch.bfloat16, clamp_norm=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, adamw_lr=adamw_lr, adamw_beta1=adamw_beta1,
                                      adamw_beta2=adamw_beta2, adamw_wd=adamw_wd, adamw_eps=adamw_eps,
                                      ns_dtype=ns_dtype, clamp_norm=clamp_norm))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = _lazy_state(self, p, t=0, buf=lambda: torch.zeros_like(p),
                                    m=lambda: torch.zeros_like(p), v=lambda: torch.zeros_like(p))
                state["t"] += 1
                if p.dim() >= 2:
                    mu = group["momentum"]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    state["buf"] = state["buf"] + (1 - mu) * (g - state["buf"])
                    u = g + mu * (state["buf"] - g) if group["nesterov"] else state["buf"]
                    o = newton_schulz(as_matrix(u), group["ns_steps"], dtype=group["ns_dtype"],
                                      clamp_norm=group["clamp_norm"])
                    scale = max(1.0, p.shape[0] / (p.numel() // p.shape[0])) ** 0.5
                    p.sub_(group["lr"] * scale * o.reshape(p.shape))
                else:
                    b1, b2, t = group["adamw_beta1"], group["adamw_beta2"], state["t"]
                    p.mul_(1 - group["adamw_lr"] * group["adamw_wd"])
                    state["m"] = state["m"] + (1 - b1) * (g - state["m"])
                    state["v"] = state["v"] + (1 - b2) * (g * g - state["v"])
                    den = state["v"].sqrt() / math.sqrt(1 - b2 ** t) + group["adamw_eps"]
                    p.sub_(group["adamw_lr"] / (1 - b1 ** t) * state["m"] / den)
