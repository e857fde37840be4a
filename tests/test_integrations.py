"""Trainers: probe specs in the HF Trainer and Lightning's automatic optimization (accumulation
and clipping kept, evaluations as `gradspec show --cost` declares), plain specs everywhere
torch.optim.AdamW goes (matching it), resuming, and docs/integrations.md's examples, run as
written. Models are built from configs or by hand, data generated here: nothing is downloaded."""
import functools
import importlib
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F

import gradspec
from gradspec.compiler.cost import step_cost
from gradspec.integrations import replay
from gradspec.integrations.lightning import ProbeSteps
from gradspec.runtime.probes import Evaluations


class _OnFirstUse:
    """A module imported when a test first reads from it. transformers' Trainer and lightning
    take about 6 s of CPU to import; with the file in one xdist group below, one worker pays
    that, instead of every worker at collection. Collection looks at every name of this file
    (pytest asks each object for ``_mock_name`` and ``__wrapped__``): a private name is not
    the module's to answer, so it does not import the module."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str):
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        return getattr(importlib.import_module(self._name), attribute)


L = _OnFirstUse("lightning")
transformers = _OnFirstUse("transformers")
hf_integration = _OnFirstUse("gradspec.integrations.transformers")
pytestmark = pytest.mark.xdist_group("integrations")

DOC = pathlib.Path(__file__).parent.parent / "docs" / "integrations.md"
PROBE_SPECS = [("deo(adam)", {"T": 2, "lr": 1e-2}),
               ("sophia", {"k": 2, "lr": 1e-2, "gamma": 0.1}),
               ("sophia_g", {"k": 2, "lr": 1e-2}),
               ("bulk_dom(adam)", {"k": 2, "lanczos_steps": 3, "R": 2, "lr": 1e-2})]
STEPS, ACCUMULATE, MICRO = 4, 2, 4  # optimizer steps, micro-batches per step, rows per micro-batch
MAX_NORM = 0.05  # small enough that the clipping acts


# ---- Evaluations
def test_evaluations_read_and_resume():
    counts = Evaluations()
    counts.closure_calls, counts.gradients, counts.hvps = 6, 6, 3
    assert repr(counts) == "Evaluations(closure_calls=6, gradients=6, hvps=3)"
    restored = Evaluations()
    restored.load(counts.as_dict())
    assert restored == counts and restored.as_dict() == {"closure_calls": 6, "gradients": 6, "hvps": 3}
    restored.load({"closure_calls": torch.tensor(7), "gradients": 7, "hvps": 0})  # a tensor, as a checkpoint may hold
    assert restored.as_dict() == {"closure_calls": 7, "gradients": 7, "hvps": 0}
    for bad, error, message in [({"closure_calls": 1, "gradients": 1}, ValueError, "missing hvps"),
                                ({**counts.as_dict(), "probes": 1}, ValueError, "unknown probes"),
                                ({**counts.as_dict(), "hvps": -1}, ValueError, "hvps must be >= 0"),
                                ({**counts.as_dict(), "hvps": 1.5}, TypeError, "whole number"),
                                ({**counts.as_dict(), "gradients": True}, TypeError, "whole number"),
                                ([6, 6, 3], TypeError, "a dict")]:
        with pytest.raises(error, match=message):
            restored.load(bad)
        assert restored.as_dict() == {"closure_calls": 7, "gradients": 7, "hvps": 0}  # nothing changed


# ---- probe specs in trainers, against one full batch per step with the clipped loss
class Tiny(torch.nn.Module):
    """A classifier the HF Trainer takes (forward(x, labels) -> loss and logits), in float64 so
    that accumulated and full-batch gradients agree to rounding."""

    def __init__(self, dtype=torch.float64, dropout=0.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(12, 5)).to(dtype)

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _data(dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    rows = STEPS * ACCUMULATE * MICRO
    return torch.randn(rows, 6, generator=generator, dtype=dtype), torch.randint(0, 5, (rows,), generator=generator)


def _declared(opt, steps: int) -> dict:
    """`gradspec show --cost`'s figures per step at the optimizer's values, times ``steps`` (a
    multiple of every probe period, so the average is exact)."""
    group = opt.param_groups[0]
    cost = step_cost(opt.spec, {name: group[name] for name in opt.spec.hypers if name in group})
    return {"closure_calls": steps * cost.closure_calls, "gradients": steps * cost.gradients, "hvps": steps * cost.hvps}


def _reference(spec: str, hyper: dict) -> tuple:
    """The same steps outside any trainer: each step's whole batch at once, clipped by norm
    through the loss the closure returns (the gradient's norm taken first)."""
    model, (x, y) = Tiny(), _data()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **hyper)
    scales = []
    for step in range(STEPS):
        rows = slice(step * ACCUMULATE * MICRO, (step + 1) * ACCUMULATE * MICRO)
        grads = torch.autograd.grad(model(x[rows], y[rows])["loss"], list(model.parameters()))
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        scale = min(1.0, MAX_NORM / (float(norm) + 1e-6))
        scales.append(scale)

        def closure():
            out = model(x[rows], y[rows])
            return scale * out["loss"], out["logits"]
        opt.step(closure)
    assert min(scales) < 0.5  # the clipping acted
    return [p.detach().clone() for p in model.parameters()], opt.evaluations.as_dict()


