"""What a step costs, read off the IR: model evaluations declared by probes, and the bytes the
elementwise phase moves per parameter (the memory roofline's numerator)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..dsl.resolve import Spec
from .ir import Program, Scope, build
from ..recursion import deep

# per call: (closure calls, gradients, Hessian-vector products); hessian_eigvecs: per iteration
EVALUATIONS = {"grad_at": (1, 1, 0), "hvp": (0, 0, 1), "gauss_newton": (0, 1, 0), "randn": (0, 0, 0),
               "hessian_eigvecs": (0, 0, 1)}


@dataclass
class ProbeCost:
    period: str  # "T = 10"
    every: int
    calls: list = field(default_factory=list)  # (function, closure calls, gradients, hvps) per run


@dataclass
class StepCost:
    """Per step, averaged over the probes' periods at the given hyperparameters."""

    closure_calls: float
    gradients: float
    hvps: float
    elements_moved: int  # buffer elements read or written per parameter element, ordinary step
    elements_moved_probing: int  # the same on a step where every probe runs
    probes: list  # ProbeCost per probe block
    differentiates_gradient: bool  # an exact HVP: the step's gradient is taken with create_graph


@deep
def step_cost(spec: Spec, values: dict | None = None) -> StepCost:
    values = {**spec.hyper_defaults, **(values or {})}
    plain = build(spec, values)
    probes, closure_calls, gradients, hvps = [], 1.0, 1.0, 0.0
    for j, period in enumerate(plain.probe_periods):
        every = int(values[period]) if isinstance(period, str) else int(period)
        cost = ProbeCost(f"{period} = {every}" if isinstance(period, str) else str(every), every)
        for node in build(spec, values, probing={j}).probes:
            call = node.attr
            per = EVALUATIONS[call.func]
            times = call.iters if call.func == "hessian_eigvecs" else 1
            cost.calls.append((call.func, per[0] * times, per[1] * times, per[2] * times))
        for _, c, g, h in cost.calls:
            closure_calls += c / every
            gradients += g / every
            hvps += h / every
        probes.append(cost)
    probing = build(spec, values, probing=frozenset(range(len(plain.probe_periods))))
    return StepCost(closure_calls, gradients, hvps, elements_moved(plain), elements_moved(probing), probes,
                    any(name in ("hvp", "hessian_eigvecs") for p in probes for name, *_ in p.calls))


def elements_moved(program: Program) -> int:
    """Buffer elements a perfect step reads and writes per parameter element: the inputs,
    states and probe results the elementwise phase reads, the states it changes (a subspace
    counts k times) and the parameter; plus, for specs with reductions (global or per
    tensor), one more pass that reads what the reductions need before the update can use
    their results. A lower bound: reductions that depend on each other need more passes."""
    ranks = program.state_ranks or {}
    nodes = program.nodes(initial=False)

    def width(leaf):
        if leaf.op == "probe":
            return leaf.attr.rank if leaf.type == "subspace" else 1
        return ranks.get(leaf.attr, 1)

    leaves = [n for n in nodes if n.op in ("state", "input", "probe") and n.scope == Scope.ELEMENT]
    writes = {name for name, node in program.next.items()
              if name not in program.global_states and not (node.op == "state" and node.attr == name)}
    reduced = [n for n in nodes if n.op in ("reduce", "onto") or (n.op == "matrix" and n.attr.func != "aspect")]
    pass_reads = set()
    for node in reduced:
        pass_reads |= {id(leaf) for leaf in _leaves(node.args)}
    return (sum(width(leaf) for leaf in leaves) + sum(ranks.get(name, 1) for name in writes)
            + sum(width(leaf) for leaf in leaves if id(leaf) in pass_reads))


def _leaves(args) -> list:
    """The elementwise buffers (inputs, states, probe results) the expressions read."""
    seen, out, stack = set(), [], list(args)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op in ("state", "input", "probe") and node.scope == Scope.ELEMENT:
            out.append(node)
        stack.extend(node.args)
    return out
