"""``blocks B { ... }``: a spec's body once per block of at most B x B of each tensor's matrix view
(Distributed Shampoo's blocking), against plain loops over the blocks written here; the shampoo
spec's blocked and grafted settings against tests/matrix_references.py's Shampoo (beyond the two
cases of tests/test_matrix_parity.py); what the state holds; and the batching: one decomposition
per block shape, a graph that does not grow with the number of tensors."""
import pytest
import torch
from torch._dynamo.utils import counters

import gradspec
import matrix_references as ref
from gradspec.compiler import backends, shaped
from gradspec.compiler.ir import build
from gradspec.compiler.lower import lower_step
from gradspec.compiler.lowerer import BucketShape
from test_matrix_parity import MATRIX_CASES, _spec_hyper, assert_close, gradspec_optimizer
from test_matrix_references import train

# A tensor of every kind of blocking at B = 4: one block (3x4), blocks of one shape (8x4, two
# of them, laid out together), four block shapes (10x6: 4x4, 4x2, 2x4, 2x2), a conv kernel
# seen as 5 x 18, a vector of 9 (1 x 4, 1 x 4, 1 x 1) and one that is a single block.
SHAPES = [(3, 4), (8, 4), (8, 4), (10, 6), (5, 2, 3, 3), (9,), (2,)]
BLOCK = 4

GRAFTED = """
optimizer blocked_grafted_adagrad

hyper lr = 0.05 >= 0
hyper eps = 1e-6 > 0
hyper block: int = 4 >= 1

state m = 0
m' = 0.9 * m + grad
blocks block {
    state L: (rows, rows) = 0
    state seen: tensor = 0
    L' = L + grad @ transpose(grad)
    seen' = seen + tensor.numel
    direction = inv_root(L' + eps * eye(rows), 2) @ m'
    scale = tensor.norm(m') / (tensor.norm(direction) + eps)
}
param' = param - lr * scale * direction
"""


def _blocks(matrix, size):
    rows, cols = matrix.shape
    return [(slice(r, min(r + size, rows)), slice(c, min(c + size, cols)))
            for r in range(0, rows, size) for c in range(0, cols, size)]


class BlockedGraftedAdagrad(torch.optim.Optimizer):
    """The spec above, transcribed: per block B of the matrix view of m (the momentum sum), the
    left AdaGrad statistic L of the gradient's block G and the direction (L + eps I)^(-1/2) B
    rescaled to B's norm."""

    def __init__(self, params, lr, eps, block):
        super().__init__(params, dict(lr=lr, eps=eps, block=block))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(m=torch.zeros_like(p), L={}, seen={})
                state["m"] = 0.9 * state["m"] + p.grad
                g, m = (ref.as_matrix(x) if p.dim() >= 2 else x.reshape(1, -1) for x in (p.grad, state["m"]))
                out = torch.empty_like(m)
                for rows, cols in _blocks(g, group["block"]):
                    gb, mb = g[rows, cols], m[rows, cols]
                    key = (rows.start, cols.start)
                    state["L"][key] = state["L"].get(key, 0) + gb @ gb.mT
                    state["seen"][key] = state["seen"].get(key, 0) + gb.numel()
                    evals, evecs = torch.linalg.eigh(state["L"][key] + group["eps"] * torch.eye(gb.shape[0],
                                                                                                dtype=gb.dtype))
                    direction = (evecs * evals.pow(-0.5)) @ evecs.mT @ mb
                    out[rows, cols] = direction * (mb.norm() / (direction.norm() + group["eps"]))
                p.sub_(group["lr"] * out.reshape(p.shape))


def _tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_() for shape in SHAPES]


def _run(make, steps, seed=0):
    params = _tensors(seed)
    opt = make(params)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        for p in params:  # a gradient that moves with the parameter: the statistics see both
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.1 * p.detach()
        opt.step()
    return params, opt


