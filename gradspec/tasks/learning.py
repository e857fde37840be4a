"""Small learning tasks that run in CPU minutes on data that ships with Python or a package:
digits classification (scikit-learn's 8x8 digits), a character-level transformer language
model (Python's own pydoc topics text) and modular addition (grokking-style).

Every random choice (initialisation, split, batches) comes from the seed, so a run is
deterministic given it. Minibatches are drawn with a generator seeded by (seed, step).
"""
from __future__ import annotations

import math

from . import Problem, module_losses, register

# torch is imported inside each function that builds a problem: declaring the tasks (gradspec
# list) imports none of it.


def _batch_indices(seed: int, step: int, n: int, size: int):
    import torch
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (size,), generator=generator)


def _classifier(model, train, val, test, seed, batch, device) -> Problem:
    """A Problem for a classifier over (inputs, labels) splits."""
    import torch
    import torch.nn.functional as F
    (x, y), (xv, yv), (xt, yt) = [(a.to(device), b.to(device)) for a, b in (train, val, test)]

    def batch_at(step):
        rows = _batch_indices(seed, step, len(x), batch).to(device) if batch < len(x) else slice(None)
        return x[rows], y[rows]

    loss, pure = module_losses(model, batch_at, F.cross_entropy)

    @torch.no_grad()
    def evaluate():
        logits = model(xt)
        train_logits = model(x)
        return {"eval_loss": float(F.cross_entropy(logits, yt)),
                "accuracy": float((logits.argmax(-1) == yt).double().mean()),
                "train_accuracy": float((train_logits.argmax(-1) == y).double().mean())}

    @torch.no_grad()
    def validate():
        return float(F.cross_entropy(model(xv), yv))

    fixed = slice(0, min(len(x), 512))
    return Problem(list(model.parameters()), loss, evaluate, validate,
                   lambda: F.cross_entropy(model(x[fixed]), y[fixed]), pure=pure)


@register("digits", steps=400, target=0.05, metric="accuracy", higher_is_better=True, eval_every=50,
          description="an MLP (64-64-10, GELU) on scikit-learn's 8x8 digits (1797 images): "
                      "1200 train / 300 validation / 297 test, batches of 64")
def digits(seed: int, device: str, dtype=None) -> Problem:
    """``dtype`` (float64 for tests that compare two ways of training to rounding; float32 by
    default) sets the model's and the images' precision."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - the test extra installs it
        raise RuntimeError("the digits task needs scikit-learn (pip install scikit-learn); "
                           "its data ships with the package, nothing is downloaded") from None
    data = load_digits()
    x = torch.tensor(data.data, dtype=dtype) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))  # one split for every seed
    x, y = x[order], y[order]
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 10)).to(device, dtype)
    return _classifier(model, (x[:1200], y[:1200]), (x[1200:1500], y[1200:1500]), (x[1500:], y[1500:]),
                       seed, 64, device)


@register("modular_addition", steps=1500, target=0.01, metric="accuracy", higher_is_better=True,
          eval_every=100,
          description="(a + b) mod 47 from 40% of the pairs, full batch, with an embedding MLP: "
                      "test accuracy on the other 60% measures generalisation (grokking-style)")
def modular_addition(seed: int, device: str) -> Problem:
    import torch

    from .models import EmbeddingMLP
    p = 47
    pairs = torch.cartesian_prod(torch.arange(p), torch.arange(p))
    labels = (pairs[:, 0] + pairs[:, 1]) % p
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    pairs, labels = pairs[order], labels[order]
    n_train, n_val = int(0.4 * len(pairs)), int(0.1 * len(pairs))
    torch.manual_seed(seed)

    model = EmbeddingMLP(p).to(device)
    split = lambda a, b: (pairs[a:b], labels[a:b])  # noqa: E731
    return _classifier(model, split(0, n_train), split(n_train, n_train + n_val), split(n_train + n_val, None),
                       seed, n_train, device)


def _pydoc_text() -> str:
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics))


@register("char_lm", steps=300, target=2.3, metric="eval_loss", eval_every=50,
          description="a 2-layer character transformer (width 64, context 64) on Python's pydoc "
                      "topics text (460k characters, 90/5/5 split), batches of 32 windows")
def char_lm(seed: int, device: str) -> Problem:
    import torch
    import torch.nn.functional as F

    from .models import TinyTransformer
    text = _pydoc_text()
    vocab = sorted(set(text))
    data = torch.tensor(_encode(text, vocab), dtype=torch.long)
    n = len(data)
    train, val, test = data[:int(0.9 * n)], data[int(0.9 * n):int(0.95 * n)], data[int(0.95 * n):]
    context, batch = 64, 32
    torch.manual_seed(seed)
    model = TinyTransformer(len(vocab), context).to(device)

    def windows(source, starts):
        rows = torch.stack([source[s:s + context + 1] for s in starts.tolist()]).to(device)
        return rows[:, :-1], rows[:, 1:]

    def next_characters(logits, targets):
        return F.cross_entropy(logits.reshape(-1, len(vocab)), targets.reshape(-1))

    loss, pure = module_losses(
        model, lambda step: windows(train, _batch_indices(seed, step, len(train) - context - 1, batch)),
        next_characters)

    def held_out(source, count=16):
        starts = torch.linspace(0, len(source) - context - 2, count).long()
        inputs, targets = windows(source, starts)
        with torch.no_grad():
            return float(next_characters(model(inputs), targets))

    def evaluate():
        value = held_out(test)
        return {"eval_loss": value, "bits_per_char": value / math.log(2)}

    fixed_inputs, fixed_targets = windows(train, torch.arange(0, 8 * 997, 997))
    return Problem(list(model.parameters()), loss, evaluate, lambda: held_out(val),
                   lambda: next_characters(model(fixed_inputs), fixed_targets), pure=pure)


def _encode(text: str, vocab: list) -> list:
    index = {c: i for i, c in enumerate(vocab)}
    return [index[c] for c in text]
