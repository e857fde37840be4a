"""IR to the two ``torch.fx`` graphs that perform one optimizer step over flat buffers.

The *scalar phase* takes the numeric hyperparameters as 0-d tensors (so changing one never
recompiles), the loss if the spec reads it, and each bucket's step counter; it returns
every scalar-scope value the elementwise math needs (bias corrections such as
``1 - beta2^t``, schedules), computed once in float64. Without the split, Inductor inlines
``pow(beta2, t)`` into the fused loop and evaluates it per vector of elements.

The *main phase* takes those values, the skipped-step counter under ``nonfinite="skip"``,
then for every bucket its step counter, parameter, gradient and states (flat 1-D buffers;
(k, numel) for a subspace) and the results of due probes. It writes every next value
into its buffer with ``copy_`` after computing all of them, so the step is the pure
function the spec describes, and returns nothing.

Specs with probes get, for the steps where a probe runs, a program whose main phase also
takes each probe's result per bucket (``b{i}_probe_{j}``), and one small *probe-argument*
graph per probe, with the main phase's inputs, that computes what the probe evaluates at
(``param + dR * n`` for ``grad_at``); the runtime runs those eagerly between closure calls.

A bucket is one (device, dtype, step) slice of a parameter group. In a bucket of a spec
with ``tensor.*`` reductions the tensors are laid out by size, so each *run* of equal-size
tensors is one (count, size) matrix: a per-tensor reduction is a row reduction per run and
a per-tensor value goes back to the elements by broadcasting along rows. The traced graph
grows with the number of distinct tensor sizes, never with the number of tensors, and no
index buffer is kept. ``global.*`` reductions sum the buckets' partial results.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .ir import GROUPS, Program, Scope
from .lowerer import BucketShape, _ident, _Lowerer, global_input, state_input
from ..recursion import deep
@dataclass
class StepGraphs:
    """The two phases of a step and what the runtime passes between them."""

    scalar: fx.GraphModule  # (hypers, loss, bucket steps) -> tuple of scalar values
    main: fx.GraphModule  # (scalar values, counters, bucket buffers) -> None, writes in place;
    # with ``functional``, -> {input name: its next value} and nothing is written


def _scalar_roots(program: Program, n_buckets: int) -> list:
    """(node, bucket or None) for every non-constant scalar value used by a non-scalar one."""
    roots, seen = [], set()

    def add(node):
        if node.scope != Scope.SCALAR or node.is_const:
            return
        for b in (range(n_buckets) if node.uses_step else [None]):
            if (id(node), b) not in seen:
                seen.add((id(node), b))
                roots.append((node, b))

    for each in program.classes:
        for node in each.nodes():
            if node.scope != Scope.SCALAR:
                for arg in node.args:
                    add(arg)
        for node in each.next.values():  # a next value that is itself a scalar, e.g. m' = 1 - beta^t
            add(node)
    return roots


@deep
def lower_step(program: Program, buckets: list[BucketShape], nonfinite: str = "propagate",
               functional: bool = False) -> StepGraphs:
    """The scalar and main graphs of one step (see the module docstring). A ``functional``
    main graph returns the next values instead of writing them (the pure transform's step:
    differentiable and vmappable, since nothing is written in place)."""
    roots = _scalar_roots(program, len(buckets))
    scalar_inputs = [f"hyper_{h}" for h in program.hypers_used] + (["loss"] if program.uses_loss else [])
    scalar_inputs += [f"b{i}_step" for i in range(len(buckets))]
    graph = fx.Graph()
    lowerer = _Lowerer(graph, {n: graph.placeholder(n) for n in scalar_inputs}, buckets, program)
    graph.output(tuple(lowerer.value(node, b if b is not None else 0) for node, b in roots))
    scalar = fx.GraphModule(torch.nn.Module(), graph, class_name=_ident(program.spec.name) + "_scalars")
    main = _lower_main(program, buckets, nonfinite, roots, main_inputs(program, len(buckets), len(roots), nonfinite),
                       functional)
    return StepGraphs(scalar, main)


def main_inputs(program: Program, n_buckets: int, n_scalars: int, nonfinite: str = "propagate",
                totals: bool = True) -> list:
    """The main phase's input names, in the order the runtime passes them; without ``totals``,
    those of the partial pass (lower_partials), which runs before the groups.* totals exist."""
    names = [f"scalar_{i}" for i in range(n_scalars)] + (["skipped"] if nonfinite == "skip" else [])
    names += [global_input(s) for s in program.global_states]
    names += [groups_input(j) for j in range(len(groups_values(program)))] if totals else []
    for i in range(n_buckets):
        names += [f"b{i}_step", f"b{i}_param", f"b{i}_grad"]
        names += [state_input(i, s) for s in program.state_names]
        names += [f"b{i}_probe_{j}" for j in range(len(program.probes))]
    return names


@deep
def lower_probe_args(program: Program, buckets: list[BucketShape], index: int) -> fx.GraphModule:
    """A graph from the main phase's inputs to the arguments of probe ``index``, per bucket:
    ((args of bucket 0), (args of bucket 1), ...). Probes after ``index`` are not read."""
    roots = _scalar_roots(program, len(buckets))
    graph = fx.Graph()
    # probes run before the groups.* totals exist, and never read them (GS077)
    placeholders = {n: graph.placeholder(n) for n in main_inputs(program, len(buckets), len(roots), totals=False)}
    lowerer = _Lowerer(graph, placeholders, buckets, program)
    for i, (node, b) in enumerate(roots):
        lowerer.memo[(id(node), b)] = placeholders[f"scalar_{i}"]
    probe = program.probes[index]
    graph.output(tuple(tuple(lowerer.value(a, i, broadcast_to=Scope.ELEMENT) for a in probe.args)
                       for i in range(len(buckets))))
    return fx.GraphModule(torch.nn.Module(), graph, class_name=_ident(program.spec.name) + f"_probe{index}")


def _lowerer(graph, placeholders, buckets, program):
    """The lowerer for ``program``: per run of equal-shape tensors where the step needs their
    shapes (compiler/shaped.py; compiler/sharded.py for FSDP2's shards), else over flat buckets."""
    if program.shaped:
        if any(b.sharding is not None for b in buckets):
            from .sharded import ShardedLowerer
            return ShardedLowerer(graph, placeholders, buckets, program)
        from .shaped import ShapedLowerer
        return ShapedLowerer(graph, placeholders, buckets, program)
    return _Lowerer(graph, placeholders, buckets, program)


# ---- values over every parameter group (groups.*)
#
# A groups.* value needs every group's part before any group can step. The runtime therefore
# runs, per group, a *partial pass* (lower_partials): a small graph of the main phase's inputs
# whose outputs are the group's part of each groups.* reduction, reduced over its buckets and,
# under FSDP2, all-reduced over the shard group (where a global.* reduction is). It adds the
# parts of every group (finish_groups) and passes the totals to each group's main phase as
# inputs. The builder refuses a groups.* value that feeds another one (GS077), so one partial
# pass suffices.

def groups_key(node) -> str:
    """What identifies a groups.* value across the groups' programs: where the spec writes the
    reduction (each group's own argument, as its switches build it), or "numel"."""
    return node.attr.site if node.op == "reduce" else "numel"


def groups_values(program: Program) -> list:
    """The program's groups.* values (reductions and groups.numel), each once, by key."""
    found = {}
    for each in program.classes:
        for node in each.nodes():
            if node.op in ("reduce", "measure") and node.attr.scope == GROUPS:
                found.setdefault(groups_key(node), node)
    return [found[key] for key in sorted(found)]


def groups_input(index: int) -> str:
    return f"groups_total_{index}"


def _read_totals(lowerer, program: Program, placeholders: dict, n_buckets: int) -> None:
    """Make every groups.* value of ``program`` read its input (the total over the groups)."""
    for j, node in enumerate(groups_values(program)):
        for b in (None, *range(n_buckets)):
            lowerer.memo[(id(node), b)] = placeholders[groups_input(j)]


@dataclass
class PartialGraphs:
    """The partial pass of a step (see the comment above): its graph, the groups.* reductions
    whose parts it returns (in order) and, for a mean, how many elements each part covers."""

    graph: fx.GraphModule  # (main_inputs without totals) -> tuple of parts
    reductions: tuple  # the reduce nodes
    counts: tuple  # elements per part, as floats


@deep
def lower_partials(program: Program, buckets: list[BucketShape]) -> PartialGraphs | None:
    """The group's parts of the program's groups.* reductions, or None if it has none."""
    reductions = tuple(n for n in groups_values(program) if n.op == "reduce")
    if not reductions:
        return None
    roots = _scalar_roots(program, len(buckets))
    graph = fx.Graph()
    placeholders = {n: graph.placeholder(n) for n in main_inputs(program, len(buckets), len(roots), totals=False)}
    lowerer = _lowerer(graph, placeholders, buckets, program)
    for i, (node, b) in enumerate(roots):
        lowerer.memo[(id(node), b)] = placeholders[f"scalar_{i}"]
    parts = [lowerer.groups_partial(node) for node in reductions]
    graph.output(tuple(parts))
    counts = tuple(lowerer.groups_count(node) for node in reductions)
    module = fx.GraphModule(torch.nn.Module(), graph, class_name=_ident(program.spec.name) + "_partials")
    return PartialGraphs(module, reductions, counts)


def finish_groups(func: str, parts: list, count: float):
    """A groups.* reduction from every group's part: their sum (max, min), then the root of a
    norm or the mean of a mean."""
    total = parts[0]
    for part in parts[1:]:
        total = torch.maximum(total, part) if func == "max" else torch.minimum(total, part) if func == "min" \
            else total + part
    if func == "norm":
        return torch.sqrt(total)
    if func == "mean":
        return total / count
    return total


def _lower_main(program, buckets, nonfinite, roots, names, functional=False) -> fx.GraphModule:
    graph = fx.Graph()
    placeholders = {name: graph.placeholder(name) for name in names}
    lowerer = _lowerer(graph, placeholders, buckets, program)
    for i, (node, b) in enumerate(roots):
        lowerer.memo[(id(node), b)] = placeholders[f"scalar_{i}"]
    _read_totals(lowerer, program, placeholders, len(buckets))
    if nonfinite == "skip":
        lowerer.ok = lowerer.all_finite()
        for j in range(len(groups_values(program))):  # a group that skips can leave a total NaN: skip too
            finite = lowerer.call(torch.all, lowerer.call(torch.isfinite, placeholders[groups_input(j)]))
            lowerer.ok = lowerer.call(torch.logical_and, lowerer.ok, finite)
    writes = []
    for i in range(len(buckets)):
        for name in ("param",) + program.state_names:
            old = placeholders[f"b{i}_param" if name == "param" else state_input(i, name)]
            pieces = None if functional else lowerer.next_pieces(name, i, old)
            if pieces is not None:
                writes.extend(_piece_writes(lowerer, old, pieces))
                continue
            new = lowerer.next_flat(name, i, old)
            if new is None:
                continue  # m' = m: nothing to write
            if lowerer.ok is not None:
                new = lowerer.call(torch.where, lowerer.ok, new, lowerer.load(old, i, state=name != "param"))
            writes.append((old, new))
        writes.append((placeholders[f"b{i}_step"], lowerer.step(i)))
    for name in program.global_states:  # one value per group, written once
        old = placeholders[global_input(name)]
        if program.next[name].op == "state" and program.next[name].attr == name:
            continue  # kept, as between probes: nothing to write
        new = lowerer.value(program.next[name], 0)
        if lowerer.ok is not None:
            new = lowerer.call(torch.where, lowerer.ok, new, lowerer.global_state(name))
        writes.append((old, new))
    if lowerer.ok is not None:
        skipped = placeholders["skipped"]
        writes.append((skipped, lowerer.call(operator.add, skipped, lowerer.call(torch.logical_not, lowerer.ok))))
    if functional:
        graph.output({target.target: value for target, value in writes})  # the input names
        return fx.GraphModule(torch.nn.Module(), graph, class_name=_ident(program.spec.name) + "_update")
    # Counters (step, skipped) are 1-element buffers, not 0-d tensors: torch 2.13's compiled
    # graphs silently drop every input mutation when one mutated input is a 0-d CPU tensor.
    for target, value in writes:  # all reads happen before the first write
        graph.call_method("copy_", (target, value))
    graph.output(None)
    return fx.GraphModule(torch.nn.Module(), graph, class_name=_ident(program.spec.name) + "_step")


def _piece_writes(lowerer, buffer, pieces) -> list:
    """(target, value) for each written piece: the target a strided (count, a, b) view of the
    buffer, so that the write keeps the piece's axes (ShapedLowerer.next_pieces)."""
    writes = []
    for piece in pieces:
        count, a, b = piece.size
        target = lowerer.call(torch.as_strided, buffer, piece.size, (a * b, b, 1), piece.offset)
        value = piece.value
        if lowerer.ok is not None:
            value = lowerer.call(torch.where, lowerer.ok, value, piece.previous)
        writes.append((target, value))
    return writes


@deep
def lower_init(program: Program, bucket: BucketShape) -> fx.GraphModule:
    """A graph from (hyperparameters, param, grad, random generator) of one bucket to each
    state's initial value."""
    graph = fx.Graph()
    names = [f"hyper_{h}" for h in program.hypers_used] + ["b0_param", "b0_grad"]
    placeholders = {name: graph.placeholder(name) for name in names + ["generator"]}
    lowerer = _lowerer(graph, placeholders, [bucket], program)
    if program.shaped:
        outputs = [lowerer.initial_flat(name) for name in program.state_names]
    else:
        outputs = [lowerer.value(program.init[name], 0, broadcast_to=Scope.ELEMENT) for name in program.state_names]
    graph.output(tuple(outputs))  # scalars are broadcast when copied into the state buffers
    return fx.GraphModule(torch.nn.Module(), graph, class_name=_ident(program.spec.name) + "_init")