def _max_relative(ours, theirs):
    return max(float((a.detach() - b.detach()).abs().max() / b.detach().abs().max()) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("backend", ["eager", pytest.param("compiled", marks=pytest.mark.compiled)])
def test_a_block_body_matches_a_loop_over_the_blocks(backend):
    steps = 100 if backend == "eager" else 20
    ours, opt = _run(lambda p: gradspec.Optimizer(p, gradspec.parse(GRAFTED), backend=backend), steps)
    theirs, _ = _run(lambda p: BlockedGraftedAdagrad(p, lr=0.05, eps=1e-6, block=BLOCK), steps)
    assert _max_relative(ours, theirs) < 1e-10
    assert _max_relative(ours, _tensors()) > 1e-2  # it trained
    # a per-block counter: every block adds its own numel each step
    seen = opt.state[ours[3]]["seen"]  # the 10x6 tensor: 4x4, 4x4, 4x2, 4x2, 2x4, 2x2
    assert seen.tolist() == [steps * n for n in (16, 16, 8, 8, 8, 4)]


def test_a_per_block_state_shows_its_blocks_and_takes_exactly_their_memory():
    params, opt = _run(lambda p: gradspec.Optimizer(p, gradspec.parse(GRAFTED), backend="eager"), 1)
    shapes = {tuple(p.shape): tuple(opt.state[p]["L"].shape) for p in params}
    assert shapes[(3, 4)] == (3, 3)  # one block: its own shape
    assert shapes[(8, 4)] == (2, 4, 4)  # blocks of one shape
    assert shapes[(10, 6)] == (2 * 16 + 2 * 16 + 4 + 4,)  # four block shapes: flat, piece after piece
    assert shapes[(5, 2, 3, 3)] == (4 * 16 + 16 + 4 * 1 + 1,)  # 5 x 18: 4x4 (four), 4x2, 1x4 (four), 1x2
    assert shapes[(9,)] == (3,)  # 1 x 4, 1 x 4, 1 x 1: a 1 x 1 L each
    # the 8x4 tensors' blocks are the rows 0-3 and 4-7: their L are the blocks' Gram matrices
    p = next(q for q in params if q.shape == (8, 4))
    blocks = opt.state[p]["L"]
    torch.testing.assert_close(blocks[1], p.grad[4:] @ p.grad[4:].T)
    declared = sum(opt.state[p]["L"].numel() for p in params)
    assert declared == 9 + 2 * 32 + 72 + 85 + 3 + 1


NEWTON_SCHULZ_PER_BLOCK = """
optimizer blocked_muon

hyper lr = 0.02 >= 0
hyper size: int = 4 >= 1

state buf = 0
buf' = 0.9 * buf + grad
blocks size {
    X = buf' / (tensor.norm(buf') + 1e-7)
    repeat 5 {
        A = X @ transpose(X)
        X' = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    }
}
param' = param - lr * X'
"""


def test_a_loop_inside_a_block_iterates_each_block():
    """Muon's Newton-Schulz iteration written in a block: each block orthogonalised by itself."""
    params = _tensors(2)
    start = [p.detach().clone() for p in params]
    opt = gradspec.Optimizer(params, gradspec.parse(NEWTON_SCHULZ_PER_BLOCK), backend="eager")
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    for p, p0, g in zip(params, start, grads):
        matrix = ref.as_matrix(g) if g.dim() >= 2 else g.reshape(1, -1)
        expected = torch.empty_like(matrix)
        for rows, cols in _blocks(matrix, BLOCK):
            expected[rows, cols] = ref.newton_schulz(matrix[rows, cols], dtype=torch.float64)
        torch.testing.assert_close(p.detach(), p0 - 0.02 * expected.reshape(p.shape), rtol=1e-12, atol=1e-12)


def test_blocks_is_still_a_name():
    """``blocks`` is a keyword only before ``B {``: a spec that names something blocks keeps working."""
    spec = gradspec.parse("optimizer b\nhyper lr = 0.1 >= 0\nhyper blocks = 2 >= 0\n"
                          "step_size = lr * blocks\nparam' = param - step_size * grad\n")
    param = torch.ones(3, dtype=torch.float64, requires_grad=True)
    param.grad = torch.full_like(param, 0.5)
    gradspec.Optimizer([param], spec, backend="eager").step()
    torch.testing.assert_close(param.detach(), torch.full((3,), 0.9, dtype=torch.float64))


# ---- shampoo's blocking, grafting and start step against the reference ------------------------

SHAMPOO = [
    # vectors preconditioned per block (1 x 5 pieces), grafting before and after step 6, coupled decay
    (dict(lr=1e-2, beta2=0.95, precondition_frequency=3, max_preconditioner_dim=5, start_preconditioning_step=6,
          weight_decay=1e-2, precondition_1d=True, weight_decouple=False, beta1=0.0), dict(graft="adam")),
    # filtering without a graft, AdaGrad sums over blocks of 4
    (dict(lr=1e-2, beta1=0.5, beta2=1.0, precondition_frequency=2, max_preconditioner_dim=4,
          precondition_1d=True, weight_decouple=False), dict(graft="none")),
]


@pytest.mark.parametrize("hyper, reference_only", SHAMPOO, ids=["graft-start-1d", "filtered-sum"])
def test_shampoo_blocks_graft_and_start_match_the_reference(hyper, reference_only):
    spec_hyper = {("preconditioning_compute_steps" if k == "precondition_frequency" else k): v
                  for k, v in hyper.items()}
    ours, _ = train(gradspec_optimizer("shampoo", "eager", graft=reference_only["graft"] == "adam", **spec_hyper))
    theirs, _ = train(lambda p: ref.Shampoo(p, **hyper, **reference_only))
    assert_close(ours, theirs, 1e-9)


@pytest.mark.compiled
def test_blocked_grafted_shampoo_matches_the_reference_compiled():
    """The first shampoo case of test_matrix_parity (blocks, EMA, filtering, Adam graft), compiled
    (that file compiles only each spec's last case)."""
    case = next(c for c in MATRIX_CASES if c.spec == "shampoo" and c.spec_only.get("graft"))
    ours, _ = train(gradspec_optimizer(case.spec, "compiled", **_spec_hyper(case)))
    theirs, _ = train(lambda p: case.reference(p, **case.hyper, **case.reference_only))
    assert_close(ours, theirs, 1e-8)


# ---- batching: one decomposition per block shape, graphs independent of the tensor count ------

def _refresh_graph(count: int, block: int):
    """The main graph of shampoo's refresh step over ``count`` 24 x 20 and ``count`` 24-vectors."""
    program = build(gradspec.load("shampoo"), {"max_preconditioner_dim": block}, probing=frozenset({0}))
    shapes = ((24, 20),) * count + ((24,),) * count
    numel = sum(int(torch.Size(s).numel()) for s in shapes)
    bucket = BucketShape(numel, len(shapes), torch.float64, shapes)
    return lower_step(program, [bucket]).main.graph


def _calls(graph, fn):
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target is fn)


