"""Probe steps inside trainers that run forward and backward themselves.

A spec with probes steps with ``step(closure)``: the closure gives the step's gradient and
evaluates the model again where a probe asks (a gradient at a displaced point, the graph of
the gradient for Hessian-vector products, logits for sampled labels). Trainers instead
accumulate gradients over micro-batches, clip them, then call ``step()`` (HF Trainer) or
``step(closure)`` with a closure that runs backward on the last micro-batch and clips
(Lightning). Handing the trainer's closure to gradspec would lose the micro-batches before
the last, and the clipping of the probes' gradients; running the step outside the trainer
would lose both for the step too.

So a trainer integration records each micro-batch of the step in progress (a function that
recomputes its loss, and the random-number state its forward pass started from, so dropout
draws the same masks), and a step pre-hook on the optimizer hands ``step`` a
:class:`StepReplay` closure:

- its first call is the step's own gradient: the trainer's, accumulated and clipped, put back
  into ``p.grad`` (no model evaluation); on a step where a due probe differentiates that
  gradient (``hvp``, ``hessian_eigvecs``) or samples labels from its logits
  (``gauss_newton``), the micro-batches' losses are recomputed with their graph instead;
- every later call (a probe) recomputes the losses of all the step's micro-batches at the
  parameters the probe set, so a probe sees the same batch as the step's gradient.

Clipping by norm multiplies the gradient by s = min(1, max_norm / |g|); every recomputed loss
is multiplied by the same s, which makes the clipped gradient the gradient of the loss the
optimizer sees (s L with s held fixed) and keeps a probe's gradient difference, Hessian
product or estimate on the step gradient's scale. Clipping by value has no such loss, and
loss scaling for float16 (a GradScaler) scales gradients the recomputations would not: the
integrations refuse both with probe specs, naming the setting.

Which probes are due comes from the language's rule (a block ``probe every k`` runs at steps
t = 1, k + 1, 2k + 1, ...) and the calls :func:`gradspec.compiler.cost.step_cost` reads off the
spec, the same figures ``gradspec show --cost`` prints. ``opt.evaluations`` then counts what
the spec declares: a closure call is one replay of the whole accumulated batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..compiler.cost import step_cost
from ..runtime.optimizer import Optimizer

DIFFERENTIATE_GRADIENT = frozenset({"hvp", "hessian_eigvecs"})
SAMPLE_LABELS = "gauss_newton"


@dataclass(frozen=True)
class RngState:
    """The global random-number state (CPU and every initialised CUDA device) a forward pass
    started from, so that a recomputation draws the same dropout masks."""

    cpu: torch.Tensor
    cuda: tuple

    @classmethod
    def capture(cls) -> RngState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else ()
        return cls(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def restored(self):
        """Run with this state; the state from before comes back afterwards, so training's own
        random stream does not depend on how many probes ran."""
        with torch.random.fork_rng(devices=list(range(len(self.cuda)))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield


@dataclass
class MicroBatch:
    """One micro-batch of the step in progress. ``rerun(want_logits)`` recomputes its loss as
    the trainer backpropagated it (divided for accumulation), with its graph, and returns
    (loss, logits or None); ``loss`` is the trainer's own value, detached, once known."""

    rerun: Callable[[bool], tuple]
    rng: RngState
    loss: torch.Tensor | None = None


def gradient_norm(params: list) -> torch.Tensor:
    """The 2-norm of the parameters' gradients, all together, in float32 or wider."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.promote_types(p.grad.dtype, torch.float32))
             for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


@dataclass
class StepReplay:
    """The closure a probe spec's step gets inside a trainer (see the module's docstring):
    ``grads`` are the trainer's, ``scale`` the clipping's factor, ``recompute_first`` whether the
    step's own gradient must come with its graph (and ``wants_logits``, with logits)."""

    params: list
    grads: list
    batches: list
    scale: float
    recompute_first: bool
    wants_logits: bool
    step_loss: object
    logits_hint: str
    _first: bool = True

    def __call__(self):
        first, self._first = self._first, False
        if first and not self.recompute_first:
            for p, g in zip(self.params, self.grads):
                p.grad = g
            return self.step_loss
        if first:  # the driver differentiates this loss itself, keeping the graph
            losses, logits = zip(*(self._rerun(batch, self.wants_logits) for batch in self.batches))
            loss = torch.stack([l.reshape(()) for l in losses]).sum()
            if not self.wants_logits:
                return loss
            if any(l is None for l in logits):
                raise RuntimeError(self.logits_hint)
            return loss, torch.cat([l.reshape(-1, l.shape[-1]) for l in logits])
        return self._probe_gradient()

    def _probe_gradient(self) -> torch.Tensor:
        """The gradient at the parameters a probe set, over every micro-batch, into ``p.grad``
        one micro-batch at a time (one graph alive at once, as in the trainer's own pass)."""
        total, grads = torch.zeros(()), [None] * len(self.params)
        for batch in self.batches:
            loss, _ = self._rerun(batch, False)
            parts = torch.autograd.grad(loss, self.params, allow_unused=True)
            grads = [g if part is None else part if g is None else g + part for g, part in zip(grads, parts)]
            total = total + loss.detach().reshape(()).to(total.device)
        for p, g in zip(self.params, grads):
            p.grad = g
        return total

    def _rerun(self, batch: MicroBatch, want_logits: bool) -> tuple:
        with batch.rng.restored():
            loss, logits = batch.rerun(want_logits)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise RuntimeError("gradspec: a micro-batch's recomputed loss does not depend on the parameters "
                               "(was it computed under torch.no_grad()?)")
        return loss * self.scale if self.scale != 1.0 else loss, logits


