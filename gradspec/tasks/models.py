"""Models the built-in learning tasks train, kept apart from the task declarations so that
declaring (and listing) the tasks imports no torch."""
from __future__ import annotations

import torch


class TinyTransformer(torch.nn.Module):
    """A decoder-only character model: token and position embeddings, pre-norm causal
    self-attention blocks (torch.nn.TransformerEncoderLayer with a causal mask)."""

    def __init__(self, vocab: int, context: int, width: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, width)
        self.positions = torch.nn.Embedding(context, width)
        block = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens):
        n = tokens.shape[1]
        h = self.tokens(tokens) + self.positions(torch.arange(n, device=tokens.device))
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        return self.head(self.norm(h))


class EmbeddingMLP(torch.nn.Module):
    """Modular addition's model: both operands embedded, concatenated, then an MLP."""

    def __init__(self, p: int, width: int = 64, hidden: int = 256):
        super().__init__()
        self.embed = torch.nn.Embedding(p, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * width, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, p))

    def forward(self, ab):
        return self.mlp(self.embed(ab).reshape(len(ab), -1))