@pytest.mark.parametrize("block, expected", [(1000, 3), (8, 5)])
def test_the_refresh_is_one_eigh_per_block_shape_whatever_the_tensor_count(block, expected):
    """One block per tensor: L, R of the matrices and H of the vectors, three eigh calls. Blocks of
    8: the matrices' 8 x 8 and 8 x 4 blocks are two batches, each with an L (8 x 8) and an R (8 x 8,
    4 x 4); the vectors' 1 x 8 blocks one batch with an H: five calls for 2 tensors as for 18."""
    few, many = _refresh_graph(2, block), _refresh_graph(9, block)
    eigen = shaped.symmetric_eigen  # torch.linalg.eigh, NaN for a non-finite matrix
    assert _calls(few, eigen) == _calls(many, eigen) == expected
    assert len(few.nodes) == len(many.nodes)


NORMALISED = """
optimizer blocked_normalised

hyper lr = 0.1 >= 0

blocks 4 {
    state L: (rows, rows) = 0
    L' = 0.9 * L + grad @ transpose(grad)
    d = L' @ grad / (tensor.norm(L' @ grad) + 1e-8)
}
param' = param - lr * d
"""


@pytest.mark.compiled
def test_compiling_a_blocked_step_does_not_depend_on_the_tensor_count():
    def graphs(count):
        backends._CACHE.clear()
        torch._dynamo.reset()
        counters.clear()
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(8, 12, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(count)]
        opt = gradspec.Optimizer(params, gradspec.parse(NORMALISED), backend="compiled")
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            opt.step()
        return counters["stats"]["unique_graphs"]

    assert graphs(2) == graphs(10) == 1


def test_groups_with_different_block_sizes_each_get_their_own_tiling():
    # the block size shapes the states: it keys the built program like a switch
    def states(grouping):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(9, 7, dtype=torch.float64)) for _ in range(2)]
        opt = gradspec.Optimizer(grouping(params), "shampoo", backend="eager")
        for _ in range(3):
            for p in params:
                p.grad = torch.sin(p.detach() * 3)
            opt.step()
        return [p.detach().clone() for p in params], [opt.state[p]["L"].shape for p in params]

    mixed, mixed_shapes = states(lambda ps: [{"params": [ps[0]], "max_preconditioner_dim": 4},
                                             {"params": [ps[1]], "max_preconditioner_dim": 100}])
    small, small_shapes = states(lambda ps: [{"params": ps, "max_preconditioner_dim": 4}])
    whole, whole_shapes = states(lambda ps: [{"params": ps, "max_preconditioner_dim": 100}])
    assert mixed_shapes == [small_shapes[0], whole_shapes[1]] and small_shapes[0] != whole_shapes[1]
    # the same numbers up to rounding (one tensor is multiplied alone, two are batched)
    assert _max_relative(mixed, small[:1] + whole[1:]) < 1e-12


def test_a_tensor_with_no_elements_has_no_blocks_and_changes_nothing_else():
    """A (0, 3) parameter among others: torch.cat of its (no) blocks used to fail the step."""
    def run(with_empty):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(5, 4, generator=gen, dtype=torch.float64).requires_grad_(),
                  torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_()]
        empty = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
        opt = gradspec.Optimizer(params + [empty] * with_empty, "shampoo", backend="eager", max_preconditioner_dim=2)
        for _ in range(3):
            for p in params + [empty]:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        if with_empty:
            assert opt.state[empty]["L"].numel() == 0
        return [p.detach() for p in params]
    for ours, alone in zip(run(True), run(False)):
        assert torch.equal(ours, alone)
