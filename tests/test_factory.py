"""gradspec.param_groups and gradspec.create_optimizer on a transformer-shaped model."""
import pytest
import torch

import gradspec


class TinyLM(torch.nn.Module):
    """GPT-shaped: tied embedding and head, a transformer block, a final norm named ln_f."""

    def __init__(self, vocab=11, width=8, attention=True):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        # attention's key bias has a gradient of rounding noise only (softmax ignores it), which
        # Adam's normalisation amplifies: parity runs use an MLP block instead
        self.block = torch.nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True) if attention \
            else torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.GELU(), torch.nn.LayerNorm(16),
                                     torch.nn.Linear(16, width))
        self.ln_f = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)

    def forward(self, tokens):
        return self.head(self.ln_f(self.block(self.embed(tokens))))


def _names(model, params):
    ids = {id(p) for p in params}
    return sorted({n for n, p in model.named_parameters() if id(p) in ids})


def test_groups_exempt_biases_and_norms_by_name_and_module_class():
    model = TinyLM()
    decay, exempt = gradspec.param_groups(model, weight_decay=0.1, lr=3e-4)
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0 and decay["lr"] == exempt["lr"] == 3e-4
    assert _names(model, decay["params"]) == ["block.linear1.weight", "block.linear2.weight",
                                              "block.self_attn.in_proj_weight", "block.self_attn.out_proj.weight",
                                              "embed.weight"]
    assert _names(model, exempt["params"]) == [
        "block.linear1.bias", "block.linear2.bias", "block.norm1.bias", "block.norm1.weight", "block.norm2.bias",
        "block.norm2.weight", "block.self_attn.in_proj_bias", "block.self_attn.out_proj.bias", "ln_f.bias",
        "ln_f.weight"]
    assert len(decay["params"]) + len(exempt["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_create_optimizer_equals_torch_adamw_with_the_same_groups():
    torch.manual_seed(0)
    ours, theirs = TinyLM(attention=False).double(), TinyLM(attention=False).double()
    theirs.load_state_dict(ours.state_dict())
    opt = gradspec.create_optimizer(ours, "adamw", weight_decay=0.1, lr=1e-2, backend="eager")
    groups = gradspec.param_groups(theirs, weight_decay=0.1)
    reference = torch.optim.AdamW(groups, lr=1e-2)
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(20):
        for model, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizer.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_create_optimizer_refusals():
    plain = gradspec.parse("optimizer plain\nhyper lr = 0.1 > 0\nparam' = param - lr * grad\n")
    with pytest.raises(ValueError, match="no weight_decay"):
        gradspec.create_optimizer(TinyLM(), plain, weight_decay=0.1)
    with pytest.raises(TypeError, match="nn.Module"):
        gradspec.param_groups([torch.zeros(2)])
    opt = gradspec.create_optimizer(TinyLM(), "lion")
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0


# ---- transformers models built from configs (random weights, nothing downloaded)
def _gpt2():
    import transformers
    config = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    import transformers
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return transformers.BertForSequenceClassification(config)


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_groups_of_transformers_models_exempt_every_bias_and_layernorm(build):
    import transformers
    torch.manual_seed(0)
    model = build()
    decay, exempt = gradspec.param_groups(model, weight_decay=0.1)
    decayed, exempted = _names(model, decay["params"]), _names(model, exempt["params"])
    layernorms = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)
                  for n, _ in module.named_parameters(recurse=False)}
    biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    embeddings = {f"{m}.weight" for m, module in model.named_modules() if isinstance(module, torch.nn.Embedding)}
    assert layernorms and biases and embeddings
    assert set(exempted) == layernorms | biases
    assert embeddings <= set(decayed)  # the policy: embeddings decay, as in the HF Trainer; no_decay can exempt them
    # the HF Trainer's own split agrees, parameter for parameter (it names GPT-2's tied head too)
    trainers = set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in model.named_parameters(remove_duplicate=False)
                                                if n in trainers}
    _, exempt = gradspec.param_groups(model, weight_decay=0.1, no_decay=("bias", "norm", "embedding"))
    assert set(_names(model, exempt["params"])) == layernorms | biases | embeddings


def test_create_optimizer_on_gpt2_equals_torch_adamw_over_the_trainers_groups():
    import transformers
    torch.manual_seed(0)
    ours = _gpt2().double()
    theirs = _gpt2().double()
    theirs.load_state_dict(ours.state_dict())
    opt = gradspec.create_optimizer(ours, "adamw", weight_decay=0.1, lr=1e-2, backend="eager")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, theirs))
    named = list(theirs.named_parameters())
    reference = torch.optim.AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": 0.1},
                                   {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}], lr=1e-2)
    tokens = torch.randint(0, 40, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, optimizer in ((ours, opt), (theirs, reference)):
            optimizer.zero_grad()
            model(input_ids=tokens, labels=tokens).loss.backward()
            optimizer.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert not torch.equal(ours.transformer.wte.weight, _gpt2().double().transformer.wte.weight)