class ProbeStepper:
    """What a trainer integration keeps for one gradspec optimizer with probes: a step pre-hook
    that supplies :class:`StepReplay`, the micro-batches recorded since the last step, and the
    gradient's norm before the trainer clipped it. ``logits_hint`` is the error a sampled-labels
    probe raises when the recomputation gives no logits (it says how, for that trainer)."""

    def __init__(self, optimizer: Optimizer, logits_hint: str):
        self.optimizer = optimizer
        self.logits_hint = logits_hint
        self.batches: list = []
        self.norm_before_clipping = None
        self._blocks = {}  # group values -> [(every, calls)]
        self._handle = optimizer.register_step_pre_hook(self._supply_closure)

    def record(self, batch: MicroBatch) -> None:
        self.batches.append(batch)

    def before_clipping(self) -> None:
        """Call right before the trainer clips: the norm it is about to clip."""
        self.norm_before_clipping = gradient_norm(self._params())

    def remove(self) -> None:
        self._handle.remove()
        self.batches, self.norm_before_clipping = [], None

    def due_calls(self) -> frozenset:
        """The probe calls (``grad_at``, ``hvp``, ...) the optimizer's next step runs, over groups."""
        due = set()
        for group in self.optimizer.param_groups:
            values = {name: _plain(group[name]) for name in self.optimizer.spec.hypers if name in group}
            key = tuple(sorted(values.items()))
            if key not in self._blocks:
                self._blocks[key] = [(block.every, frozenset(call for call, *_ in block.calls))
                                     for block in step_cost(self.optimizer.spec, values).probes]
            done = _steps_taken(self.optimizer, group)
            for every, calls in self._blocks[key]:
                if done % every == 0:
                    due |= calls
        return frozenset(due)

    def _params(self) -> list:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def _supply_closure(self, optimizer, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        closure = kwargs.pop("closure", None)
        if len(args) > 1:
            closure = args[1]
        if isinstance(closure, StepReplay):
            return None
        batches, self.batches = self.batches, []
        step_loss = closure() if closure is not None else None  # Lightning: last backward and clipping
        if not batches:
            raise RuntimeError(f"{optimizer.spec.name} probes the model, and no micro-batch was recorded for this "
                               "step: the trainer integration records them in its training-step hooks (a subclass "
                               "overriding training_step or on_train_batch_start must call super())")
        if batches[-1].loss is None and step_loss is not None:
            batches[-1].loss = torch.as_tensor(step_loss).detach()
        params = self._params()
        scale = 1.0
        if self.norm_before_clipping is not None:
            before, after = float(self.norm_before_clipping), float(gradient_norm(params))
            self.norm_before_clipping = None
            if before > 0 and after < before:
                scale = after / before
        losses = [b.loss for b in batches]
        if all(loss is not None for loss in losses):
            step_loss = scale * torch.stack([torch.as_tensor(loss).reshape(()).float() for loss in losses]).sum()
        due = self.due_calls()
        replay = StepReplay(params, [p.grad for p in params], batches, scale,
                            recompute_first=bool(due & (DIFFERENTIATE_GRADIENT | {SAMPLE_LABELS})),
                            wants_logits=SAMPLE_LABELS in due, step_loss=step_loss, logits_hint=self.logits_hint)
        return (args[0], replay, *args[2:]), kwargs


def gradspec_optimizer(optimizer) -> Optimizer | None:
    """The gradspec Optimizer inside a trainer's wrappers (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer), or None."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, Optimizer) and seen < 8:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, Optimizer) else None


def _steps_taken(optimizer: Optimizer, group: dict) -> int:
    for p in group["params"]:
        step = optimizer.state.get(p, {}).get("step")
        if step is not None:
            return int(step.item() if isinstance(step, torch.Tensor) else step)
    return 0


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
