"""Probe specs in the Hugging Face Trainer.

The Trainer runs forward and backward on each micro-batch, clips the accumulated gradient,
and calls ``optimizer.step()`` without a closure, which a spec with probes (``deo(adam)``,
``sophia``, ``sophia_g``, ``bulk_dom(...)``) needs. :class:`GradspecTrainer` (or the mixin
:class:`ProbeSteps` on your own Trainer subclass) records each micro-batch and gives the step
a closure that replays them (:mod:`gradspec.integrations.replay`), so the Trainer's
``gradient_accumulation_steps`` and ``max_grad_norm`` apply to probe specs as to any other:

    from gradspec.integrations.transformers import GradspecTrainer
    trainer = GradspecTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))

Plain specs need no integration (``transformers.Trainer`` steps them as it steps AdamW); with
them these classes behave exactly as ``transformers.Trainer``. Refused with probe specs, before
the first step: ``fp16=True`` (its GradScaler scales the gradients the replays would not) and
more than one process (the replays' gradients are not averaged over processes).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import transformers

from .replay import MicroBatch, ProbeStepper, RngState, gradspec_optimizer

LOGITS_HINT = ("sophia_g samples labels from the model's logits: the model's output must have 'logits' "
               "(every transformers model for causal or masked LM and classification does), or override "
               "compute_loss to return (loss, outputs) with outputs['logits'] when return_outputs=True")


class ProbeSteps:
    """Mixin for ``transformers.Trainer`` and its subclasses (put it first:
    ``class MyTrainer(ProbeSteps, SFTTrainer)``): probe specs step inside the Trainer's loop."""

    _gradspec_stepper = None
    _gradspec_replaying = False
    _gradspec_logits = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        stepper = self._gradspec_probe_stepper()
        if stepper is None or self._gradspec_replaying:
            return super().training_step(model, inputs, num_items_in_batch)
        kept = copy.copy(inputs) if isinstance(inputs, Mapping) else inputs  # compute_loss may pop "labels"
        rng = RngState.capture()
        loss = super().training_step(model, inputs, num_items_in_batch)
        stepper.record(MicroBatch(lambda want_logits: self._gradspec_rerun(model, kept, num_items_in_batch, want_logits),
                                  rng, loss.detach()))
        if self.accelerator.sync_gradients and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            stepper.before_clipping()  # the Trainer clips next, then steps
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._gradspec_logits is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._gradspec_logits.append(_logits_of(outputs))
        return (loss, outputs) if return_outputs else loss

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._gradspec_stepper is not None:
                self._gradspec_stepper.remove()
                self._gradspec_stepper = None

    # ---- internals
    def _gradspec_probe_stepper(self) -> ProbeStepper | None:
        """The stepper of the Trainer's gradspec optimizer if its spec has probes (made on the
        first training step, after the Trainer has built and wrapped the optimizer), else None."""
        optimizer = gradspec_optimizer(self.optimizer)
        if optimizer is None or not optimizer.has_probes:
            return None
        stepper = self._gradspec_stepper
        if stepper is not None and stepper.optimizer is optimizer:
            return stepper
        if stepper is not None:
            stepper.remove()
        if getattr(self.accelerator, "scaler", None) is not None:
            raise ValueError(f"{optimizer.spec.name} probes the model inside its step, which fp16=True cannot "
                             "combine with: its GradScaler scales the loss of the Trainer's backward passes, not "
                             "the probes' own evaluations. Use bf16=True, or a spec without probes")
        if self.accelerator.num_processes > 1:
            raise NotImplementedError(f"{optimizer.spec.name} probes the model; in the Trainer that runs on one "
                                      "process for now (the probes' gradients would not be averaged over the "
                                      f"{self.accelerator.num_processes} processes)")
        self._gradspec_stepper = ProbeStepper(optimizer, LOGITS_HINT)
        return self._gradspec_stepper

    def _gradspec_rerun(self, model, inputs, num_items_in_batch, want_logits: bool) -> tuple:
        """The micro-batch's loss as the Trainer's training_step backpropagates it (its loss
        context, its division for accumulation), with the graph, and the logits if wanted:
        training_step runs with the accelerator's backward swapped for one that keeps the loss."""
        accelerator = self.accelerator
        kept = []
        own = accelerator.__dict__.get("backward")
        accelerator.backward = lambda loss, **_: kept.append(loss / accelerator.gradient_accumulation_steps)
        self._gradspec_replaying = True
        self._gradspec_logits = [] if want_logits else None
        try:
            super().training_step(model, copy.copy(inputs) if isinstance(inputs, Mapping) else inputs,
                                  num_items_in_batch)
            logits = self._gradspec_logits[-1] if self._gradspec_logits else None
        finally:
            self._gradspec_replaying = False
            self._gradspec_logits = None
            if own is None:
                del accelerator.backward
            else:
                accelerator.backward = own
        if len(kept) != 1:
            raise RuntimeError(f"gradspec: training_step called backward {len(kept)} times on one micro-batch; "
                               "a probe spec's replay needs exactly one loss per micro-batch")
        return kept[0], logits


class GradspecTrainer(ProbeSteps, transformers.Trainer):
    """``transformers.Trainer`` that also steps specs with probes (see :class:`ProbeSteps`)."""


def _logits_of(outputs):
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    if isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        return outputs[1]  # (loss, logits, ...) as models return without return_dict
    return None
