"""`gradspec show --latex` reads like the paper's algorithm box: the update in the order the
spec writes it, every branch as cases, and no two quantities printed as one symbol."""
from __future__ import annotations

from gradspec.cli import main

AMSGRAD_CASES = (r"\hat{v} &= \begin{cases} \frac{\mathrm{vmax}_{t}}{1 - \beta_{2}^{t}} & \text{if } \mathrm{amsgrad} "
                 r"\\ \frac{v_{t}}{1 - \beta_{2}^{t}} & \text{otherwise} \end{cases}")


def _latex(capsys, spec: str) -> list[str]:
    assert main(["show", spec, "--latex"]) == 0
    return [line.removesuffix(r" \\") for line in capsys.readouterr().out.splitlines()]


def test_adam_updates_the_parameter_first_and_shows_the_amsgrad_branch(capsys):
    lines = _latex(capsys, "adam")
    assert lines[-2] == r"\theta_{t} &= \theta_{t-1} - \eta \cdot \mathrm{direction}"
    assert AMSGRAD_CASES in lines
    # the state only AMSGrad keeps, with its condition
    assert r"\mathrm{vmax}_{t} &= \max\left(\mathrm{vmax}_{t-1}, v_{t}\right) \quad \text{if } \mathrm{amsgrad}" in lines
    # terms and factors as written: beta1 m + (1 - beta1) g, not SymPy's order
    assert r"m_{t} &= \beta_{1} m_{t-1} + \left(1 - \beta_{1}\right) \tilde{g}" in lines


def test_adamw_decays_the_parameter_it_writes_first(capsys):
    lines = _latex(capsys, "adamw")
    assert lines[-2] == (r"\theta_{t} &= \theta_{t-1} \left(1 - \eta \cdot \mathrm{weight\_decay}\right) "
                         r"- \eta \cdot \mathrm{direction}")
    assert AMSGRAD_CASES in lines
    assert r"m_{t} &= \beta_{1} m_{t-1} + \left(1 - \beta_{1}\right) g_{t}" in lines


def test_a_definition_named_g_is_not_printed_as_the_gradient(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.opt").write_text("optimizer mine\nhyper lr = 0.1 >= 0\ng = 2 * grad\nparam' = param - lr * g\n")
    lines = _latex(capsys, "mine.opt")
    assert lines[1:-1] == [r"\tilde{g} &= 2 \cdot g_{t}", r"\theta_{t} &= \theta_{t-1} - \eta \tilde{g}"]


def test_a_numeric_condition_and_its_negation_read_as_conditions(capsys):
    lines = _latex(capsys, "sgd")
    assert r"\mathrm{direction} &= \tilde{g} \quad \text{if } \mathrm{momentum} = 0" in lines
    assert any(line.startswith(r"\mathrm{buf}_{t} &= ") and line.endswith(r"\quad \text{if } \mathrm{momentum} \neq 0")
               for line in lines)
