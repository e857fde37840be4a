"""The processes behind tests/test_distributed.py: each ``check_*`` runs on every rank of a
2-process gloo group (CPU, float64) and raises AssertionError on a mismatch.

The batch of 16 rows is split in rank order (rows 8r .. 8r + 7) and every loss is a mean
over its own rows, so the data-parallel mean gradient is the full batch's gradient and a
single process stepping on the full batch is the reference. The model's shapes shard
unevenly over 2 ranks (7 and 3 rows; a (1,)-parameter whose shard on rank 1 is empty).

The checks of tests/distributed_shapes_worker.py run in the same process group (``main``
takes "module.check" names): starting two processes that import torch costs more than
most checks, and the one-process references are shared between them.
"""
from __future__ import annotations

import functools
import gc
import importlib
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradspec

# Enough for every periodic part of a spec to run several times on both sides: the probes
# every k = 2 (6 times) and k = T = 3 (4 times), the refreshes every R = 5 (3 times),
# lookahead's synchronisation every 3 steps (4 times), and 12 steps of every state.
STEPS = 12
TOLERANCE = 1e-10
SAVE_AT = 5  # the checkpoint's step: deo(adam) and sophia_g (T = k = 3) probe on both sides of it
ROWS = 16

# every stdlib optimizer, and every adaptor over a base
SPECS = {
    "adagrad": {}, "adam": {}, "adamw": {"weight_decay": 0.1}, "alto": {}, "alto_vanilla": {},
    "dualadam": {}, "eadam": {}, "esgd": {}, "invadam": {}, "lamb": {}, "lion": {"lr": 1e-3},
    "muon": {}, "rmsprop": {}, "sgd": {"lr": 0.05, "momentum": 0.9},
    "sgd_log_metric": {}, "sgd_metric": {}, "sgd_rms": {}, "clip_grad_norm(adam)": {"max_norm": 0.05},
    "lookahead(adam)": {"sync_period": 3}, "deo(adam)": {"T": 3}, "sophia_g": {"k": 3}, "sophia": {"k": 3},
    "bulk_sgd": {"k": 2, "R": 5, "lanczos_steps": 8}, "dom_sgd": {"k": 2, "R": 5, "lanczos_steps": 8},
    "bulk_dom(adam)": {"k": 2, "R": 5, "lanczos_steps": 8, "a": 0.25},
    "muon(ns_bfloat16 = false)": {}, "adafactor": {}, "agc(adam)": {}, "gc(sgd)": {"lr": 0.05},
    "shampoo": {"lr": 0.01}, "muon_adamw": {}, "schedule_free_sgd": {"lr": 0.1}, "schedule_free_adamw": {"lr": 1e-2},
    "prodigy": {}, "soap": {}, "galore(adam)": {"rank": 2, "update_proj_gap": 5},
}
NEEDS_INIT_STATE = {"deo(adam)", "sophia_g", "sgd_log_metric"}  # the others test DCP's lr-0 step
HVP_SPECS = {"sophia", "bulk_sgd", "dom_sgd", "bulk_dom(adam)"}  # refused under FSDP2
# soap's first basis is eigvecs of a rank-one statistic (g g^T of this model's gradients): its
# null-space columns follow the last bits of the product, which a row-sharded product rounds
# otherwise, and the runs part (3.5e-2 after 20 steps). Under DDP every rank computes what
# one process does; under FSDP2 soap is not compared here (a known gap, see docs/distributed.md)
UNDETERMINED_UNDER_FSDP = {"soap"}
# Under DDP the step runs unchanged on the all-reduced gradient (gradspec/runtime/distributed.py):
# what differs from one process is the closure driver averaging the gradients it computes
# itself (the probing specs) and the loss averaged over the batch (the metric specs). Those run
# under DDP, with one spec per kind of step (elementwise, per-tensor and global reductions,
# matrix iteration, shape-aware state); every spec runs under FSDP2.
DDP_SPECS = ["deo(adam)", "sophia", "sophia_g", "bulk_sgd", "dom_sgd", "bulk_dom(adam)", "sgd_metric",
             "sgd_log_metric", "adam", "lamb", "clip_grad_norm(adam)", "muon", "shampoo"]
