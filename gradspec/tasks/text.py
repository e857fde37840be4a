"""Byte-level language models on the Python standard library's own source code.

The installed standard library is tens of MB of real, varied text (1,790 files and 31.5 MB
on CPython 3.11) that every machine running gradspec already has, so these tasks train a
GPT at a scale where optimizer differences (loss spikes, sharpness) can show, with nothing
downloaded. Files, not windows, are split: a file goes to test or validation by a hash of
its path inside the library (1 in 20 each), so the held-out text is code the model has never
seen a line of, and the split does not move when another Python version adds files.

``stdlib_lm`` is the full model (about 10.8M parameters, context 256: a GPU task,
``--device cuda``); ``stdlib_lm_small`` the same recipe at 0.8M parameters and context 128,
which trains a few hundred steps on a 2-core CPU in minutes.
"""
from __future__ import annotations

import functools
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass

from . import Problem, module_losses, register

# torch is imported inside the functions that build a problem: declaring the tasks (gradspec
# list) imports none of it.

HELD_OUT_EVERY = 20  # one file in 20 is test, one in 20 validation


@dataclass(frozen=True)
class Corpus:
    """The library's source as bytes, split by file."""

    train: bytes
    validation: bytes
    test: bytes
    files: int


@functools.cache
def stdlib_corpus() -> Corpus:
    """Every ``.py`` file of the installed standard library (not site-packages), read once per
    process, in path order, each file's bytes followed by a NUL separator."""
    root = sysconfig.get_paths()["stdlib"]
    parts: dict = {"train": [], "validation": [], "test": []}
    files = 0
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            bucket = zlib.crc32(relative.encode()) % HELD_OUT_EVERY
            split = "test" if bucket == 0 else "validation" if bucket == 1 else "train"
            try:
                with open(path, "rb") as f:
                    parts[split].append(f.read() + b"\0")
            except OSError:
                continue  # an unreadable file is left out, as if absent
            files += 1
    if not parts["train"] or not parts["validation"] or not parts["test"]:
        raise RuntimeError(f"the standard library at {root} has too few .py files for a train/validation/test split")
    return Corpus(*(b"".join(parts[k]) for k in ("train", "validation", "test")), files=files)


@dataclass(frozen=True)
class GPTSize:
    width: int
    layers: int
    heads: int
    context: int
    batch: int


def _byte_lm(seed: int, device: str, size: GPTSize) -> Problem:
    import torch
    import torch.nn.functional as F

    from .learning import _batch_indices
    from .models import TinyTransformer
    corpus = stdlib_corpus()
    train, validation, test = (torch.frombuffer(bytearray(b), dtype=torch.uint8)
                               for b in (corpus.train, corpus.validation, corpus.test))
    context = size.context
    torch.manual_seed(seed)
    model = TinyTransformer(256, context, width=size.width, layers=size.layers, heads=size.heads).to(device)

    def windows(source, starts):
        rows = torch.stack([source[s:s + context + 1] for s in starts.tolist()]).long().to(device)
        return rows[:, :-1], rows[:, 1:]

    def next_bytes(logits, targets):
        return F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))

    loss, pure = module_losses(
        model, lambda step: windows(train, _batch_indices(seed, step, len(train) - context - 1, size.batch)),
        next_bytes)
    fixed_starts = {name: torch.linspace(0, len(source) - context - 2, 32).long()
                    for name, source in (("validation", validation), ("test", test))}

    @torch.no_grad()
    def held_out(source, name):
        inputs, targets = windows(source, fixed_starts[name])
        return float(next_bytes(model(inputs), targets))

    def evaluate():
        value = held_out(test, "test")
        return {"eval_loss": value, "bits_per_byte": value / math.log(2)}

    sharpness_batch = windows(train, torch.arange(8) * (len(train) // 8))
    return Problem(list(model.parameters()), loss, evaluate, lambda: held_out(validation, "validation"),
                   lambda: next_bytes(model(sharpness_batch[0]), sharpness_batch[1]), pure=pure)


FULL = GPTSize(width=384, layers=6, heads=6, context=256, batch=32)
SMALL = GPTSize(width=128, layers=4, heads=4, context=128, batch=16)


@register("stdlib_lm", steps=2000, target=1.5, metric="eval_loss", eval_every=200,
          description="a byte-level GPT (6 layers, width 384, context 256, about 10.8M parameters) on the "
                      "installed Python standard library's source, split by file; for --device cuda")
def stdlib_lm(seed: int, device: str) -> Problem:
    return _byte_lm(seed, device, FULL)


@register("stdlib_lm_small", steps=300, target=2.5, metric="eval_loss", eval_every=50,
          description="the stdlib_lm recipe at 0.8M parameters (4 layers, width 128, context 128, "
                      "batches of 16): a few CPU minutes")
def stdlib_lm_small(seed: int, device: str) -> Problem:
    return _byte_lm(seed, device, SMALL)
