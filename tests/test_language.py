"""The language front end: parsing, located errors with hints, resolution, adaptors, the IR."""
import pytest

import gradspec
from gradspec import stdlib
from gradspec.compiler.ir import Scope, build
from gradspec.dsl import printer

HEADER = "optimizer t\nhyper lr = 0.1 >= 0\n"


def error_of(text, filename="t.opt"):
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.check(gradspec.parse(text, filename))
    return info.value


def test_every_stdlib_spec_round_trips_through_the_printer():
    """That every stdlib spec passes the checker is test_symbolic.py's
    test_every_stdlib_spec_passes_and_its_laws_are_proven_quickly; here, the printer."""
    for name in stdlib.names():
        spec = gradspec.load(name)
        text = printer.spec(spec)
        if any("." in getattr(i, "name", "") for _, i in spec.items):
            continue  # an expanded composition prints adaptor-namespaced names, for reading only
        again = gradspec.parse(text)
        assert again.hyper_defaults == spec.hyper_defaults
        assert [printer.item(i) for _, i in again.items] == [printer.item(i) for _, i in spec.items]


def test_unknown_name_is_located_with_a_suggestion():
    err = error_of(HEADER + "hyper beta1 = 0.9 in [0, 1)\nstate m = 0\nm' = bta1 * m\nparam' = param - lr * m'\n")
    assert (err.line, err.column, err.code) == (5, 6, "GS030")
    assert err.hint == "did you mean 'beta1'?"
    rendered = str(err)
    assert rendered.startswith("t.opt:5:6: error[GS030]: unknown name 'bta1'")
    assert "m' = bta1 * m" in rendered and "     ^^^^" in rendered


def test_all_errors_of_a_spec_are_reported_together_in_source_order():
    err = error_of(HEADER + "state m = 0\nx = sqr(grad)\nparam' = param - lrr * grad\n")
    codes = [(d.code, d.line) for d in err.diagnostics]
    assert codes == [("GS040", 3), ("GS051", 4), ("GS030", 5)]


@pytest.mark.parametrize("text, code, hint_part", [
    (HEADER + "param' = param - lr * grad ** 2\n", "GS002", "'^'"),
    (HEADER + "param' = param - lr * (grad\n", "GS002", "')'"),
    (HEADER + "if true { x = 1\n", "GS002", "closing '}'"),
    (HEADER + "param' = param - lr * grad & 1\n", "GS001", "'and'"),
])
def test_syntax_errors_have_hints(text, code, hint_part):
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.parse(text, "s.opt")
    assert info.value.code == code
    assert hint_part in info.value.hint


@pytest.mark.parametrize("body, code", [
    ("hyper beta = 1.5 in [0, 1)\nparam' = param\n", "GS014"),  # default breaks its constraint
    ("hyper lr = 1\nparam' = param\n", "GS010"),  # declared twice
    ("param' = param - lr * tensor.norm(lr)\n", "GS056"),  # reduction of a scalar
    ("param' = param - lr * norm(grad)\n", "GS051"),  # reduction without scope
    ("param' = param - lr * (grad > 0)\n", "GS050"),  # condition used as a number
    ("state m = 0\nm' = m + v'\nstate v = 0\nv' = m' * 2\nparam' = param\n", "GS048"),  # cycle
    ("state m = step\nm' = m\nparam' = param\n", "GS058"),  # step in an initial value
    ("if grad > 0 { x = 1 }\nparam' = param\n", "GS047"),  # runtime value in a condition
    ("x = 1\nx = 2\nparam' = param\n", "GS044"),  # defined twice
    ("x' = 1\nparam' = param\n", "GS041"),  # next value of a non-state
    ("x = 1\n", "GS042"),  # no update
    ("param' = base.grad\n", "GS057"),  # qualified name outside an adaptor
    ("param' = where(grad, 1, 0)\n", "GS053"),
    ("param' = clamp(grad, 1)\n", "GS052"),
])
def test_semantic_errors_have_stable_codes(body, code):
    err = error_of(HEADER + body)
    assert code in [d.code for d in err.diagnostics], str(err)


