"""Flat buffers: one contiguous parameter, gradient and state buffer per bucket.

A bucket is the slice of a parameter group that shares a device, a dtype and a step count.
The step is one fused kernel over the bucket's flat buffers, and ``state_dict()`` still
shows per-parameter tensors: the states in ``optimizer.state[p]`` are views of the flat
state buffers.

Each parameter keeps a storage of its own, as safetensors, accelerate's ``save_state`` and
``save_pretrained`` require, yet the kernel writes it in place, with no copy: the parameter is
re-pointed at an *alias* of its part of the flat buffer, a tensor that DLPack gives its own
storage object, exactly the parameter's size, over the buffer's memory (the buffer stays
alive as long as any alias). Where that is not possible (FSDP2's shards, which live in
FSDP2's storage, or a device without DLPack) the bucket keeps a flat *copy*: the step
writes it back into the parameters (8 more bytes moved and 4 more kept per fp32 parameter),
and a parameter written by someone else (``model.load_state_dict``, an EMA swap) is copied in
before the next step, as its version counter tells. As with views of one buffer (this
module's first layout, which safetensors refused and accelerate's ``save_state`` truncated),
a step does not advance an alias's version counter.

Gradients are views of the flat gradient buffer, which backward accumulates into in place.
``zero_grad(set_to_none=True)`` (torch's default) drops those views, and backward then
hands each parameter a fresh gradient. On a CPU a post-accumulate-grad hook copies it into
the buffer at once, while it is still in cache, and puts the view back (docs/design.md has
the measurements); on a GPU, where that hook would be one kernel launch per tensor inside
backward, the step copies every fresh gradient in one multi-tensor launch. A gradient that arrives otherwise (assigned by hand, or computed during
``step()``, where probes need their own) is copied in by the step.

Under FSDP2 the parameters are DTensors whose local shards live in FSDP2's own storage,
which its all-gathers read: they take the copy layout, copy the reduce-scattered
gradients in during the step, and show each state as a DTensor over its flat view, the
form torch.distributed.checkpoint saves.
"""
from __future__ import annotations

import enum
import functools
import sys
import weakref

import torch

from ..compiler.lowerer import BucketShape
from .distributed import local, sharding_of, state_view


class ParamLayout(enum.StrEnum):
    """Where a bucket's parameters live (see the module docstring)."""

    ALIASES = "aliases"  # own storage objects over the flat buffer's memory (the default)
    COPY = "copy"  # own memory; the flat copy is written back after each step


@functools.cache
def _aliasable(device: torch.device) -> bool:
    """Whether DLPack gives this device's tensors an aliasing storage of their own."""
    try:
        buffer = torch.zeros(2, device=device)
        alias = torch.from_dlpack(buffer[1:])
        alias.fill_(1)
    except (RuntimeError, TypeError, BufferError):
        return False
    return bool(buffer[1] == 1) and alias.untyped_storage().nbytes() == buffer.element_size()


def scalar_dtype(device: torch.device) -> torch.dtype:
    """Step counts and hyperparameters are float64 0-d tensors, except where unsupported."""
    return torch.float32 if device.type == "mps" else torch.float64


