"""``gradspec bench``: what it measures and how it pairs its timings (never how fast anything is)."""
import math

import pytest

from gradspec import bench
from gradspec.cli import main


def test_steps_are_interleaved_with_the_references():
    calls = []

    def recorder(name, seconds):
        def one():
            calls.append(name)
            return seconds
        return one

    first, ms, paired = bench.time_paired(recorder("ours", 0.002), {"fused": recorder("fused", 0.001),
                                                                    "copy": recorder("copy", 0.0005)}, steps=4)
    rounds = [["ours", "fused", "copy"], ["fused", "copy", "ours"], ["copy", "ours", "fused"]]
    assert calls[0] == "ours" and calls[1:] == sum((rounds[i % 3] for i in range(7)), [])
    assert (first, ms) == (0.002, 2.0) and paired == {"fused": (1.0, 1.0), "copy": (0.5, 0.5)}


def test_a_small_run_reports_every_row_with_its_paired_figures():
    result = bench.run(["adam", "lamb"], params=2e4, tensors=4, steps=2, backends=("eager",), peers=False)
    labels = [row["label"] for row in result["rows"]]
    assert labels == ["torch.optim.Adam fused", "torch.optim.Adam foreach", "gradspec adam eager (views)",
                      "gradspec adam eager (copy)", "gradspec lamb eager (views)", "gradspec lamb eager (copy)"]
    by_label = {row["label"]: row for row in result["rows"]}
    assert by_label["gradspec adam eager (views)"]["bytes_per_param"] == 28  # read p g m v, write p m v
    assert by_label["gradspec lamb eager (views)"]["bytes_per_param"] > 28
    for row in result["rows"]:
        assert row["ms"] > 0 and row["fused_adam_ms"] > 0 and math.isfinite(row["bandwidth_gbs"])
        # the roofline is the spec's bytes at the copy speed paired with this row
        assert math.isclose(row["roofline_ms"], row["bytes_per_param"] / 4 * 2e4 * 8 / (row["bandwidth_gbs"] * 1e9)
                            * 1e3 / 2, rel_tol=1e-9)
    text = bench.render(result)
    assert "gradspec lamb eager (copy)" in text and "paired" in text


def test_the_cli_refuses_probe_specs_and_empty_layouts(capsys):
    assert main(["bench", "sophia", "--params", "1000"]) == 2
    assert "evaluates the model" in capsys.readouterr().err
    assert main(["bench", "adam", "--tensors", "0"]) == 2


def test_periodic_work_without_model_evaluations_is_benched(capsys):
    # shampoo's `every k { }` refresh evaluates nothing: its ordinary step is timed like any other
    assert main(["bench", "shampoo", "--params", "2000", "--tensors", "2", "--steps", "1",
                 "--backends", "eager", "--no-peers"]) == 0
    assert "gradspec shampoo eager (views)" in capsys.readouterr().out


@pytest.mark.compiled  # its child processes compile (conftest.py cannot see them)
def test_compile_times_are_taken_in_fresh_processes_for_a_first_and_a_second_graph(monkeypatch):
    monkeypatch.setattr(bench, "_optional_package", lambda name: None)  # no peer package installed
    result = bench.run(["sgd"], params=1e3, tensors=2, steps=1, backends=("eager",), compile_tensors=(3,))
    assert not [row for row in result["rows"] if row["kind"] == "peer"]
    [entry] = result["compile"]  # a missing peer package must not drop the compile rows
    assert entry["spec"] == "sgd" and entry["tensors"] == 3
    for key in ("cold_s", "warm_s", "cold_started_s", "warm_started_s"):
        assert entry[key] > 0, key
    assert "| sgd | 3 |" in bench.render(result)


def test_peer_rows_come_from_every_installed_package_that_has_the_method(monkeypatch):
    """HeavyBall and pytorch-optimizer rows for a spec both have; a package that is not
    installed leaves its row out, not the run."""
    installed = {"pytorch_optimizer"}
    real = bench._optional_package
    monkeypatch.setattr(bench, "_optional_package", lambda name: real(name) if name in installed else None)
    monkeypatch.setitem(bench.PEERS, "adam", [bench.Peer("pytorch_optimizer", "AdamP"),
                                              bench.Peer("heavyball", "AdamW", (("weight_decay", 0.0),))])
    result = bench.run(["adam"], params=2e3, tensors=2, steps=1, backends=("eager",))
    peers = [row["label"] for row in result["rows"] if row["kind"] == "peer"]
    assert peers == ["pytorch_optimizer.AdamP"]
