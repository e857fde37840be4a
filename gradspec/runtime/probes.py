"""The closure driver: every model evaluation a probe needs, with the autograd plumbing.

Users pass ``step(closure)``. The closure computes the loss on the current batch and returns
it, or ``(loss, logits)`` for ``gauss_newton()``; it may call ``loss.backward()`` itself (as
torch.optim closures do) unless the step takes exact Hessian-vector products or samples
labels, which need the graph: then the driver differentiates the returned loss with
``create_graph=True``, takes its products, and drops the graph when the step ends. Users
never call ``backward(create_graph=True)``, and no gradient holds a graph after ``step()``
(the memory leak of AdaHessian and Sophia-H users elsewhere).

Probe evaluations must not disturb the step's own gradients, which the optimizer keeps in
its flat buffers: during a probe every ``p.grad`` is ``None``, and parameters are displaced
by pointing ``p.data`` at a displaced copy, never by writing into the parameters, so the
saved graph of the step's gradient stays valid.

Under DDP the driver averages every gradient it computes itself over ``group`` (DDP's hooks
only see ``backward()``), so each process probes the full batch's loss. Under FSDP2 the
gradients come from ``backward()``, which reduce-scatters them; a displacement is written
into the local shards (FSDP2 all-gathers from its own storage) and written back after.
Labels for Sophia-G are sampled by inverse CDF from uniforms drawn for the whole batch,
the ranks' batches concatenated in rank order, so every layout samples alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import distributed
from .distributed import local
from .lanczos import lanczos


class Evaluations:
    """Counts of model evaluations since the optimizer was made: ``closure_calls`` (forward
    passes), ``gradients`` (backward passes, the step's own included) and ``hvps``
    (double-backward Hessian-vector products).

    ``as_dict()`` and ``load()`` carry the counts through a checkpoint, so a resumed run keeps
    counting where it stopped instead of restarting at zero."""

    FIELDS = ("closure_calls", "gradients", "hvps")

    def __init__(self):
        self.closure_calls = 0
        self.gradients = 0
        self.hvps = 0

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    def load(self, counts: dict) -> None:
        """Take the counts of ``as_dict()``. The whole dict is checked first (exactly the three
        names, each a whole number >= 0, bools refused): a ValueError or TypeError names the
        bad entry, and nothing changes."""
        if not isinstance(counts, dict):
            raise TypeError(f"evaluation counts are a dict as as_dict() gives, not {type(counts).__name__}")
        missing, unknown = set(self.FIELDS) - set(counts), set(counts) - set(self.FIELDS)
        if missing or unknown:
            raise ValueError("evaluation counts must have exactly " + ", ".join(self.FIELDS)
                             + (f"; missing {', '.join(sorted(missing))}" if missing else "")
                             + (f"; unknown {', '.join(sorted(map(str, unknown)))}" if unknown else ""))
        values = {}
        for name in self.FIELDS:
            value = counts[name]
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"evaluation count {name} must be a whole number, got {value!r}")
            if value < 0:
                raise ValueError(f"evaluation count {name} must be >= 0, got {value}")
            values[name] = value
        for name, value in values.items():
            setattr(self, name, value)

    def __eq__(self, other) -> bool:
        return isinstance(other, Evaluations) and self.as_dict() == other.as_dict()

    __hash__ = None  # mutable counts

    def __repr__(self) -> str:
        return f"Evaluations({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"


class ClosureDriver:
    """One step's evaluations. ``needs_graph``: keep the gradient's graph for exact HVPs;
    ``needs_logits``: the closure must return (loss, logits) for label sampling."""

    def __init__(self, closure, params: list, generator: torch.Generator, counts: Evaluations,
                 needs_graph: bool, needs_logits: bool, who: str, group=None, batch_group=None,
                 sharded: bool = False):
        self.closure = closure
        self.params = params
        self.generator = generator
        self.counts = counts
        self.needs_graph = needs_graph
        self.needs_logits = needs_logits
        self.who = who
        self.group = group  # DDP: average the gradients computed here over it
        self.batch_group = batch_group  # the processes whose batches make the step's batch
        self.sharded = sharded  # FSDP2: gradients through backward(), displacements in place
        self._graph_grads = None  # the step's gradient, differentiable, while the step runs
        self._logits = None
        self._sampled = None

    @classmethod
    def draws_only(cls, generator: torch.Generator, counts: Evaluations, who: str) -> "ClosureDriver":
        """A driver for the one probe that evaluates nothing, ``randn()`` in ``every k { }``:
        it draws from ``generator`` and has no closure to call."""
        return cls(None, [], generator, counts, needs_graph=False, needs_logits=False, who=who)

    # ---- the step's own gradient
    def step_gradient(self):
        """Call the closure at the current parameters and leave the gradient in ``p.grad``
        (detached); returns the loss."""
        for p in self.params:
            p.grad = None
        loss, logits = self._call()
        if self.needs_logits:
            if logits is None:
                raise RuntimeError(f"{self.who} samples labels (gauss_newton): its closure must return "
                                   "(loss, logits), the logits of the batch the loss was computed on")
            self._logits = logits
        if any(p.grad is not None for p in self.params):
            if self.needs_graph or self.needs_logits:
                raise RuntimeError(f"{self.who} differentiates the gradient at this step (exact Hessian-vector "
                                   "products or sampled labels): its closure must return the loss without "
                                   "calling backward(); gradspec computes the gradient itself")
            return loss
        if self.sharded:
            self._backward(loss)
            return loss.detach()
        keep = self.needs_graph or self.needs_logits
        grads = self._grad(loss, create_graph=self.needs_graph, retain_graph=keep)
        if self.needs_graph:
            self._graph_grads = grads
        for p, g in zip(self.params, self._averaged(grads)):  # a parameter the loss does not use keeps no gradient
            p.grad = None if g is None else g.detach()
        return loss.detach()

    # ---- probe primitives: per parameter lists in, per parameter lists out
    def gradient_at(self, params: list, displaced: list) -> list:
        """The gradient of the loss with ``params`` moved to ``displaced`` (one closure call)."""
        saved_grads = [p.grad for p in self.params]
        originals = [local(p.data).clone() if self.sharded else p.data for p in params]
        for p in self.params:
            p.grad = None
        try:
            for p, x in zip(params, displaced):
                if self.sharded:
                    local(p.data).copy_(x)
                else:
                    p.data = x
            loss, _ = self._call()
            if all(p.grad is None for p in self.params):
                if self.sharded:
                    self._backward(loss)
                else:
                    grads = {id(q): g for q, g in zip(self.params, self._averaged(
                        self._grad(loss, create_graph=False, retain_graph=False)))}
                    return [torch.zeros_like(p) if grads[id(p)] is None else grads[id(p)].detach() for p in params]
            return [local(p.grad) if p.grad is not None else torch.zeros_like(local(p)) for p in params]
        finally:
            for p, original in zip(params, originals):
                if self.sharded:
                    local(p.data).copy_(original)
                else:
                    p.data = original
            for p, g in zip(self.params, saved_grads):
                p.grad = g

    def hvp(self, params: list, vectors: list) -> list:
        """H v at the current parameters, restricted to ``params`` (v is 0 elsewhere)."""
        if self._graph_grads is None:
            raise RuntimeError("internal: hvp without the gradient's graph")  # pragma: no cover
        index = {id(p): i for i, p in enumerate(self.params)}
        # a gradient without a graph (a parameter the loss is linear in, or does not use)
        # contributes nothing to H v
        pairs = [(self._graph_grads[index[id(p)]], v) for p, v in zip(params, vectors)]
        pairs = [(g, v) for g, v in pairs if g is not None and g.requires_grad]
        self.counts.hvps += 1
        if not pairs:
            return [torch.zeros_like(p) for p in params]
        products = torch.autograd.grad([g for g, _ in pairs], params, grad_outputs=[v for _, v in pairs],
                                       retain_graph=True, allow_unused=True)
        return self._averaged([torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, products)])

    def gauss_newton(self, params: list) -> list:
        """B * grad(L^)^2, L^ the mean cross-entropy against labels sampled from the model's
        own softmax and B the batch's rows over all processes (Sophia-G's Gauss-Newton-
        Bartlett estimator); one backward per step, shared by every group. Under FSDP2 the
        closure runs again for it (FSDP2 backpropagates a graph once): same parameters, same
        logits, same labels."""
        if self._sampled is None:
            saved_grads = [p.grad for p in self.params]
            try:
                grads, rows = self._sampled_gradient()
            finally:
                for p, g in zip(self.params, saved_grads):
                    p.grad = g
            self._sampled = {}
            for p, g in zip(self.params, grads):
                g = None if g is None else local(g).detach()
                self._sampled[id(p)] = torch.zeros_like(local(p)) if g is None else rows * g * g
        return [self._sampled[id(p)] for p in params]

    def _sampled_gradient(self) -> tuple[list, int]:
        """The gradient of the mean cross-entropy against sampled labels, and the batch's rows."""
        logits = self._logits
        if self.sharded:
            for p in self.params:
                p.grad = None
            _, logits = self._call()
        with torch.enable_grad():  # the reshape too: a view made under no_grad cuts the graph
            logits = logits.reshape(-1, logits.shape[-1])
            labels, rows = self._sample_labels(logits.detach())
            sampled = F.cross_entropy(logits, labels)
        if self.sharded:
            self._backward(sampled)
            grads = [p.grad for p in self.params]
        else:
            grads = self._averaged(self._grad(sampled, create_graph=False, retain_graph=self.needs_graph))
        return grads, rows

    def _sample_labels(self, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
        """One label per row from softmax(logits), by inverse CDF of a uniform drawn for
        every row of the whole batch (this process's rows follow those of lower ranks); and
        the whole batch's rows."""
        before, rows = distributed.batch_offset(logits.shape[0], self.batch_group, logits.device)
        uniforms = torch.rand(rows, generator=self.generator, dtype=torch.float64, device=self.generator.device)
        uniforms = uniforms[before:before + logits.shape[0]].to(logits.device)
        cumulative = torch.softmax(logits.double(), dim=-1).cumsum(dim=-1)
        labels = torch.searchsorted(cumulative, uniforms.unsqueeze(-1), right=True).reshape(-1)
        return labels.clamp(max=logits.shape[-1] - 1), rows

    def eigenvectors(self, params: list, k: int, iters: int, dtype, negate: bool = False) -> list:
        """The top-k Hessian eigenvectors over ``params`` (Lanczos from a random start); each
        (k, *p.shape). ``negate``: of -H, the Hessian of -loss (a maximising group)."""
        start = [torch.randn(p.shape, generator=self.generator, dtype=dtype,
                             device=self.generator.device).to(p.device) for p in params]
        def product(v: list) -> list:
            hv = self.hvp(params, [x.to(p.dtype) for x, p in zip(v, params)])
            return [-h for h in hv] if negate else hv

        _, vectors = lanczos(product, start, k, iters)
        return [v.reshape(k, *p.shape) for v, p in zip(vectors, params)]

    def release(self) -> None:
        """Drop the graph and the logits, so nothing from this step outlives it."""
        self._graph_grads = self._logits = self._sampled = None

    # ---- internals
    def _call(self):
        self.counts.closure_calls += 1
        with torch.enable_grad():
            out = self.closure()
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise RuntimeError(f"{self.who}'s closure must return the loss or (loss, logits), "
                                   f"got {len(out)} values")
            loss, logits = out
        else:
            loss, logits = out, None
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError(f"{self.who}'s closure must return the loss as a tensor, got {type(loss).__name__}")
        if any(p.grad is not None for p in self.params):
            self.counts.gradients += 1
        return loss, logits

    def _averaged(self, grads: list) -> list:
        """DDP: the mean over the processes of gradients computed here (None stays None)."""
        present = [g for g in grads if g is not None]
        if self.group is None or not present:
            return grads
        means = iter(distributed.average([g.detach() for g in present], self.group))
        return [None if g is None else next(means) for g in grads]

    def _backward(self, loss) -> None:
        """FSDP2: the gradient into ``p.grad`` by backward(), which reduce-scatters it."""
        if not loss.requires_grad:
            raise RuntimeError(f"{self.who}: the closure's loss does not depend on the parameters "
                               "(was it computed under torch.no_grad()?)")
        self.counts.gradients += 1
        loss.backward()

    def _grad(self, loss, create_graph: bool, retain_graph: bool) -> list:
        if not loss.requires_grad:
            raise RuntimeError(f"{self.who}: the closure's loss does not depend on the parameters "
                               "(was it computed under torch.no_grad()?)")
        self.counts.gradients += 1
        grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, retain_graph=retain_graph,
                                    allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError(f"{self.who}: the closure's loss does not depend on any parameter of the optimizer")
        return list(grads)  # None where the loss does not use a parameter
