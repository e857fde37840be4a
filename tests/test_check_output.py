"""`gradspec check` says what it proved: each law's outcome, not only `ok`."""
from __future__ import annotations

import json

from gradspec.cli import main

BAD = """optimizer bad
hyper lr = 0.1 >= 0
param' = param - lr * grad
law fixed_point "nothing moves"
law param' == param "it never moves"
"""


def _check(capsys, *argv):
    status = main(["check", *argv])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_a_stdlib_spec_names_the_laws_it_proved(capsys):
    status, out, _ = _check(capsys, "adamw", "adam")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == "adamw: ok, 1 law proved"
    assert lines[1].split()[:6] == ["proved", "equals", "adam", "at", "weight_decay", "="]
    assert "without decay, AdamW is Adam" in lines[1]
    adam = out[out.index("adam: ok"):]
    assert adam.startswith("adam: ok, 2 laws proved")
    assert "proved  fixed_point at weight_decay = 0 \N{EM DASH} at zero gradient nothing moves" in adam
    assert "proved  invariant grad -> k * grad" in adam


def test_a_spec_without_laws_says_so(capsys):
    status, out, _ = _check(capsys, "adafactor")
    assert (status, out) == (0, "adafactor: ok, no laws declared\n")


def test_a_refuted_law_is_named_beside_the_proven_one_and_the_exit_status_stays_1(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.opt").write_text(BAD)
    status, out, err = _check(capsys, "bad.opt")
    assert status == 1
    assert out.splitlines() == ["bad.opt: failed, 1 law proved, 1 law refuted",
                                "  proved   fixed_point \N{EM DASH} nothing moves",
                                "  refuted  param' == param \N{EM DASH} it never moves"]
    assert "error[GS081]" in err
    status, out, _ = _check(capsys, "--json", "bad.opt")
    assert status == 1
    assert json.loads(out)[0]["laws"] == [
        {"law": "fixed_point", "message": "nothing moves", "status": "proved"},
        {"law": "param' == param", "message": "it never moves", "status": "refuted"}]
