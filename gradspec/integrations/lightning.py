"""Probe specs in Lightning's automatic optimization.

In automatic optimization Lightning hands the optimizer a closure that runs ``training_step``
on the last micro-batch, calls backward and clips; a spec with probes (``deo(adam)``,
``sophia``, ``sophia_g``, ``bulk_dom(...)``) would clear the gradients the earlier micro-batches
accumulated, and refuses a closure that calls backward where it differentiates the gradient.
The mixin :class:`ProbeSteps` records each micro-batch and gives the step a closure that
replays them (:mod:`gradspec.integrations.replay`), so ``accumulate_grad_batches`` and
``gradient_clip_val`` apply to probe specs as to any other:

    from gradspec.integrations.lightning import ProbeSteps
    class Model(ProbeSteps, L.LightningModule): ...

``training_step`` is called again for each replay, with ``self.log`` silenced; for
``sophia_g`` it returns ``{"loss": loss, "logits": logits}``. Plain specs, and manual
optimization (call ``opt.step(closure)`` yourself), need nothing: the mixin then does nothing.
Refused with probe specs, before the first step: ``gradient_clip_algorithm="value"`` (clipping
by value is not a scaling of the loss the probes could evaluate), ``precision="16-mixed"``
(its GradScaler scales the gradients the replays would not), and more than one process.
"""
from __future__ import annotations

from .replay import MicroBatch, ProbeStepper, RngState, gradspec_optimizer

LOGITS_HINT = ("sophia_g samples labels from the model's logits: return {'loss': loss, 'logits': logits} "
               "from training_step, the logits of the batch the loss was computed on")


class ProbeSteps:
    """Mixin for a LightningModule (put it first: ``class Model(ProbeSteps, L.LightningModule)``);
    if you override ``on_train_batch_start``, ``on_train_batch_end``,
    ``configure_gradient_clipping`` or ``log``, call ``super()``."""

    _gradspec_steppers = ()
    _gradspec_replaying = False

    def on_train_start(self) -> None:
        super().on_train_start()
        self._gradspec_release()
        if not self.automatic_optimization:
            return
        probing = [opt for opt in map(gradspec_optimizer, self.trainer.optimizers) if opt is not None and opt.has_probes]
        for optimizer in probing:
            self._gradspec_refuse(optimizer)
        self._gradspec_steppers = tuple(ProbeStepper(opt, LOGITS_HINT) for opt in probing)

    def on_train_end(self) -> None:
        self._gradspec_release()
        super().on_train_end()

    def on_train_batch_start(self, batch, batch_idx):
        answer = super().on_train_batch_start(batch, batch_idx)
        for stepper in self._gradspec_steppers:
            stepper.record(MicroBatch(lambda want_logits: self._gradspec_rerun(batch, batch_idx), RngState.capture()))
        return answer

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        for stepper in self._gradspec_steppers:  # a micro-batch before the last: its loss, for specs that read it
            if stepper.batches and stepper.batches[-1].loss is None and loss is not None:
                stepper.batches[-1].loss = loss.detach()
        super().on_train_batch_end(outputs, batch, batch_idx)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        stepper = next((s for s in self._gradspec_steppers if s.optimizer is gradspec_optimizer(optimizer)), None)
        if stepper is not None and gradient_clip_val:
            stepper.before_clipping()
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def log(self, *args, **kwargs) -> None:
        if not self._gradspec_replaying:
            super().log(*args, **kwargs)

    def log_dict(self, *args, **kwargs) -> None:
        if not self._gradspec_replaying:
            super().log_dict(*args, **kwargs)

    # ---- internals
    def _gradspec_refuse(self, optimizer) -> None:
        trainer = self.trainer
        name = optimizer.spec.name
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value":  # a str enum
            raise ValueError(f"{name} probes the model inside its step, which gradient_clip_algorithm='value' cannot "
                             "combine with: clipping by value is no rescaling of the loss, so the probes could not "
                             "see the gradient the step uses. Clip by norm (the default), or use a spec without probes")
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(f"{name} probes the model inside its step, which precision='16-mixed' cannot combine "
                             "with: its GradScaler scales the loss of Lightning's backward passes, not the probes' "
                             "own evaluations. Use precision='bf16-mixed', or a spec without probes")
        if trainer.world_size > 1:
            raise NotImplementedError(f"{name} probes the model; in Lightning's automatic optimization that runs on "
                                      f"one process for now (the probes' gradients would not be averaged over the "
                                      f"{trainer.world_size} processes): use manual optimization")

    def _gradspec_rerun(self, batch, batch_idx) -> tuple:
        """The micro-batch's loss as Lightning backpropagated it (training_step in the precision's
        context, divided by accumulate_grad_batches), and the logits training_step returned."""
        self._gradspec_replaying = True
        try:
            with self.trainer.precision_plugin.train_step_context():
                out = self.training_step(batch, batch_idx)
        finally:
            self._gradspec_replaying = False
        loss, logits = (out.get("loss"), out.get("logits")) if isinstance(out, dict) else (out, None)
        return loss / self.trainer.accumulate_grad_batches, logits

    def _gradspec_release(self) -> None:
        for stepper in self._gradspec_steppers:
            stepper.remove()
        self._gradspec_steppers = ()