def _hf_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "hf"), max_steps=STEPS, per_device_train_batch_size=MICRO,
                    gradient_accumulation_steps=ACCUMULATE, max_grad_norm=MAX_NORM, report_to="none",
                    save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                    train_sampling_strategy="sequential", lr_scheduler_type="constant")
    return transformers.TrainingArguments(**{**settings, **overrides})


@pytest.mark.parametrize("spec, hyper", PROBE_SPECS, ids=[s for s, _ in PROBE_SPECS])
def test_probe_specs_in_the_hf_trainer_accumulate_and_clip(spec, hyper, tmp_path):
    model, (x, y) = Tiny(), _data()
    opt = gradspec.Optimizer(model.parameters(), spec, backend="eager", **hyper)
    trainer = hf_integration.GradspecTrainer(model=model, args=_hf_args(tmp_path), optimizers=(opt, None),
                                             train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)])
    trainer.train()
    expected, expected_counts = _reference(spec, hyper)
    assert opt.evaluations.as_dict() == _declared(opt, STEPS) == expected_counts
    for ours, theirs in zip(model.parameters(), expected):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-9, atol=1e-11)
    assert opt._optimizer_step_pre_hooks == {}  # released after train()


@functools.cache
def _tiny_module_class():
    """TinyModule, a LightningModule (so defined on first use: see _OnFirstUse)."""

    class TinyModule(ProbeSteps, L.LightningModule):
        def __init__(self, spec: str, hyper: dict, dtype=torch.float64, optimizer=None):
            super().__init__()
            self.model, self.spec, self.hyper, self.optimizer = Tiny(dtype), spec, hyper, optimizer

        def training_step(self, batch, batch_idx):
            out = self.model(*batch)
            self.log("train_loss", out["loss"])
            return out

        def configure_optimizers(self):
            if self.optimizer is not None:  # a torch.optim class, for the twin runs
                return self.optimizer(self.parameters(), **self.hyper)
            return gradspec.Optimizer(self.parameters(), self.spec, backend="eager", **self.hyper)

    return TinyModule


def tiny_module(*args):
    return _tiny_module_class()(*args)


def _lightning(tmp_path, **overrides):
    settings = dict(max_steps=STEPS, accumulate_grad_batches=ACCUMULATE, gradient_clip_val=MAX_NORM,
                    accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    return L.Trainer(**{**settings, **overrides})


def _loader(dtype=torch.float64):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(dtype)), batch_size=MICRO)


