"""The small items around compare: tasks reachable from a bare ``import gradspec`` without
torch, ``gradspec list`` keeping whole sentences, and ``gradspec bench`` explaining its two
rankings."""
import os
import pathlib
import subprocess
import sys

from gradspec.cli import _hanging, first_sentence


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_tasks_are_an_attribute_of_the_package_and_registering_imports_no_torch():
    out = _python("import sys, gradspec\n"
                  "@gradspec.tasks.register('bowl', steps=7)\n"
                  "def bowl(seed, device):\n"
                  "    '''A bowl.'''\n"
                  "print(gradspec.tasks.get('bowl').steps, 'digits' in gradspec.tasks.names(), 'torch' in sys.modules)")
    assert out == "7 True False"


def test_first_sentence_joins_wrapped_lines_and_stops_at_the_sentence_end():
    doc = ("ALTO: the E adaptor on LAMB (Algorithm 2 of Zhao et al.): the gradient-\n"
           "difference EMA steers LAMB along low-loss valleys, with gamma = 0.05. The paper's\n"
           "defaults follow.\n\nSecond paragraph.")
    assert first_sentence(doc) == ("ALTO: the E adaptor on LAMB (Algorithm 2 of Zhao et al.): the "
                                   "gradient-difference EMA steers LAMB along low-loss valleys, with gamma = 0.05.")
    assert first_sentence("No full stop\nat all") == "No full stop at all"


def test_list_wraps_descriptions_instead_of_cutting_them():
    line = _hanging("name  ", "word " * 40 + "end.")
    rows = line.splitlines()
    assert len(rows) > 1 and all(r.startswith("      ") for r in rows[1:])
    assert " ".join(r.strip() for r in rows).endswith("word end.") and line.count("word") == 40
    listing = subprocess.run([sys.executable, "-m", "gradspec.cli", "list"], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "COLUMNS": "100"}).stdout
    # sgd_rms's first sentence spans four lines of its doc, alto's breaks a word with a hyphen
    entries, name = {}, None
    for row in listing.split("\n\n")[0].splitlines():
        if row[:1] != " ":
            name = row.split()[0]
            entries[name] = " ".join(row.split()[2:])
        else:
            entries[name] += " " + row.strip()
    assert entries["sgd_rms"].startswith("The induced metric on an RMSprop")
    assert entries["sgd_rms"].endswith("over the group.")
    assert "gradient-difference EMA" in " ".join(listing.split())


def test_bench_says_why_ratio_and_raw_ms_can_rank_rows_differently():
    from gradspec import bench
    row = {"kind": "gradspec", "first_step_s": 1.0, "bytes_per_param": 28, "roofline_ms": 1.0, "bandwidth_gbs": 9}
    result = {"torch": "x", "device": "cpu", "threads": 2, "params": 1e6, "tensors": 4, "bandwidth_gbs": 9.0,
              "compile": [], "rows": [{**row, "label": "a", "ms": 2.0, "fused_adam_ms": 1.0},   # faster, ratio 2x
                                      {**row, "label": "b", "ms": 3.0, "fused_adam_ms": 2.0}]}  # slower, ratio 1.5x
    text = bench.render(result)
    assert "| a | 2.00 | 2.00x |" in text and "| b | 3.00 | 1.50x |" in text
    header = text.split("| optimizer |")[0]
    assert "smaller ms/step can have the larger ratio" in header and "rank rows by the ratio" in header


def test_the_task_guide_example_runs(tmp_path):
    import re

    import gradspec.tasks as tasks
    from gradspec.compare import compare
    guide = (pathlib.Path(__file__).parent.parent / "docs" / "tasks.md").read_text()
    (tmp_path / "blobs.py").write_text(re.search(r"```python\n(.*?)```", guide, re.S).group(1))
    task = tasks.get(f"{tmp_path / 'blobs.py'}:blobs")
    assert task.metric == "accuracy" and task.description.startswith("A 2-32-3 MLP on three Gaussian blobs")
    problem = task.make(0, "cpu")
    assert problem.validate() != problem.evaluate()["eval_loss"]  # validation and test splits differ
    result = compare(["adam"], f"{tmp_path / 'blobs.py'}:blobs", steps=30, seeds=1, lr=0.05, progress=False)
    assert result.summaries[0].final_loss[0] < result.summaries[0].runs[0].losses[0]
    assert "[docs/tasks.md](docs/tasks.md)" in (pathlib.Path(__file__).parent.parent / "README.md").read_text()