class Bucket:
    """Parameters of one (device, dtype, step) with their flat buffers."""

    def __init__(self, params: list, state: dict, state_names: tuple, step: float, by_size: bool,
                 ranks: dict | None = None, state_dtype: torch.dtype | None = None,
                 capture: GradientCapture | None = None, layouts=None):
        # specs with per-tensor reductions lay tensors out by size (see compiler/lower.py), and
        # shape-aware specs (``layouts``, compiler/shaped.py) equal shapes together as well;
        # p.numel() is the full size of a sharded tensor, so every rank sorts alike
        order = (lambda p: (p.numel(), matrix_view(p.shape))) if layouts is not None else (lambda p: p.numel())
        self.params = params = sorted(params, key=order) if by_size or layouts is not None else list(params)
        self.sharding = sharding_of(params)
        # shapes only: a list of the tensors would keep each replaced storage alive to the end
        self.local_shapes = [local(p).shape for p in params]
        self.sizes = [s.numel() for s in self.local_shapes]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.device, self.dtype = local(params[0]).device, params[0].dtype
        self.numel = self.offsets[-1]
        self.state_dtype = state_dtype if state_dtype not in (None, self.dtype) else None
        self.shape = BucketShape(self.numel, len(params), self.dtype, tuple(map(tuple, self.local_shapes)),
                                 self.state_dtype, self.sharding)

        self.layout = ParamLayout.ALIASES if not self.sharding and _aliasable(self.device) else ParamLayout.COPY
        self.param = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        for p, view in zip(params, self.views(self.param)):
            view.copy_(local(p).detach())
            if self.layout == ParamLayout.ALIASES:  # one at a time: each old storage goes before the next copy
                p.data = torch.from_dlpack(view)
        self.grad = torch.empty_like(self.param)
        self.grad_views = self.views(self.grad)
        for p, view in zip(params, self.grad_views):
            view.copy_(local(p.grad))
            if not self.sharding:
                p.grad = view  # likewise: each old gradient is freed as soon as it is copied
        self.param_pointers = [t.data_ptr() for t in self._current_locals()]
        # the copied parameters' version counters after this bucket last wrote them
        self._versions = [t._version for t in self._current_locals()] if self.layout == ParamLayout.COPY else None
        self.capture = capture
        self._hooks = []
        # on a CPU the hook's copy runs while the gradient is in cache; on a GPU it would be one
        # kernel launch per tensor inside backward, so there the step copies every fresh
        # gradient in one multi-tensor launch instead (gather_grads)
        if not self.sharding and self.device.type == "cpu":
            own = weakref.ref(self)  # the hooks must not keep a dropped bucket alive
            self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(_capture_gradient, own, i))
                           for i, p in enumerate(params) if p.is_leaf and p.requires_grad]
            weakref.finalize(self, _remove_all, self._hooks)
        # a 1-element buffer (see lower.py on 0-d inputs); state[p]["step"] is a 0-d view of it
        self.step = torch.full((1,), step, dtype=scalar_dtype(self.device), device=self.device)

        self.states = {}
        self.ranks = ranks or {}
        # states shaped unlike the parameter: each tensor's part in its own shape (StateLayout)
        self.layouts = layouts(self.shape) if layouts is not None else {}
        self.missing = []  # states to initialise from the spec's initial values
        for name in state_names:
            rank = self.ranks.get(name)  # a subspace: k rows of the bucket's length
            length = self.layouts[name].numel if name in self.layouts else self.numel
            buffer = torch.empty(length if rank is None else (rank, self.numel),
                                 dtype=self.state_dtype or self.dtype, device=self.device)
            known = [name in state.get(p, {}) for p in params]
            if not all(known):
                self.missing.append(name)
            for p, view, has in zip(params, self.state_views(name, buffer), known):
                if has:
                    kept = local(state[p][name])
                    if kept.numel() != view.numel():
                        raise ValueError(
                            f"state '{name}' of a {tuple(p.shape)} parameter holds {kept.numel()} values, but the "
                            f"spec at the group's hyperparameters keeps {view.numel()}: a hyperparameter that "
                            f"sizes states (a rank, a blocks size) or decides a tensor's shape class (a shape "
                            f"condition's bound) changed after the first step. Set it back, or start a new "
                            f"optimizer (or load a checkpoint saved with the new value)")
                    view.copy_(kept.reshape(view.shape))
            self.states[name] = buffer

    def state_views(self, name: str, flat: torch.Tensor) -> list:
        """Each parameter's part of a state buffer, in the state's shape for that parameter."""
        layout = self.layouts.get(name)
        if layout is None:
            return self.views(flat)
        return [flat[a:b].view(shape) for a, b, shape in zip(layout.offsets, layout.offsets[1:], layout.shapes)]

    def views(self, flat: torch.Tensor) -> list:
        """Each parameter's part of a flat buffer, in its shape; a subspace buffer (k, numel)
        gives (k, *shape) views."""
        if flat.dim() == 2:
            return [flat[:, a:b].view(flat.shape[0], *shape)
                    for a, b, shape in zip(self.offsets, self.offsets[1:], self.local_shapes)]
        return [flat[a:b].view(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.local_shapes)]

    def initialise(self, init_values, state: dict) -> None:
        """Fill states no parameter had yet, then point ``state[p]`` at views of the buffers."""
        for name, value in zip(self.states, init_values):
            if name not in self.missing:
                continue
            fresh = [name not in state.get(p, {}) for p in self.params]
            views = self.state_views(name, self.states[name])
            for has_none, view, v in zip(fresh, views, _split(value, self, self.states[name], views)):
                if has_none:
                    view.copy_(v)
        self.missing = []
        views = {name: self.state_views(name, buffer) for name, buffer in self.states.items()}
        for i, p in enumerate(self.params):
            entry = state.setdefault(p, {})
            entry["step"] = self.step.view(())
            for name in self.states:
                layout = self.layouts.get(name)
                if layout is not None and layout.global_shapes:  # shaped unlike the parameter, sharded
                    entry[name] = state_view(views[name][i], p, 0, layout.global_shapes[i], layout.cut[i])
                else:
                    entry[name] = state_view(views[name][i], p, 1 if name in self.ranks else 0)

    def params_moved(self) -> bool:
        """Whether a parameter no longer lives where the bucket left it (``model.to(...)``,
        ``p.data = ...``): the bucket must then be rebuilt from the parameters."""
        current = self._current_locals() if self.sharding else self.params  # no new tensor per step
        return any(t.data_ptr() != ptr for t, ptr in zip(current, self.param_pointers))

    def _current_locals(self) -> list:
        """Each parameter's local shard as a plain tensor; the step runs under no_grad, where
        to_local() hands out the shard itself (detach() would dispatch through DTensor)."""
        return [local(p) for p in self.params]

    def gather_params(self) -> None:
        """The flat copy made current where a parameter (or shard) was written since the
        bucket last wrote it (a checkpoint loaded into the model, an EMA swap): its version
        counter tells. Aliases of the flat buffer are current already."""
        if self.layout != ParamLayout.COPY:
            return
        owned = self._current_locals()
        if [t._version for t in owned] != self._versions:
            torch._foreach_copy_(self.views(self.param), owned)

    def scatter_params(self) -> None:
        """The updated flat copy written back into the parameters (the copy layout)."""
        if self.layout == ParamLayout.COPY:
            owned = self._current_locals()
            torch._foreach_copy_(owned, self.views(self.param))
            self._versions = [t._version for t in owned]

    def gather_grads(self) -> None:
        """Make the flat gradient buffer current: copy in gradients that are not our views, in
        one multi-tensor copy. A view that someone kept from an earlier backward is not
        written into (see unshare_grads)."""
        stale = [i for i, (p, view) in enumerate(zip(self.params, self.grad_views)) if p.grad is not view]
        if not stale:
            return
        if not self.sharding:
            for i in stale:
                self.unshare_grads(i)
            stale = [i for i, (p, view) in enumerate(zip(self.params, self.grad_views)) if p.grad is not view]
        torch._foreach_copy_([self.grad_views[i] for i in stale], [local(self.params[i].grad) for i in stale])
        if not self.sharding:
            for i in stale:
                self.params[i].grad = self.grad_views[i]

    def unshare_grads(self, index: int) -> None:
        """A fresh gradient buffer if something outside this bucket still holds tensor
        ``index``'s gradient from an earlier backward (``g = p.grad`` kept across a
        ``zero_grad()``): torch gives every backward new gradient tensors in that mode, and
        the kept one must not change. Held means the view itself has a Python reference
        besides our list, or the storage a reference besides the buffer, its views and the
        temporary handle (a slice or reshape of a gradient). The Python count is compared with
        that of an object only a list holds, taken the same way, because what
        ``sys.getrefcount`` counts (the argument, borrowed references) varies between Python
        versions. Gradients already captured into the old buffer are copied by the step."""
        held_elsewhere = sys.getrefcount(self.grad_views[index]) > sys.getrefcount(_ONLY_IN_A_LIST[0])
        if held_elsewhere or _storage_references(self.grad) > len(self.grad_views) + 2:
            self.grad = torch.empty_like(self.grad)
            self.grad_views = self.views(self.grad)

    def detach(self, state: dict) -> None:
        """Give parameters and states their own storage again, before this bucket is dropped."""
        _remove_all(self._hooks)
        for p in self.params:
            if self.layout == ParamLayout.ALIASES:
                p.data = p.data.clone()
            entry = state.get(p, {})
            for name, value in list(entry.items()):
                if isinstance(value, torch.Tensor):
                    entry[name] = value.clone()


