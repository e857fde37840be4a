"""The functional core: a spec as a pure update, ``(grads, state, params) -> (params', state')``.

This is what a spec means, without the imperative shell of :class:`gradspec.Optimizer`
(param groups, flat buffers updated in place, hooks, closures): the same compiled programs,
lowered with ``functional=True`` so that the step returns its next values instead of writing
them. Nothing is mutated, so an update can be

* differentiated: a hyperparameter given as a tensor that requires grad (``lr=torch.tensor(
  0.1, requires_grad=True)``) carries gradients through any number of unrolled steps, as
  hypergradient and meta-learning methods need;
* vmapped with ``torch.func.vmap`` over parameters, gradients, states and hyperparameters
  (an ensemble, an lr grid);
* traced inside a user's ``torch.compile(fullgraph=True)`` step: the spec is parsed, checked
  and lowered when :meth:`Transform.init` sees the parameters' shapes, so the update itself
  is only tensor code.

Parameters are a list (or tuple) or a dict of tensors; gradients and state mirror them. The
state is a plain dict of tensors, a pytree every torch.func transform understands: ``step``
(a 0-d count), one entry per per-tensor state holding a container like the parameters (each
tensor in the state's own shape where it is shaped unlike the parameter: Adafactor's (rows,)
R, Shampoo's (rows, rows) L, (0,) for a shape class that keeps none, as
``optimizer.state[p]`` shows them), and one 0-d tensor per ``state s: global``. The
parameters are one group: ``groups.f(x)`` is ``global.f(x)`` here.

Specs with curvature probes (``probe every k { }``) evaluate the model again; :meth:`update`
then takes ``loss_fn``, a function of the parameters (same container) returning the loss, and
``generator`` for their random draws. ``gauss_newton()`` and ``hessian_eigvecs()`` need the
model's logits or Lanczos iterations and run only through :class:`gradspec.Optimizer`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..check import safety_checked
from ..compiler import backends
from ..compiler.ir import Program, build, evaluate_scalar
from ..compiler.lower import finish_groups, groups_key, groups_values, lower_init, lower_partials, lower_probe_args, \
    lower_step
from ..compiler.lowerer import BucketShape, bucket_normal, compute_dtype, global_input, state_input
from ..compiler.sharded import state_layouts
from ..compiler.switches import static_hypers
from ..dsl.resolve import Spec, as_spec
from ..symbolic.simplify import simplified
from .buckets import scalar_dtype

FUNCTIONAL_PROBES = ("grad_at", "hvp", "randn")


def transform(spec: str | Spec, *, backend: str = "eager", **hyper) -> "Transform":
    """The pure update of ``spec`` (a stdlib name, an expression, a path or a Spec) with
    ``hyper`` as defaults; ``betas=(b1, b2, ...)`` sets ``beta1``, ``beta2``, ... Raises
    SpecError for a spec that does not check and ValueError for a hyperparameter outside its
    constraint. ``backend="compiled"`` runs each update through ``torch.compile``; inside a
    compiled step of your own, keep the default ``eager``: your compile fuses it."""
    spec = as_spec(spec) if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(spec, Spec):
        raise TypeError(f"transform() takes a spec name, expression, path or Spec, not {type(spec).__name__}")
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(backends.BACKENDS)}")
    safety_checked(spec)
    defaults = _checked(spec, {**spec.hyper_defaults, **_split_betas(spec, hyper)})
    return Transform(spec, defaults, backend, static_hypers(spec))


@dataclass(frozen=True)
class _Layout:
    """The parameters as the compiler sees them: one bucket per (device, dtype), each holding
    the positions (in the flattened container) of its tensors."""

    keys: tuple  # the dict's keys, or None for a list or tuple
    container: type
    buckets: tuple  # BucketShape per bucket
    members: tuple  # per bucket, the positions of its tensors
    devices: tuple  # per bucket

    @staticmethod
    def of(params) -> "_Layout":
        keys, tensors = _flatten(params)
        if not tensors:
            raise ValueError("no parameters: a transform updates at least one tensor")
        groups: dict = {}
        for position, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"parameters must be tensors, got {type(tensor).__name__}")
            if not (tensor.is_floating_point()):
                raise TypeError(f"gradspec updates floating-point tensors, got {tensor.dtype}")
            groups.setdefault((tensor.device, tensor.dtype), []).append(position)
        buckets = tuple(BucketShape(sum(tensors[i].numel() for i in members), len(members), dtype,
                                    tuple(tuple(tensors[i].shape) for i in members))
                        for (_, dtype), members in groups.items())
        return _Layout(keys, type(params), buckets, tuple(tuple(m) for m in groups.values()),
                       tuple(device for device, _ in groups))

    def flat(self, tensors: list, bucket: int) -> torch.Tensor:
        """The bucket's tensors as one flat vector (a differentiable concatenation)."""
        pieces = [tensors[i].reshape(-1) for i in self.members[bucket]]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def split(self, flat: torch.Tensor, bucket: int, like: list, out: list) -> None:
        """Scatter a bucket's flat vector back into tensors shaped and typed as ``like``."""
        shape = self.buckets[bucket]
        if not isinstance(flat, torch.Tensor):  # a next value that folded to a constant
            flat = torch.tensor(float(flat), dtype=shape.dtype, device=self.devices[bucket])
        flat = flat.expand(shape.numel) if flat.dim() == 0 else flat
        sizes = [like[i].numel() for i in self.members[bucket]]
        for i, piece in zip(self.members[bucket], torch.split(flat, sizes)):
            out[i] = piece.view(like[i].shape).to(like[i].dtype)

    def rebuild(self, tensors: list):
        if self.keys is not None:
            return self.container(zip(self.keys, tensors))
        return self.container(tensors)