@pytest.mark.parametrize("spec, hyper", PROBE_SPECS, ids=[s for s, _ in PROBE_SPECS])
def test_probe_specs_in_lightning_automatic_optimization_accumulate_and_clip(spec, hyper, tmp_path, monkeypatch):
    logged = []
    log = L.LightningModule.log
    monkeypatch.setattr(L.LightningModule, "log", lambda self, *a, **k: logged.append(a[0]) or log(self, *a, **k))
    module = tiny_module(spec, hyper)
    trainer = _lightning(tmp_path)
    trainer.fit(module, _loader())
    opt = trainer.optimizers[0]
    expected, expected_counts = _reference(spec, hyper)
    assert opt.evaluations.as_dict() == _declared(opt, STEPS) == expected_counts
    for ours, theirs in zip(module.parameters(), expected):
        torch.testing.assert_close(ours.detach(), theirs, rtol=1e-9, atol=1e-11)
    assert logged == ["train_loss"] * STEPS * ACCUMULATE  # the replays' own self.log calls are silenced


def test_replays_draw_the_trainers_dropout_masks(tmp_path, monkeypatch):
    """A replayed micro-batch has the loss the Trainer computed on it (with dropout 0.5), and
    the replay leaves the global random state as it found it."""
    checked = []
    record = replay.ProbeStepper.record

    def record_and_replay(self, batch):
        before = torch.get_rng_state()
        with torch.enable_grad():
            unseeded, _ = batch.rerun(False)  # from the state the Trainer's forward left
            torch.set_rng_state(before)
            with batch.rng.restored():
                replayed, _ = batch.rerun(False)
        assert torch.equal(torch.get_rng_state(), before)  # the replay leaves the state as it found it
        checked.append((replayed.item(), batch.loss.item(), unseeded.item()))
        record(self, batch)

    monkeypatch.setattr(replay.ProbeStepper, "record", record_and_replay)
    model, (x, y) = Tiny(dropout=0.5), _data()
    opt = gradspec.Optimizer(model.parameters(), "deo(adam)", T=1, backend="eager")
    trainer = hf_integration.GradspecTrainer(model=model, args=_hf_args(tmp_path, max_steps=2),
                                             optimizers=(opt, None), train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)])
    trainer.train()
    assert len(checked) == 2 * ACCUMULATE
    for replayed, trained, unseeded in checked:
        assert replayed == trained  # the same dropout masks, bit for bit
        assert unseeded != trained  # without the saved state the masks differ (the check can fail)


def test_settings_that_cannot_combine_with_probes_are_refused(tmp_path):
    model, (x, y) = Tiny(), _data()
    opt = gradspec.Optimizer(model.parameters(), "sophia", backend="eager")
    trainer = hf_integration.GradspecTrainer(model=model, args=_hf_args(tmp_path), optimizers=(opt, None),
                                             train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")  # what fp16=True sets up (CPU fp16 is refused earlier)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="fp16=True"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        _lightning(tmp_path, gradient_clip_algorithm="value").fit(tiny_module("sophia", {}), _loader())


def test_probe_specs_without_the_integration_stop_in_the_hf_trainer(tmp_path):
    model, (x, y) = Tiny(), _data()
    opt = gradspec.Optimizer(model.parameters(), "sophia", backend="eager")
    trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path), optimizers=(opt, None),
                                   train_dataset=[{"x": a, "labels": b} for a, b in zip(x, y)])
    with pytest.raises(RuntimeError, match="call step"):
        trainer.train()


# ---- plain specs need no integration: the same parameters as torch.optim.AdamW, float32
class AdamWFromSpec(torch.optim.AdamW):
    """torch.optim.AdamW taking gradspec.Optimizer's arguments, for the twin runs."""

    def __init__(self, params, spec="adamw", *, lr, backend=None, **hyper):
        assert spec == "adamw"
        super().__init__(params, lr=lr, **hyper)


def _assert_twins(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=2.4e-7, atol=1e-7)  # 2 ulp
    assert not torch.equal(next(iter(ours)).detach(), Tiny(torch.float32).net[0].weight)  # it trained