_ONLY_IN_A_LIST = [object()]  # the reference count of an object nothing else holds (unshare_grads)


def _storage_references(tensor: torch.Tensor) -> int:
    """How many tensors (and handles) share ``tensor``'s storage; 0 where this torch does not
    say (a private function), which leaves the Python count as the only check."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count(tensor.untyped_storage()._cdata) if use_count is not None else 0


class GradientCapture:
    """Whether backward's fresh gradients go into the buckets as they arrive: always, except
    while the optimizer steps, where a probe's backward must leave its own gradient in
    ``p.grad`` and the step's gradient in the buffer untouched."""

    def __init__(self):
        self.on = True


def _capture_gradient(bucket_ref, index: int, param: torch.Tensor) -> None:
    bucket = bucket_ref()
    if bucket is None or bucket.capture is None or not bucket.capture.on:
        return
    if param.data_ptr() != bucket.param_pointers[index]:
        return  # the parameter moved (model.to, p.data = ...): the step copies and rebuilds
    grad = param.grad
    # backward(create_graph=True) gives a gradient with a graph: copied here, it would tie
    # the buffer into that graph, so the step copies it (without the graph) instead
    if grad is None or grad is bucket.grad_views[index] or grad.requires_grad:
        return
    bucket.unshare_grads(index)  # about 0.3 us: cheap enough for every gradient
    view = bucket.grad_views[index]
    view.copy_(grad)
    param.grad = view


def _remove_all(handles) -> None:
    for handle in handles:
        handle.remove()


def _split(value, bucket: Bucket, buffer: torch.Tensor, views: list):
    """Per-parameter slices of an initial value (a flat tensor laid out as ``buffer``, whose
    per-parameter ``views`` give the shapes), or the same 0-d tensor or number for each."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == buffer.numel():
        out, start = [], 0
        for view in views:
            out.append(value[start:start + view.numel()].view(view.shape))
            start += view.numel()
        return out
    return [value] * len(bucket.params)


def matrix_view(shape) -> tuple:
    """A tensor's (rows, columns) as shape-aware specs see it (compiler/shaped.py), and its class."""
    if len(shape) >= 2:
        return (shape[0], torch.Size(shape[1:]).numel(), 1)
    return (1, shape[0] if len(shape) else 1, 0)