@dataclass(frozen=True)
class _Compiled:
    """The lowered programs of one (switch setting, layout): the ordinary step and, for a
    probing spec, the step where every due set of probes runs."""

    program: Program
    scalar: object
    main: object
    probe_args: tuple = ()
    partials: object = None  # PartialGraphs of the groups.* reductions, or None
    partial: object = None  # its callable
    state_shapes: dict = field(default_factory=dict)  # see _state_shapes


@dataclass(frozen=True)
class Transform:
    """A spec's pure update (see the module docstring). Build with :func:`transform`."""

    spec: Spec
    hyper: dict
    backend: str = "eager"
    switch_names: tuple = ()  # the structural hyperparameters (compiler.switches)
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)
    _layouts: dict = field(default_factory=dict, compare=False, repr=False)

    def init(self, params, generator: torch.Generator | None = None) -> dict:
        """The state before the first step: the spec's initial values for ``params`` (their
        gradient, which some initial values read, taken as zero), and step 0; ``generator``
        draws a ``randn()`` initial value (default: seeded with 0, as the Optimizer's). Also
        lowers the step for these shapes, so that :meth:`update` runs only tensor code."""
        layout = self._layout(params)
        _, tensors = _flatten(params)
        compiled = self._lowered(self.hyper, layout, frozenset())
        program = compiled.program
        for probing in self._probe_sets(program):
            self._lowered(self.hyper, layout, probing)
        state: dict = {"step": torch.zeros((), dtype=scalar_dtype(layout.devices[0]), device=layout.devices[0])}
        per_element = {name: [None] * len(tensors) for name in program.state_names}
        for b, shape in enumerate(layout.buckets):
            flat = layout.flat([t.detach() for t in tensors], b)
            hypers = [self._hyper_tensor(self.hyper[h], layout.devices[b]) for h in program.hypers_used]
            if generator is None:
                generator = torch.Generator(device=layout.devices[b]).manual_seed(0)
            values = lower_init(program, shape)(*hypers, flat, torch.zeros_like(flat), generator)
            for name, value in zip(program.state_names, values):
                value = torch.as_tensor(value, dtype=flat.dtype, device=flat.device)
                like = [torch.empty(shape, dtype=flat.dtype, device=flat.device)  # in the state's own shapes
                        for shape in compiled.state_shapes[name]]
                numel = sum(like[i].numel() for i in layout.members[b])
                layout.split(value.expand(numel) if value.dim() == 0 else value, b, like, per_element[name])
        state.update({name: layout.rebuild(values) for name, values in per_element.items()})
        for name in program.global_states:  # a number, or a value of the hyperparameters (state d: global = d0)
            start = evaluate_scalar(program.init[name], {h: float(v) for h, v in self.hyper.items()
                                                         if not isinstance(v, bool)})
            state[name] = torch.tensor(float(start), dtype=compute_dtype(layout.buckets[0].dtype),
                                       device=layout.devices[0])
        return state

    def update(self, grads, state: dict, params, *, loss=None, loss_fn=None, generator=None, **hyper):
        """``(new_params, new_state)`` after one step; nothing passed in is changed. Keyword
        hyperparameters override the transform's for this call (a float or a tensor, which
        may require grad); ``loss`` feeds specs that read it; ``loss_fn(params) -> loss`` and
        ``generator`` feed a probing spec's model evaluations."""
        values = {**self.hyper, **_checked(self.spec, _split_betas(self.spec, hyper))} if hyper else self.hyper
        layout = self._layout(params)
        keys, tensors = _flatten(params)
        grad_tensors = _matching(grads, keys, [t.shape for t in tensors], "gradient")
        if not isinstance(state, dict) or "step" not in state:
            raise TypeError(f"the state is the dict that {self.spec.name}'s transform init() returns, with its step")
        compiled = self._lowered(values, layout, frozenset())
        program = compiled.program
        due = self._due(program, state["step"], values)
        if due:
            compiled = self._lowered(values, layout, due)
            program = compiled.program
        for name in (*program.state_names, *program.global_states):
            if name not in state:
                raise ValueError(f"the state has no '{name}', which {self.spec.name} keeps with these hyperparameters: "
                                 "make it with init() under the same switches and sizes")
        device = layout.devices[0]
        steps = [state["step"].reshape(1) for _ in layout.buckets]
        scalar_args = [self._hyper_tensor(values[h], device) for h in program.hypers_used]
        if program.uses_loss:
            if loss is None:
                raise ValueError(f"{self.spec.name} reads the loss: pass update(..., loss=...)")
            scalar_args.append(torch.as_tensor(loss, dtype=scalar_dtype(device), device=device))
        scalars = list(compiled.scalar(*scalar_args, *steps))
        inputs = list(scalars) + [state[name].reshape(1) for name in program.global_states]
        per_bucket = []
        state_containers = [_matching(state[n], keys, compiled.state_shapes[n], f"state '{n}'")
                            for n in program.state_names]
        for b in range(len(layout.buckets)):
            per_bucket.append([steps[b], layout.flat(tensors, b), layout.flat(grad_tensors, b),
                               *(layout.flat(list(c), b) for c in state_containers)])
        if program.probes:
            self._run_probes(compiled, layout, tensors, params, inputs, per_bucket, loss_fn, generator)
        inputs += self._groups_totals(compiled, layout, inputs, per_bucket)
        for bucket_inputs in per_bucket:
            inputs += bucket_inputs
        written = compiled.main(*inputs)
        return self._unpack(written, program, layout, tensors, state, state_containers)

    # ---- internals

    def _layout(self, params) -> _Layout:
        """The layout of ``params``, made once per signature: inside a traced step this is a
        dictionary lookup on shapes and dtypes, which the tracer guards on."""
        keys, tensors = _flatten(params)
        signature = (keys, tuple((tuple(t.shape), t.dtype, t.device) for t in tensors))
        layout = self._layouts.get(signature)
        if layout is None:
            layout = self._layouts[signature] = _Layout.of(params)
        return layout

    def _lowered(self, values: dict, layout: _Layout, probing: frozenset) -> _Compiled:
        switches = tuple(values[name] for name in self.switch_names)
        key = (switches, layout.buckets, probing)
        found = self._compiled.get(key)
        if found is None:
            program = rewritten(build(self.spec, _checked(self.spec, values), probing=probing))
            unsupported = sorted({n.attr.func for n in program.probes} - set(FUNCTIONAL_PROBES))
            if unsupported:
                raise ValueError(f"{self.spec.name}: the functional update evaluates grad_at, hvp and randn "
                                 f"probes; {', '.join(unsupported)} need the model's outputs: use gradspec.Optimizer")
            graphs = lower_step(program, list(layout.buckets), functional=True)
            main = backends.make(graphs.main, self.backend, layout.devices[0])
            probe_args = tuple(lower_probe_args(program, list(layout.buckets), j) if node.args else None
                               for j, node in enumerate(program.probes))
            partials = lower_partials(program, list(layout.buckets))
            partial = backends.make(partials.graph, self.backend, layout.devices[0]) if partials else None
            found = self._compiled[key] = _Compiled(program, graphs.scalar, main, probe_args, partials, partial,
                                                    _state_shapes(program, layout))
        return found

    def _groups_totals(self, compiled: _Compiled, layout: _Layout, inputs: list, per_bucket: list) -> list:
        """The groups.* values the main graph reads: with one group, each total is the group's
        own part finished (groups.f is global.f), computed by the partial pass."""
        totals = {"numel": float(sum(sum(shape.full_numels()) for shape in layout.buckets))}
        if compiled.partials is not None:
            parts = compiled.partial(*inputs, *(x for bucket_inputs in per_bucket for x in bucket_inputs))
            for node, part, count in zip(compiled.partials.reductions, parts, compiled.partials.counts):
                totals[groups_key(node)] = finish_groups(node.attr.func, [part], count)
        dtype, device = compute_dtype(layout.buckets[0].dtype), layout.devices[0]
        return [torch.as_tensor(totals[groups_key(node)], dtype=dtype, device=device)
                for node in groups_values(compiled.program)]

    def _probe_sets(self, program: Program):
        count = len(program.probe_periods)
        return [frozenset(range(count))] if count else []

    def _due(self, program: Program, step: torch.Tensor, values: dict) -> frozenset:
        """The probe blocks due at this step: those whose period divides the steps done (a
        Python decision: probing changes which graph runs)."""
        if not program.probe_periods:
            return frozenset()
        done = int(step)
        return frozenset(j for j, every in enumerate(program.probe_periods)
                         if done % int(values[every] if isinstance(every, str) else every) == 0)

    def _run_probes(self, compiled, layout, tensors, params, inputs, per_bucket, loss_fn, generator):
        """Each due probe's value per bucket, appended to that bucket's inputs in order."""
        program = compiled.program
        for bucket_inputs in per_bucket:
            bucket_inputs += [None] * len(program.probes)
        first = 3 + len(program.state_names)  # a bucket's inputs: step, param, grad, states, probes
        for j, node in enumerate(program.probes):
            func = node.attr.func
            if func == "randn":
                if generator is None:
                    raise ValueError(f"{self.spec.name} draws random numbers: pass update(..., generator=...)")
                for b, shape in enumerate(layout.buckets):
                    per_bucket[b][first + j] = bucket_normal(generator, *shape.normal_layout(),
                                                                  compute_dtype(shape.dtype), layout.devices[b])
                continue
            if loss_fn is None:
                raise ValueError(f"{self.spec.name} evaluates the model ({func}): pass update(..., loss_fn=...), "
                                 "a function of the parameters returning the loss")
            flat_inputs = inputs + [x for bucket_inputs in per_bucket for x in bucket_inputs]
            args = compiled.probe_args[j](*flat_inputs)
            vectors = [None] * len(tensors)
            for b, (x,) in enumerate(args):
                full = torch.as_tensor(x, dtype=layout.buckets[b].dtype, device=layout.devices[b])
                layout.split(full.reshape(-1).expand(layout.buckets[b].numel) if full.dim() == 0 else full,
                             b, tensors, vectors)
            result = _gradient_at(loss_fn, layout, vectors) if func == "grad_at" else \
                _hessian_vector(loss_fn, layout, tensors, vectors)
            for b in range(len(layout.buckets)):
                per_bucket[b][first + j] = layout.flat(result, b)

    def _unpack(self, written: dict, program, layout, tensors, state, state_containers):
        new_params = list(tensors)
        new_state = dict(state)
        new_containers = {name: list(c) for name, c in zip(program.state_names, state_containers)}
        steps = []
        for b in range(len(layout.buckets)):
            if f"b{b}_param" in written:
                layout.split(written[f"b{b}_param"], b, tensors, new_params)
            for name in program.state_names:
                key = state_input(b, name)
                if key in written:
                    layout.split(written[key], b, new_containers[name], new_containers[name])
            steps.append(written[f"b{b}_step"])
        new_state["step"] = steps[0].reshape(()).to(state["step"].dtype)
        for name, values in new_containers.items():
            new_state[name] = layout.rebuild(values)
        for name in program.global_states:
            key = global_input(name)
            if key in written:
                new_state[name] = torch.as_tensor(written[key]).reshape(()).to(state[name].dtype)
        return layout.rebuild(new_params), new_state

    @staticmethod
    def _hyper_tensor(value, device) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            value = value.reshape(()) if value.dim() else value  # one element (validated), of any shape
            return value.to(device=device, dtype=scalar_dtype(device)) if value.dtype != scalar_dtype(device) \
                or value.device != device else value
        return torch.tensor(float(value), dtype=scalar_dtype(device), device=device)


