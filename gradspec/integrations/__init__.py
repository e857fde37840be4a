"""Trainer integrations, imported on demand (each needs its trainer installed: the
``integrations`` extra).

Plain specs need none of this: a ``gradspec.Optimizer`` is a ``torch.optim.Optimizer`` and
steps inside the HF Trainer, Lightning, accelerate and torch.amp like any other. Specs with
probes (``deo``, ``sophia``, ``sophia_g``, ``bulk_dom``) evaluate the model inside their step,
and trainers call ``optimizer.step()`` after running forward and backward themselves; the
modules here give such a step its closure, replaying the step's micro-batches:

    from gradspec.integrations.transformers import GradspecTrainer   # HF Trainer
    from gradspec.integrations.lightning import ProbeSteps           # LightningModule mixin

See docs/integrations.md; :mod:`gradspec.integrations.replay` holds the trainer-agnostic part.
"""