# shape-aware specs (axis reductions, matrix algebra, shaped states): under FSDP2 as the others
# (compiler/sharded.py; their own checks are in tests/test_distributed_shapes.py)
SHAPED_SPECS = {"muon(ns_bfloat16 = false)", "adafactor", "agc(adam)", "gc(sgd)", "shampoo", "muon_adamw", "soap",
                "galore(adam)"}


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(6, 7)
        self.second = torch.nn.Linear(7, 3)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.scale * self.second(torch.tanh(self.first(x)))


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(ROWS, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (ROWS,), generator=gen)


def closure_for(model, opt, rows: slice, step: int):
    """The step's closure on the given rows; the batch changes with the step."""
    x, y, labels = data()
    x = x + 0.01 * step
    x, y, labels = x[rows], y[rows], labels[rows]

    def closure():
        out = model(x)
        if opt.spec.name.startswith("sophia_g"):
            return F.cross_entropy(out, labels), out
        return F.mse_loss(out, y)
    return closure


def train(model, opt, rows: slice, steps: int, first: int = 0):
    for step in range(first, first + steps):
        closure = closure_for(model, opt, rows, step)
        if opt.has_probes:
            opt.step(closure)
        else:
            opt.zero_grad()
            loss = closure()
            loss.backward()
            opt.step(loss=loss.detach())