def rewritten(program: Program) -> Program:
    """The program SymPy's rewrite makes smaller, where it does (symbolic/simplify.py). A
    program with groups.* values is kept as written: the rewrite would lose where each
    reduction is written, which pairs the groups' parts (compiler/lower.py)."""
    return program if groups_values(program) else simplified(program)


def _gradient_at(loss_fn, layout: _Layout, displaced: list) -> list:
    """d loss / d params at ``displaced`` (detached from any outer graph, as the
    Optimizer's probe is: a probe's value is data for the step)."""
    points = [x.detach().requires_grad_(True) for x in displaced]
    loss = loss_fn(layout.rebuild(points))
    grads = torch.autograd.grad(loss, points, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(points, grads)]


def _hessian_vector(loss_fn, layout: _Layout, tensors: list, vectors: list) -> list:
    """H v at the current parameters by double backward."""
    points = [t.detach().requires_grad_(True) for t in tensors]
    grads = torch.autograd.grad(loss_fn(layout.rebuild(points)), points, create_graph=True, allow_unused=True)
    pairs = [(g, v) for g, v in zip(grads, vectors) if g is not None and g.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in tensors]
    products = torch.autograd.grad([g for g, _ in pairs], points, grad_outputs=[v for _, v in pairs],
                                   allow_unused=True)
    return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(points, products)]