def test_require_is_checked_for_the_chosen_hyperparameters():
    spec = gradspec.load("sgd")
    gradspec.check(spec)  # the defaults satisfy it
    with pytest.raises(gradspec.SpecError, match="Nesterov momentum needs"):
        build(spec, {"nesterov": True})
    with pytest.raises(ValueError, match="Nesterov momentum needs"):
        gradspec.Optimizer([gradspec_param()], "sgd", nesterov=True, backend="eager")


def gradspec_param():
    import torch
    return torch.zeros(3, requires_grad=True)


def test_order_of_statements_never_changes_meaning():
    a = gradspec.parse(HEADER + "state m = 0\nm' = 0.9 * m + grad\nparam' = param - lr * m'\n")
    b = gradspec.parse(HEADER + "param' = param - lr * m'\nm' = 0.9 * m + grad\nstate m = 0\n")
    assert repr(build(a).next["param"]) == repr(build(b).next["param"])


def test_scopes_are_inferred():
    spec = gradspec.parse(HEADER + "n = global.norm(grad)\nt = tensor.sum(grad)\nc = 1 - 0.9^step\n"
                          "param' = param - lr * grad * n * t / c\n")
    program = build(spec)
    nodes = {n.op: n for n in program.nodes()}
    reduces = {n.attr: n.scope for n in program.nodes() if n.op == "reduce"}
    assert reduces == {("global", "norm"): Scope.GLOBAL, ("tensor", "sum"): Scope.TENSOR}
    assert nodes["pow"].scope == Scope.SCALAR and nodes["pow"].uses_step
    assert program.next["param"].scope == Scope.ELEMENT


def test_compile_time_switches_specialise_the_program():
    adam = gradspec.load("adam")
    assert build(adam).state_names == ("m", "v")
    assert build(adam, {"amsgrad": True}).state_names == ("m", "v", "vmax")
    sgd = gradspec.load("sgd")
    assert build(sgd).state_names == ()
    assert build(sgd, {"momentum": 0.9}).state_names == ("buf",)


def test_common_subexpressions_are_shared_and_constants_folded():
    spec = gradspec.parse(HEADER + "a = grad * (2 + 3)\nb = grad * 5\nparam' = param - lr * (a + b)\n")
    program = build(spec)
    muls = [n for n in program.nodes() if n.op == "mul" and n.scope == Scope.ELEMENT]
    assert len(muls) == 2  # grad * 5 once, lr * (...) once
    assert any(a.op == "const" and a.attr == 5.0 for n in muls for a in n.args)


def test_variants_override_defaults_and_reject_unknown_names():
    spec = gradspec.load("adam(beta2 = 0.95, amsgrad = true)")
    assert spec.hyper_defaults["beta2"] == 0.95 and spec.hyper_defaults["amsgrad"] is True
    assert gradspec.load("adam").with_hyper(lr=0.5).hyper_defaults["lr"] == 0.5
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.load("adam(bta2 = 0.95)")
    assert info.value.code == "GS015" and info.value.hint == "did you mean 'beta2'?"
    with pytest.raises(gradspec.SpecError, match="beta2 in"):
        gradspec.load("adam").with_hyper(beta2=1.0)
    with pytest.raises(gradspec.SpecError, match="unknown spec 'adma'"):
        gradspec.load("adma")


def test_variant_file_and_import(tmp_path):
    (tmp_path / "fast.opt").write_text('"""A fast sgd."""\noptimizer fast = sgd(lr = 0.5, momentum = 0.9)\n')
    (tmp_path / "mine.opt").write_text('import "fast.opt" as fast\noptimizer mine = lookahead(fast)\n')
    spec = gradspec.load(str(tmp_path / "mine.opt"))
    assert spec.name == "mine"
    assert spec.hyper_defaults["lr"] == 0.5 and spec.hyper_defaults["sync_period"] == 5
    assert "lookahead.slow" in build(spec).state_names


def test_adaptor_expansion_namespaces_its_names_and_replaces_base_inputs():
    spec = gradspec.load("clip_grad_norm(adam)")
    program = build(spec)
    # adam's moments see the clipped gradient, not the raw one
    text = "\n".join(line for _, i in spec.items for line in printer.item(i))
    assert "clip_grad_norm.grad = grad * min(1, max_norm / (clip_grad_norm.total + 1e-06))" in text
    assert "m' = beta1 * m + (1 - beta1) * g" in text and "g = clip_grad_norm.grad" in text
    assert program.state_names == ("m", "v")


