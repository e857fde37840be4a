"""Parameters keep storage that every checkpoint library accepts.

After a few steps, each common way of saving a model (safetensors, accelerate's
``save_state`` with its defaults, ``torch.save``, transformers' ``save_pretrained``) must save
and restore every parameter exactly, as it does under torch.optim. When the parameters were
views of one flat buffer, safetensors refused the model and accelerate kept one tensor of
four. Now each parameter has a storage object of its own over its part of the flat buffer,
so the step still writes it in place.
"""
import pytest
import torch

import gradspec

safetensors_torch = pytest.importorskip("safetensors.torch")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _trained(steps=3, **options):
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adamw", backend="eager", lr=0.05, **options)
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(1)), torch.randn(16, 3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module):
    saved, restored = dict(a.named_parameters()), dict(b.named_parameters())
    assert saved.keys() == restored.keys()
    for name, p in saved.items():
        assert torch.equal(p, restored[name]), name


def test_parameters_keep_their_own_storage_over_the_flat_buffer():
    model, opt = _trained()
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(pointers)) == len(pointers)
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    # and the step writes them in place: their memory is the flat buffer's, no copy is kept
    (plan,) = opt._plans.values()
    (bucket,) = plan.buckets
    start, end = bucket.param.data_ptr(), bucket.param.data_ptr() + bucket.param.nbytes
    assert all(start <= p.data_ptr() < end for p in model.parameters())


def test_safetensors_save_model_and_load_model(tmp_path):
    model, _ = _trained()
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    fresh = _model(seed=1)
    missing, unexpected = safetensors_torch.load_model(fresh, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    _same_parameters(model, fresh)


def test_torch_save_of_model_and_optimizer_resumes_bit_for_bit(tmp_path):
    model, opt = _trained()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    resumed = _model(seed=1)
    resumed_opt = gradspec.Optimizer(resumed.parameters(), "adamw", backend="eager", lr=0.05)
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    _same_parameters(model, resumed)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for m, o in ((model, opt), (resumed, resumed_opt)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    _same_parameters(model, resumed)


def test_a_parameter_written_between_steps_is_what_the_next_step_updates():
    """Loading weights into the model (or an EMA swap) between steps writes the parameters'
    own storage; the step must start from those values, not from its flat copy."""
    model, opt = _trained()
    reference_model, reference_opt = _trained()
    weights = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    for m in (model, reference_model):
        m.load_state_dict(weights)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=0.05)
    reference.load_state_dict(reference_opt.torch_state_dict())
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for m, o in ((model, opt), (reference_model, reference)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accelerate_save_state_and_load_state_with_defaults(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = _model()
    opt = gradspec.Optimizer(model.parameters(), "adamw", backend="eager", lr=0.05)
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, opt)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(3):
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.mse_loss(model(x), y))
        opt.step()
    accelerator.save_state(str(tmp_path / "state"))  # safetensors by default
    fresh = _model(seed=1)
    fresh_opt = gradspec.Optimizer(fresh.parameters(), "adamw", backend="eager", lr=0.05)
    second = accelerate.Accelerator(cpu=True)
    fresh, fresh_opt = second.prepare(fresh, fresh_opt)
    second.load_state(str(tmp_path / "state"))
    _same_parameters(model, fresh)
    for p, q in zip(model.parameters(), fresh.parameters()):
        for name in ("m", "v"):
            assert torch.equal(opt.state[p][name], fresh_opt.state[q][name])


def test_transformers_save_pretrained_and_from_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    opt = gradspec.Optimizer(model.parameters(), "adamw", backend="eager", lr=0.05)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path / "gpt")  # safetensors by default
    restored = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt")
    _same_parameters(model, restored)


def _probing(model, seed=0):
    return gradspec.Optimizer(model.parameters(), "sophia", backend="eager", lr=0.01, seed=seed)


def _closure(model, opt, x, y):
    def closure():  # returns the loss without backward(): sophia differentiates it itself
        return torch.nn.functional.mse_loss(model(x), y)
    return closure


def test_evaluation_counts_resume_with_the_state_dict():
    model = _model()
    opt = _probing(model)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
    assert opt.evaluations.closure_calls > 0 and opt.evaluations.hvps > 0
    resumed_model = _model()
    resumed = _probing(resumed_model)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.evaluations == opt.evaluations
    assert "evaluations" not in repr(resumed) and "Evaluations(" in repr(resumed.evaluations)
    resumed.step(_closure(resumed_model, resumed, x, y))
    assert resumed.evaluations.closure_calls > opt.evaluations.closure_calls


def test_bad_evaluation_counts_are_refused_before_anything_changes():
    model = _model()
    opt = _probing(model)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    opt.step(_closure(model, opt, x, y))
    saved = opt.state_dict()
    saved["param_groups"][0]["evaluations"] = torch.tensor([1, -2, 0])
    fresh = _probing(_model())
    with pytest.raises(ValueError, match="evaluation counts"):
        fresh.load_state_dict(saved)
    assert fresh.evaluations.closure_calls == 0 and not fresh.state