def full(model) -> torch.Tensor:
    """The model's parameters as one flat vector, gathered if sharded."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])


def shard(model):
    """FSDP2 over the whole model, one parameter group: every parameter is cut by rows all
    the same, and the optimizer sees the same shards as under a wrapping per layer, at a
    third of the collectives per step (examples/fsdp_train.py, run under torchrun by
    tests/test_distributed.py, wraps each block)."""
    from torch.distributed.fsdp import fully_shard
    return fully_shard(model)


def mine() -> slice:
    half = ROWS // dist.get_world_size()
    return slice(dist.get_rank() * half, (dist.get_rank() + 1) * half)


def reference(spec: str, hyper: dict, backend: str) -> torch.Tensor:
    model = Model().double()
    opt = gradspec.Optimizer(model.parameters(), spec, backend=backend, seed=3, process_group=None, **hyper)
    train(model, opt, slice(None), STEPS)
    return full(model)


_SHARED: dict = {}  # key -> result of shared(), kept for the later checks of the process group


def shared(jobs: dict) -> dict:
    """``jobs`` ({key: function of no arguments}) run once per process group: rank r runs
    every world-th job not yet run and the ranks exchange the results (every rank calls
    this with the same keys, in the same order). For the one-process references, which
    every rank would otherwise compute alike."""
    missing = [key for key in jobs if key not in _SHARED]
    share = missing[dist.get_rank()::dist.get_world_size()]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {key: jobs[key]() for key in share})
    for part in gathered:
        _SHARED.update(part)
    return {key: _SHARED[key] for key in jobs}


def references(specs: list, backend: str) -> dict:
    """reference() of each spec, shared by the ranks (see shared())."""
    jobs = {(spec, backend): functools.partial(reference, spec, SPECS[spec], backend) for spec in specs}
    return {spec: value for (spec, _), value in shared(jobs).items()}


def close(got: torch.Tensor, expected: torch.Tensor, what: str):
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < TOLERANCE, f"{what}: relative error {error:.2e}"


def check_parity(mode: str, backend: str, specs: list):
    """Every spec for STEPS steps under ``mode`` ("ddp" or "fsdp") against one process."""
    from torch.nn.parallel import DistributedDataParallel
    failures = []
    not_compared = HVP_SPECS | UNDETERMINED_UNDER_FSDP if mode == "fsdp" else set()
    expected_by_spec = references([spec for spec in specs if spec not in not_compared], backend)
    for spec in specs:
        if mode == "fsdp" and spec in UNDETERMINED_UNDER_FSDP:
            continue
        hyper = SPECS[spec]
        model = Model().double()
        if mode == "fsdp" and spec in HVP_SPECS:
            try:
                gradspec.Optimizer(shard(model).parameters(), spec, backend=backend, seed=3, **hyper)
            except ValueError as error:
                assert "FSDP2" in str(error) and "DDP" in str(error), str(error)
                continue
            failures.append(f"{spec}: an exact-HVP spec was accepted under FSDP2")
            continue
        wrapped = DistributedDataParallel(model) if mode == "ddp" else shard(model)
        opt = gradspec.Optimizer(wrapped.parameters(), spec, backend=backend, seed=3, **hyper)
        train(wrapped, opt, mine(), STEPS)
        got = full(model)
        try:
            close(got, expected_by_spec[spec], f"{spec} under {mode}")
            assert not torch.equal(got, full(Model().double())), f"{spec} did not train"
        except AssertionError as error:
            failures.append(str(error))
    assert not failures, "\n".join(failures)


def check_checkpoint(backend: str, specs: list):
    """FSDP2 + torch.distributed.checkpoint, in its nested and its flattened form (torchtitan's):
    save at step SAVE_AT, train SAVE_AT more; a fresh model and optimizer loaded from either
    checkpoint reach the same parameters bit for bit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    folder = tempfile.mkdtemp() if dist.get_rank() == 0 else None
    holder = [folder]
    dist.broadcast_object_list(holder)
    forms = {flatten: StateDictOptions(flatten_optimizer_state_dict=flatten) for flatten in (False, True)}
    for spec in specs:
        name = spec.replace("(", "_").replace(")", "")
        paths = {flatten: os.path.join(holder[0], name + ("-flat" if flatten else "")) for flatten in forms}
        model = shard(Model().double())
        opt = gradspec.Optimizer(model.parameters(), spec, backend=backend, seed=3, **SPECS[spec])
        train(model, opt, mine(), SAVE_AT)
        for flatten, options in forms.items():
            model_state, opt_state = get_state_dict(model, opt, options=options)
            dcp.save({"model": model_state, "optimizer": opt_state}, checkpoint_id=paths[flatten])
        train(model, opt, mine(), SAVE_AT, first=SAVE_AT)
        expected = full(model)

        for flatten, options in forms.items():
            fresh = shard(Model().double())
            with torch.no_grad():  # a different starting point, so the load must restore it
                for p in fresh.parameters():
                    p.add_(1.0)
            resumed = gradspec.Optimizer(fresh.parameters(), spec, backend=backend, seed=99, **SPECS[spec])
            if spec in NEEDS_INIT_STATE:  # DCP's own lr-0 step has no closure and no loss
                resumed.init_state()
            model_state, opt_state = get_state_dict(fresh, resumed, options=options)
            loaded = {"model": model_state, "optimizer": opt_state}
            dcp.load(loaded, checkpoint_id=paths[flatten])
            set_state_dict(fresh, resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                           options=options)
            train(fresh, resumed, mine(), SAVE_AT, first=SAVE_AT)
            got = full(fresh)
            form = "flattened" if flatten else "nested"
            assert torch.equal(got, expected), \
                f"{spec} ({form}): resumed run differs by {float((got - expected).abs().max()):.2e}"


def check_nonfinite(backend: str):
    """A NaN in one rank's shard skips the step on every rank (nonfinite="skip") and raises on
    every rank (nonfinite="raise")."""
    for policy in ("skip", "raise"):
        model = shard(Model().double())
        opt = gradspec.Optimizer(model.parameters(), "lamb", backend=backend, nonfinite=policy)
        train(model, opt, mine(), 2)
        before = full(model)
        opt.zero_grad()
        closure_for(model, opt, mine(), 2)().backward()
        if dist.get_rank() == 0:
            model.first.weight.grad.to_local()[0, 0] = float("nan")
        if policy == "skip":
            opt.step()
            assert opt.skipped_steps == 1
        else:
            try:
                opt.step()
            except FloatingPointError as error:
                assert ("another rank" in str(error)) == (dist.get_rank() == 1), str(error)
            else:
                raise AssertionError("no FloatingPointError")
        assert torch.equal(full(model), before)


def main(rank: int, world: int, rendezvous: str, checks: list, passed_folder: str):
    """Run ``checks``, (name, check, args) triples, in order in one process group: starting
    two processes that import torch costs more than most checks. ``check`` names a function
    of this module, or "module.function" one of another (tests/distributed_shapes_worker.py).
    After each check passes on every rank, rank 0 leaves a file named after it in
    ``passed_folder``; the first failure raises, and spawn reports its traceback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    for name, check, args in checks:
        gc.collect()  # then freeze the survivors: see tests/conftest.py's pytest_runtest_teardown
        gc.freeze()
        module, _, function = check.rpartition(".")
        getattr(importlib.import_module(module) if module else sys.modules[__name__], function)(*args)
        dist.barrier()
        if rank == 0:
            open(os.path.join(passed_folder, name), "w").close()
    dist.destroy_process_group()
    # Gloo's worker threads can still hold work objects when the interpreter finalises, which
    # aborts the process now and then (SIGABRT, "terminate called without an active
    # exception"; pytorch/pytorch#179291): a passed check exits without finalising.
    sys.stdout.flush()
    os._exit(0)