@pytest.mark.parametrize("how", ["optimizers", "optimizer_cls_and_kwargs"])
def test_plain_specs_in_the_hf_trainer_equal_torch_adamw(how, tmp_path):
    x, y = _data(torch.float32)
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(optimizer_class):
        model = Tiny(torch.float32)
        kwargs = {"spec": "adamw", "lr": 1e-2, "backend": "eager"}
        if how == "optimizers":
            opt = optimizer_class(model.parameters(), **kwargs)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 2))
            trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path), train_dataset=data,
                                           optimizers=(opt, sched))
        else:
            trainer = transformers.Trainer(model=model, args=_hf_args(tmp_path, weight_decay=0.1), train_dataset=data,
                                           optimizer_cls_and_kwargs=(optimizer_class, kwargs))
        trainer.train()
        if how == "optimizer_cls_and_kwargs":  # the Trainer's groups: decay, and biases without
            assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
        return list(model.parameters())

    _assert_twins(run(gradspec.Optimizer), run(AdamWFromSpec))


def test_plain_specs_in_lightning_equal_torch_adamw(tmp_path):
    runs = []
    for optimizer in (None, AdamWFromSpec):
        module = tiny_module("adamw", {"lr": 1e-2}, torch.float32, optimizer)
        _lightning(tmp_path).fit(module, _loader(torch.float32))
        runs.append(list(module.parameters()))
    _assert_twins(*runs)


# ---- resuming
@pytest.mark.parametrize("spec", ["adamw", "deo(adam)"])
def test_hf_trainer_resumes_from_a_checkpoint(spec, tmp_path):
    x, y = _data()
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]

    def run(out, resume=None, steps=STEPS):
        model = Tiny()
        opt = gradspec.Optimizer(model.parameters(), spec, lr=1e-2, backend="eager",
                                 **({"T": 2} if spec != "adamw" else {}))
        args = _hf_args(tmp_path, output_dir=str(tmp_path / out), max_steps=steps, save_strategy="steps",
                        save_steps=2)
        trainer = hf_integration.GradspecTrainer(model=model, optimizers=(opt, None), train_dataset=data, args=args)
        trainer.train(resume_from_checkpoint=resume)
        return [p.detach().clone() for p in model.parameters()]

    straight = run("straight")
    run("first", steps=2)
    resumed = run("second", resume=str(tmp_path / "first" / "checkpoint-2"))
    assert not torch.equal(straight[0], Tiny().net[0].weight)  # it trained
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec, hyper", [("adamw", {"lr": 1e-2}), ("sophia", {"k": 2, "lr": 1e-2})])
def test_lightning_resumes_with_clipping_and_accumulation(spec, hyper, tmp_path):
    """Two epochs of two steps each, straight or resumed from the first epoch's checkpoint."""
    def run(epochs, ckpt_path=None, root="straight"):
        module = tiny_module(spec, hyper)
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / root), save_last=True)
        trainer = _lightning(tmp_path, max_steps=-1, max_epochs=epochs, enable_checkpointing=True,
                             callbacks=[checkpoints])
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=8),
                    ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = run(2)
    run(1, root="first")
    resumed, trainer = run(2, ckpt_path=str(tmp_path / "first" / "last.ckpt"), root="second")
    assert trainer.global_step == 2 * STEPS * ACCUMULATE * MICRO // (8 * ACCUMULATE)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# ---- plain specs where torch.optim.AdamW goes: the doc's examples, and the same with AdamW
