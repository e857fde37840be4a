"""A comparison's independent runs (variants x seeds, each variant's learning-rate grid, and the
shared-rate runs that control a verdict for the learning rate) as jobs, and the engines that
run them: in this process one after another, in local worker processes
(``concurrent.futures``), or on a Ray cluster.

Every job is self-contained: it names its task (a registered name or ``path.py:function``,
which the worker resolves itself) and builds everything from its seed, so where it runs does
not change what it computes. Each job also sets the number of torch threads it trains with
(``threads``, 1 by default): kernels may add in another order with another thread count, and
two runs that differ in the last bits are not "the same run"; one thread per run also keeps
a busy machine from stalling a run at every barrier of a parallel kernel (on this project's
2-core machine, with the load average at 10, a digits step took 22 to 300 ms with two threads
and 2 to 6 ms with one). More cores go to more runs at once (``workers``).

Timings do not depend on a variant's place in the list: the training jobs go seed by seed,
with the variants' order rotated from one seed to the next, and before a process times its
first run of a variant it trains that variant for a few untimed steps, so one-time costs
(first use of a kernel, of the lowering, of a probe) fall outside every timed run alike.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from ..tasks import Task, get
from .runner import pick_lr, train

WARMUP_STEPS = 3  # untimed steps a process trains a variant for before it times it


@dataclass(frozen=True)
class TaskRef:
    """How a worker finds the task: by name (``tasks.get``, which also loads
    ``path.py:function``), or the Task itself for one that is not registered (it must then
    pickle: a module-level ``make``)."""

    name: str | None = None
    task: Task | None = None

    @staticmethod
    def of(task: str | Task) -> "TaskRef":
        if isinstance(task, str):
            return TaskRef(name=task)
        try:
            registered = get(task.name)
        except ValueError:
            registered = None
        return TaskRef(name=task.name) if registered is task else TaskRef(task=task)

    def resolve(self) -> Task:
        if self.task is not None:
            return self.task
        if self.name not in _RESOLVED:  # a path.py:function task runs its file once per process
            _RESOLVED[self.name] = get(self.name)
        return _RESOLVED[self.name]


_RESOLVED: dict = {}  # task name or path.py:function -> Task, in this process


@dataclass(frozen=True)
class GridJob:
    """One variant's learning-rate grid (one vmapped run, or one run per rate)."""

    task: TaskRef
    variant: str
    grid: tuple
    steps: int
    backend: str
    device: str
    vmap: bool
    threads: int

    @property
    def length(self) -> int:
        return self.steps * len(self.grid)


@dataclass(frozen=True)
class RunJob:
    """One timed run. ``control`` marks a run at another variant's learning rate, trained to
    judge an expectation at a shared rate."""

    task: TaskRef
    variant: str
    seed: int
    steps: int
    lr: float | None
    backend: str
    device: str
    sharpness: bool
    threads: int
    control: bool = False

    @property
    def length(self) -> int:
        return self.steps


_WARM: set = set()  # (task, variant, backend, device, threads) this process has trained untimed


def execute(job: GridJob | RunJob, progress=None):
    """Run one job in this process: an :class:`~.runner.LrGrid` for a GridJob, a
    :class:`~.runner.Run` for a RunJob."""
    import torch
    torch.set_num_threads(job.threads)
    task = job.task.resolve()
    if isinstance(job, GridJob):
        return pick_lr(task, job.variant, list(job.grid), job.steps, job.backend, job.device, progress=progress,
                       vmap=job.vmap)
    key = (task.name, job.variant, job.backend, job.device, job.threads)
    if key not in _WARM:
        train(task, job.variant, job.seed, min(WARMUP_STEPS, job.steps), job.lr, job.backend, job.device)
        _WARM.add(key)
    return train(task, job.variant, job.seed, job.steps, job.lr, job.backend, job.device, job.sharpness, progress)


def rotated(variants: list, seed: int) -> list:
    """The variants in the order seed ``seed`` trains them: shifted by one per seed."""
    shift = seed % max(len(variants), 1)
    return variants[shift:] + variants[:shift]


class Sequential:
    """Every job in this process, one after another, with a progress bar per job."""

    workers = 1
    how = "one after another in this process"

    def map(self, jobs: list, bar) -> list:
        import torch
        threads = torch.get_num_threads()
        try:
            results = []
            for job in jobs:
                with bar(total=job.length, desc=_describe(job)) as counter:
                    results.append(execute(job, counter))
            return results
        finally:
            torch.set_num_threads(threads)


class Processes:
    """Jobs in ``workers`` local processes. On Linux with a CPU device they are forked, as
    torch's DataLoader forks its workers: a child starts at once with torch and gradspec
    already imported, and runs its jobs with the thread count each job sets (one by default,
    so no OpenMP team is inherited half-built). Elsewhere, or for a CUDA device (a forked
    child cannot use a CUDA context its parent made), they are spawned: fresh interpreters
    that import torch first."""

    def __init__(self, workers: int, device: str = "cpu"):
        self.workers = workers
        self.start = "fork" if sys.platform == "linux" and not device.startswith("cuda") else "spawn"
        self.how = f"{workers} at a time in local worker processes"

    def map(self, jobs: list, bar) -> list:
        import concurrent.futures
        import multiprocessing
        results = [None] * len(jobs)
        context = multiprocessing.get_context(self.start)
        with concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=context, initializer=_forget_warm_up) \
                as pool, bar(total=len(jobs), desc=f"runs, {self.workers} workers") as counter:
            futures = {pool.submit(execute, job): i for i, job in enumerate(jobs)}
            for done in concurrent.futures.as_completed(futures):
                results[futures[done]] = done.result()
                if counter is not None:
                    counter.update(1)
        return results


def _forget_warm_up() -> None:
    """A worker warms every variant up itself: what a forked child inherits of its parent's
    warm-up is not its own (thread pools, for one, do not survive a fork)."""
    _WARM.clear()


class RayCluster:
    """Jobs as Ray tasks, each asking for ``threads`` CPUs. ``address`` is passed to
    ``ray.init`` ("auto" for the cluster this machine belongs to, ``ray://host:10001`` for a
    remote one, "local" to start one here); where Ray is already initialised, that session is
    used and left running. The cluster's workers need gradspec installed, and a
    ``path.py:function`` task needs that path to exist on them."""

    def __init__(self, address: str | None):
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--ray needs Ray: pip install 'gradspec[ray]'") from None
        self.address = address
        self.how = f"as Ray tasks ({address or 'the running Ray session'})"
        self.workers = None

    def map(self, jobs: list, bar) -> list:
        import ray
        started = not ray.is_initialized()
        if started:
            ray.init(address=None if self.address in (None, "local") else self.address, log_to_driver=False)
        try:
            remote = ray.remote(execute)
            refs = [remote.options(num_cpus=job.threads).remote(job) for job in jobs]
            with bar(total=len(jobs), desc="runs on Ray") as counter:
                pending = list(refs)
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    if counter is not None:
                        counter.update(len(done))
            return ray.get(refs)
        finally:
            if started:
                ray.shutdown()


def engine(workers: int = 1, ray: str | None = None, device: str = "cpu"):
    """The engine for ``--workers N`` (1: this process) or ``--ray ADDRESS``."""
    if ray is not None:
        return RayCluster(ray)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1 (got {workers})")
    return Sequential() if workers == 1 else Processes(workers, device)


def _describe(job) -> str:
    if isinstance(job, GridJob):
        return f"{job.variant}: lr grid"
    return f"{job.variant} seed {job.seed}" + (f" at lr {job.lr:g}" if job.control else "")
