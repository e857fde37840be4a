"""The byte-level GPT task on the standard library's source: real text, split by file,
nothing downloaded."""
import torch

import gradspec
from gradspec.tasks import text


def test_the_corpus_is_tens_of_megabytes_split_by_file():
    corpus = text.stdlib_corpus()
    assert corpus.files > 500
    assert len(corpus.train) > 10e6
    assert 0.02 < len(corpus.test) / len(corpus.train) < 0.1
    # held-out files are whole files: no file's text opens both a held-out and a training file
    first_test_file = corpus.test.split(b"\0")[0]
    assert len(first_test_file) > 0 and first_test_file not in corpus.train


def test_a_byte_gpt_learns_the_library_in_a_few_steps():
    """The task's recipe at a toy size (the registered sizes are checked below on "meta")."""
    problem = text._byte_lm(0, "cpu", text.GPTSize(width=32, layers=1, heads=2, context=32, batch=16))
    opt = gradspec.Optimizer(problem.params, "adam", backend="eager", lr=1e-2)
    first = problem.validate()
    for step in range(10):
        opt.zero_grad()
        problem.loss(step)[0].backward()
        opt.step()
    assert first > 5.0  # ln 256 = 5.55 at initialisation
    assert problem.validate() < first - 1.0
    assert set(problem.evaluate()) == {"eval_loss", "bits_per_byte"}


def test_the_registered_sizes():
    full = gradspec.tasks.get("stdlib_lm").make(0, "meta")
    small = gradspec.tasks.get("stdlib_lm_small").make(0, "meta")
    assert 10e6 < sum(p.numel() for p in full.params) < 12e6
    assert 0.5e6 < sum(p.numel() for p in small.params) < 1.5e6