def test_adaptor_errors():
    with pytest.raises(gradspec.SpecError, match="adaptor 'lookahead' takes one base spec"):
        gradspec.load("lookahead(adam, sgd)")
    with pytest.raises(gradspec.SpecError, match="'adam' is an optimizer, not an adaptor"):
        gradspec.load("adam(sgd)")
    with pytest.raises(gradspec.SpecError, match="both declare 'lr'"):
        _apply("adaptor a(base)\nhyper lr = 1\nparam' = base.param'\n")
    with pytest.raises(gradspec.SpecError, match="unknown name 'direction'") as info:
        _apply("adaptor a(base)\nparam' = param - direction\n")
    assert "base.direction" in info.value.hint
    with pytest.raises(gradspec.SpecError, match="has no input or definition 'gard'"):
        _apply("adaptor a(base)\nbase.gard = grad\n")
    with pytest.raises(ValueError, match="is an adaptor"):
        gradspec.Optimizer([gradspec_param()], "lookahead")


def _apply(text):
    from gradspec.dsl.resolve import apply_adaptor
    return apply_adaptor(gradspec.parse(text), gradspec.load("adam"))


def test_cli_exit_codes_and_no_traceback(tmp_path, capsys, monkeypatch):
    import json
    from gradspec.cli import main
    bad = tmp_path / "bad.opt"
    bad.write_text(HEADER + "param' = param - lr * grad ** 2\n")
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.opt:3:" in err and "Traceback" not in err
    # --all checks what stdlib.names() lists (that all of it passes: test_symbolic.py's
    # test_every_stdlib_spec_passes_and_its_laws_are_proven_quickly)
    with monkeypatch.context() as patched:
        patched.setattr(stdlib, "names", lambda: ["lion", "sgd"])
        assert main(["check", "--all", "--json"]) == 0
    assert [entry["spec"] for entry in json.loads(capsys.readouterr().out)] == ["lion", "sgd"]
    assert main(["check", "--json", "adam", str(bad)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report[0]["ok"] and report[1]["diagnostics"][0]["code"] == "GS002"
    assert main(["show", "lookahead(adam)"]) == 0
    assert "lookahead.slow' = where(" in capsys.readouterr().out
    assert main(["show", "adam"]) == 0
    assert "# decay of the second moment" in capsys.readouterr().out  # the source, comments included
    assert main(["show", "adam", "--python"]) == 0
    out = capsys.readouterr().out
    assert "# scalar phase" in out and "torch.pow" in out
    assert main(["list"]) == 0
    assert "lion" in capsys.readouterr().out
    assert main(["show", "nosuchspec"]) == 1


@pytest.mark.parametrize("expr, problem", [("(-8)^(1/3)", "may be negative under a fractional power"),
                                           ("1 / 0", "may be 0"), ("sqrt(-1)", "may be negative")])
def test_undefined_constant_expressions_are_located_errors_not_nans(expr, problem):
    text = HEADER + f"c = {expr}\nparam' = param - lr * c * grad\n"
    err = error_of(text)
    assert err.code == "GS072" and err.line == 3 and problem in err.message
    with pytest.raises(gradspec.SpecError):  # the optimizer refuses it too, before any step
        gradspec.Optimizer([__import__("torch").ones(2, requires_grad=True)], gradspec.parse(text))


@pytest.mark.parametrize("expr", ["rsqrt(4)", "clamp(0.5, 0, 1)", "2^(1/3)", "lerp(1, 2, 0.5)"])
def test_constant_expressions_that_do_not_fold_still_compile(expr):
    import torch
    spec = gradspec.check(gradspec.parse(HEADER + f"c = {expr}\nparam' = param - lr * c * grad\n"))
    p = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = gradspec.Optimizer([p], spec, backend="eager")
    p.grad = torch.ones_like(p)
    opt.step()  # no crash; the value is whatever torch computes (possibly inf or nan)


def test_bad_type_annotations_are_spec_errors():
    for text in ("optimizer t\nhyper k: float = 1\nparam' = param\n",
                 "optimizer t\nhyper lr = 1\nstate m: matrix = 0\nm' = m\nparam' = param\n"):  # ': tensor' is a per-tensor state
        with pytest.raises(gradspec.SpecError) as info:
            gradspec.parse(text)
        assert info.value.code in ("GS003", "GS004")