def _state_shapes(program: Program, layout: _Layout) -> dict:
    """Each per-tensor state's shape for each parameter (by position): the parameter's, or the
    state's own (a shaped state such as (rows, rows), or a base's in a projected space). Made
    once per program and layout, with the lowered step."""
    params = [None] * sum(len(members) for members in layout.members)
    for members, bucket in zip(layout.members, layout.buckets):
        for i, shape in zip(members, bucket.full_shapes):
            params[i] = torch.Size(shape)
    shapes = {name: list(params) for name in program.state_names}
    if program.shaped:
        for b, bucket in enumerate(layout.buckets):
            for name, laid in state_layouts(program, bucket).items():
                for i, shape in zip(layout.members[b], laid.shapes):
                    shapes[name][i] = torch.Size(shape)
    return shapes


def _matching(container, keys: tuple | None, shapes: list, what: str) -> list:
    """The tensors of ``container`` (gradients, or one state) in the parameters' order: by key
    when the parameters are a dict, by position otherwise; each of the shape given. A value of
    another parameter's shape, a missing or extra key, or a count that differs is a ValueError,
    never a silent pairing by position."""
    found_keys, values = _flatten(container)
    if keys is not None:
        if found_keys is None or set(found_keys) != set(keys):
            given = "a list" if found_keys is None else f"keys {sorted(map(str, found_keys))}"
            raise ValueError(f"the {what} must be keyed as the parameters are ({sorted(map(str, keys))}), got {given}")
        values = [container[k] for k in keys]
    elif found_keys is not None:
        raise ValueError(f"the parameters are a list, but the {what} is a dict")
    if len(values) != len(shapes):
        raise ValueError(f"got {len(values)} values of the {what} for {len(shapes)} parameters")
    for position, (value, shape) in enumerate(zip(values, shapes)):
        where = repr(keys[position]) if keys is not None else f"#{position}"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"the {what} of parameter {where} must be a tensor, got {type(value).__name__}")
        if value.shape != shape:
            raise ValueError(f"the {what} of parameter {where} has shape {tuple(value.shape)}, not {tuple(shape)}")
    return values


