"""Compiles bounded per (spec, switch setting, dtype, device), not one per parameter group.

Fine-tuning recipes give every layer its own group (layer-wise lr decay, with and without
weight decay), so a model has dozens of groups of distinct sizes. A step whose graph does not
depend on its buffers' lengths gets kernels compiled for their lengths for its first few
layouts (they are faster), then one kernel for any length; a spec whose graph does depend on
them (a per-tensor reduction lays tensors out by size) keeps one compile per layout.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import gradspec
from gradspec.compiler import backends

pytestmark = pytest.mark.compiled


def _groups(count: int, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(50 + 7 * i, 3, generator=gen, dtype=dtype).requires_grad_() for i in range(count)]
    return params, [{"params": [p], "lr": 1e-2 * 0.9 ** i, "weight_decay": 0.1 * (i % 2)} for i, p in enumerate(params)]


@pytest.fixture
def no_compiles_yet():
    """Empty caches and Dynamo's counters, so a test counts the graphs its own steps compile."""
    backends._CACHE.clear()
    torch._dynamo.reset()
    counters.clear()


def _step(opt, params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    opt.step()


def test_48_groups_of_distinct_sizes_compile_five_graphs_not_48(no_compiles_yet):
    params, groups = _groups(48)
    opt = gradspec.Optimizer(groups, "adamw", backend="compiled")
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _step(opt, params, gen)
    # four layouts get kernels compiled for their lengths (40% faster on our CPU), then one
    # kernel for any length serves the other 44
    assert counters["stats"]["unique_graphs"] == backends.STATIC_LAYOUTS + 1
    assert len(opt._plans) == 48


def test_a_model_with_few_layouts_keeps_kernels_compiled_for_their_lengths(no_compiles_yet):
    params, groups = _groups(2)
    opt = gradspec.Optimizer(groups, "adamw", backend="compiled")
    _step(opt, params, torch.Generator().manual_seed(1))
    assert counters["stats"]["unique_graphs"] == 2
    assert all(not entry[1].for_any_length for key, entry in backends._CACHE.items() if key[0] != "static layouts")


def test_the_length_free_kernel_matches_torch_adamw_in_every_group():
    params, groups = _groups(12, torch.float64, seed=2)
    reference_params = [p.detach().clone().requires_grad_() for p in params]
    opt = gradspec.Optimizer(groups, "adamw", backend="compiled")
    reference = torch.optim.AdamW([{**g, "params": [q]} for g, q in zip(groups, reference_params)])
    gen, reference_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(100):
        _step(opt, params, gen)
        _step(reference, reference_params, reference_gen)
    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_spec_with_per_tensor_reductions_keeps_a_compile_per_layout(no_compiles_yet):
    """LAMB's trust ratio reduces each tensor: its graph holds the tensors' sizes, so two
    groups of different sizes are two layouts (and two graphs), never one wrong kernel."""
    params, groups = _groups(2)
    opt = gradspec.Optimizer(groups, "lamb", backend="compiled")
    _step(opt, params, torch.Generator().manual_seed(4))
    assert counters["stats"]["unique_graphs"] == 2


def test_a_spec_with_groups_reductions_compiles_its_partial_pass_as_its_step(no_compiles_yet):
    """Prodigy's groups.* reductions add a partial pass per group (compiler/lower.py), compiled
    and shared as the step is: six groups of distinct sizes compile five steps and five partial
    passes, whatever the number of groups beyond the first four layouts."""
    params, groups = _groups(6)
    opt = gradspec.Optimizer(groups, "prodigy", backend="compiled")
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        _step(opt, params, gen)
    assert counters["stats"]["unique_graphs"] == 2 * (backends.STATIC_LAYOUTS + 1)
    d = {float(opt.state[group["params"][0]]["d"]) for group in opt.param_groups}
    assert len(d) == 1  # one estimate over every group