def doc_example(name: str) -> str:
    blocks = dict(re.findall(r"<!-- test: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S))
    return blocks[name]


def run_doc_example(name: str, folder, monkeypatch) -> dict:
    """Run the example in ``folder``, seeded, and return its variables."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    torch.manual_seed(0)
    variables = {"__name__": f"docs_integrations_{name}"}
    exec(compile(doc_example(name), f"{DOC}:{name}", "exec"), variables)
    return variables


def with_torch_adamw(monkeypatch) -> None:
    """gradspec.Optimizer builds torch.optim.AdamW instead (same parameters and lr), so an
    example can run again as its torch.optim twin."""
    monkeypatch.setattr(gradspec, "Optimizer", AdamWFromSpec)


def _twins(name: str, tmp_path, monkeypatch) -> tuple:
    """The example as written, and again with torch.optim.AdamW: the same parameters."""
    ours = run_doc_example(name, tmp_path / "gradspec", monkeypatch)
    with monkeypatch.context() as patch:
        with_torch_adamw(patch)
        theirs = run_doc_example(name, tmp_path / "torch", patch)
    for (label, a), b in zip(ours["model"].named_parameters(), theirs["model"].parameters()):
        torch.testing.assert_close(a, b, rtol=2.4e-7, atol=1e-7, msg=label)  # 2 ulp
    return ours, theirs


def _steps(opt) -> int:
    opt = replay.gradspec_optimizer(opt)
    return int(next(iter(opt.state.values()))["step"])


def test_doc_hf_trainer_plain_spec_example(tmp_path, monkeypatch):
    ours = run_doc_example("hf_plain", tmp_path, monkeypatch)
    opt = replay.gradspec_optimizer(ours["trainer"].optimizer)  # optimizer_cls_and_kwargs built it
    assert opt.spec.name == "adamw" and _steps(opt) == 2 and _steps(ours["opt"]) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0] and ours["trainer"].state.global_step == 2
    assert ours["sched"].last_epoch == 2  # the first trainer stepped its scheduler


def test_doc_accelerate_example_matches_torch_adamw_and_reloads(tmp_path, monkeypatch):
    ours, _ = _twins("accelerate", tmp_path, monkeypatch)
    opt = ours["opt"].optimizer
    assert _steps(opt) == 4  # 8 batches, accumulated in pairs
    saved = torch.load(tmp_path / "gradspec" / "accelerate_state" / "optimizer.bin", weights_only=True)
    fresh = gradspec.Optimizer(ours["model"].parameters(), "adamw", lr=1e-3, backend="eager")
    fresh.load_state_dict(saved)
    for p in ours["model"].parameters():
        torch.testing.assert_close(fresh.state[p]["v"], opt.state[p]["v"], rtol=0, atol=0)


def test_doc_amp_example_matches_torch_adamw(tmp_path, monkeypatch):
    ours, theirs = _twins("amp", tmp_path, monkeypatch)
    assert ours["scaler"].get_scale() == theirs["scaler"].get_scale() and _steps(ours["opt"]) == 4


@pytest.mark.compiled
def test_doc_compile_example_matches_torch_adamw(tmp_path, monkeypatch):
    ours, _ = _twins("compile", tmp_path, monkeypatch)
    assert _steps(ours["opt"]) == 4


@pytest.mark.parametrize("name, steps", [("hf_probes", 2), ("lightning_automatic", 4)])
def test_doc_probe_examples_count_what_show_cost_declares(name, steps, tmp_path, monkeypatch):
    variables = run_doc_example(name, tmp_path / name, monkeypatch)
    opt = variables["opt"] if "opt" in variables else variables["trainer"].optimizers[0]
    groups = len(opt.param_groups)
    declared = _declared(opt, steps)
    # the step's own gradient is one per step; each group runs its own probes
    declared = {key: steps + groups * (value - steps) if key != "hvps" else groups * value
                for key, value in declared.items()}
    assert opt.evaluations.as_dict() == declared


def test_doc_lightning_manual_example_steps_sophia_with_a_closure(tmp_path, monkeypatch):
    variables = run_doc_example("lightning_manual", tmp_path / "manual", monkeypatch)
    opt = variables["trainer"].optimizers[0]
    assert variables["trainer"].global_step == 4
    assert opt.evaluations.as_dict() == _declared(opt, 4) == {"closure_calls": 4, "gradients": 4, "hvps": 2}