def _flatten(container) -> tuple:
    """(keys or None, list of values) of a list, tuple or dict."""
    if isinstance(container, dict):
        return tuple(container), list(container.values())
    if isinstance(container, (list, tuple)):
        return None, list(container)
    raise TypeError(f"parameters, gradients and states are a list, tuple or dict of tensors, "
                    f"not {type(container).__name__}")


def _split_betas(spec: Spec, hyper: dict) -> dict:
    """``betas=(b1, b2, ...)`` as ``beta1``, ``beta2``, ... (as many as given)."""
    if "betas" not in hyper:
        return hyper
    hyper = dict(hyper)
    betas = tuple(hyper.pop("betas"))
    names = [f"beta{i}" for i in range(1, len(betas) + 1)]
    missing = [n for n in names if n not in spec.hypers]
    if missing:
        raise ValueError(f"{spec.name} has no {', '.join(missing)}: betas gives {len(betas)} values")
    hyper.update(zip(names, betas))
    return hyper


def _checked(spec: Spec, values: dict) -> dict:
    """``values`` if every name is a hyperparameter of the spec and every plain number meets
    its constraint; ValueError otherwise."""
    unknown = sorted(set(values) - set(spec.hypers))
    if unknown:
        raise ValueError(f"{spec.name} has no hyperparameter {', '.join(map(repr, unknown))}; "
                         f"its hyperparameters: {', '.join(spec.hypers)}")
    for name, value in values.items():
        hyper = spec.hypers[name]
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise TypeError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            continue  # data, as in a traced or vmapped call: checked only as plain numbers
        problem = hyper.check(value)
        if problem:
            raise ValueError(f"{spec.name}: {problem}")
    return values
