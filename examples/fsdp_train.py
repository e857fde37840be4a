"""Train a small character model with a gradspec optimizer under FSDP2 (or DDP), on CPU.

    torchrun --nproc_per_node 2 examples/fsdp_train.py                  # lamb, FSDP2
    torchrun --nproc_per_node 2 examples/fsdp_train.py --spec "deo(adam)" --steps 60
    torchrun --nproc_per_node 2 examples/fsdp_train.py --wrap ddp --spec sophia
    torchrun --nproc_per_node 2 examples/fsdp_train.py --spec muon  # Muon on the hidden matrices, AdamW on the rest

Each rank takes its own slice of every batch. Under FSDP2 the optimizer steps the local
shards, all-reducing LAMB's trust ratios and DEO's projections inside its compiled graph;
probing specs get ``step(closure)``, and the closure runs on every rank. Halfway the run
saves a checkpoint with torch.distributed.checkpoint and the second half resumes from it
in a fresh model and optimizer, as a restarted job would. The checkpoint goes to
--checkpoint-dir, which is kept; without it, to a temporary folder removed at the end.

Muon is for hidden weight matrices: with --spec muon the blocks' 2-D weights take Muon (at
--muon-lr) and the embedding, the output layer and every 1-D parameter take AdamW (at --lr),
two optimizers stepped together and saved in one checkpoint, as the muon spec's docstring
recommends.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import gradspec

CONTEXT, BATCH = 32, 64


class CharModel(torch.nn.Module):
    """Embedding, two residual MLP blocks over a fixed context, next-character logits."""

    def __init__(self, vocab: int, width: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width)) for _ in range(2))
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        x = self.embed(tokens).mean(dim=1)
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def wrap(model, how: str):
    if how == "ddp":
        return DistributedDataParallel(model)
    for block in model.blocks:
        fully_shard(block)
    return fully_shard(model)


def build(vocab, args):
    """A fresh model and its optimizers (two for Muon, one otherwise)."""
    torch.manual_seed(0)  # the same initial model on every rank
    model = wrap(CharModel(vocab), args.wrap)
    if args.spec != "muon":
        return model, [gradspec.Optimizer(model.parameters(), args.spec, backend=args.backend, lr=args.lr, seed=0)]
    inner = getattr(model, "module", model)  # DDP wraps; fully_shard does not
    hidden = {id(p) for p in inner.blocks.parameters() if p.ndim >= 2}
    matrices = [p for p in model.parameters() if id(p) in hidden]
    rest = [p for p in model.parameters() if id(p) not in hidden]
    return model, [gradspec.Optimizer(matrices, "muon", backend=args.backend, lr=args.muon_lr),
                   gradspec.Optimizer(rest, "adamw", backend=args.backend, lr=args.lr)]


def train(model, opts, data, steps, first, rank, world):
    rows = BATCH // world
    generator = torch.Generator().manual_seed(1234)
    for step in range(first + steps):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=generator)
        if step < first:
            continue  # the same batches as an uninterrupted run
        mine = starts[rank * rows:(rank + 1) * rows]
        x = torch.stack([data[s:s + CONTEXT] for s in mine])
        y = data[mine + CONTEXT]

        def closure():
            logits = model(x)
            return F.cross_entropy(logits, y), logits

        if opts[0].has_probes:  # a probing spec is the only optimizer
            loss = opts[0].step(closure)
        else:
            for opt in opts:
                opt.zero_grad()
            loss, _ = closure()
            loss.backward()
            for opt in opts:
                opt.step(loss=loss.detach())  # for specs that read the loss
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1:4d}  loss {float(mean) / world:.4f}", flush=True)


def checkpoint_folder(args, rank):
    """--checkpoint-dir, kept; else a temporary folder rank 0 makes (private to this user)
    and removes when the block ends. Every rank gets the same path."""
    if args.checkpoint_dir is not None:
        return contextlib.nullcontext(args.checkpoint_dir)
    if rank == 0:
        return tempfile.TemporaryDirectory(prefix="gradspec-fsdp-")
    return contextlib.nullcontext(None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", default="lamb")
    parser.add_argument("--wrap", choices=["fsdp", "ddp"], default="fsdp")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=3e-3, help="the spec's lr (AdamW's with --spec muon)")
    parser.add_argument("--muon-lr", type=float, default=0.02, help="Muon's lr on the hidden matrices")
    parser.add_argument("--backend", choices=["eager", "compiled"], default="eager")
    parser.add_argument("--checkpoint-dir", help="save the halfway checkpoint here and keep it "
                                                 "(default: a temporary folder, removed at the end)")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from pydoc_data.topics import topics  # Python's own help text: nothing is downloaded
    text = "".join(topics[key] for key in sorted(topics))
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text[:200_000]])

    model, opts = build(len(vocab), args)
    half = args.steps // 2
    train(model, opts, data, half, 0, rank, world)

    with checkpoint_folder(args, rank) as made:
        folder = [made]
        dist.broadcast_object_list(folder)
        model_state, opt_state = get_state_dict(model, opts)
        dcp.save({"model": model_state, "optimizer": opt_state}, checkpoint_id=folder[0])
        if rank == 0:
            print(f"saved a checkpoint at step {half} to {folder[0]}; resuming in a fresh model and optimizer")

        model, opts = build(len(vocab), args)
        for opt in opts:
            opt.init_state()  # the state layout to load into: DCP's own lr-0 step has no closure or loss
        model_state, opt_state = get_state_dict(model, opts)
        state = {"model": model_state, "optimizer": opt_state}
        dcp.load(state, checkpoint_id=folder[0])
        set_state_dict(model, opts, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        dist.barrier()  # every rank has read the checkpoint before rank 0 removes it
    train(model, opts, data, args.steps - half, half, rank, world)
    if rank == 0:
        counts = "; ".join(f"{opt.spec.name} {opt.evaluations.as_dict()}" for opt in opts)
        print(f"{args.spec} under {args.wrap} on {world} processes: evaluations {counts}")
    dist.barrier()  # no rank tears down while another still communicates
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
