"""Hostile and broken inputs: a planted cache file, paths that are not spec files, imports
that loop, text that is not UTF-8, files full of syntax errors, and the cost of starting
the command line. Each must give a short, located error (or nothing at all from the
cache), never code run on someone else's behalf, a traceback or a hang.
"""
import json
import os
import pickle
import stat
import subprocess
import sys
import time

import lark
import pytest

import gradspec
from gradspec import cache
from gradspec.cli import main
from gradspec.dsl import parser
from gradspec.dsl.files import MAX_SPEC_BYTES

H = "optimizer t\nhyper lr = 0.1 >= 0\n"
U = "param' = param - lr * grad\n"


def _error(load_what) -> gradspec.SpecError:
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.load(load_what)
    return info.value


def _run(code: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (killed after ``timeout`` seconds: a hang fails)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


# ---- the cache folder ---------------------------------------------------------------------


class _Payload:
    """Unpickling this makes the folder ``marker``: proof that a planted pickle ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _isa_memo_name() -> str:
    from gradspec.compiler.backends import _isa_memo
    return _isa_memo()


def _plant(folder, marker) -> list:
    """A payload under every name gradspec has read from the cache folder: Lark's grammar
    cache (a hash line, then pickles, as Lark writes it) and the Inductor ISA memo."""
    payload = b"0" * 64 + b"\n" + pickle.dumps(_Payload(str(marker))) * 2
    names = [f"grammar-lark-{lark.__version__}.pickle", _isa_memo_name()]
    for name in names:
        (folder / name).write_bytes(payload)
    return names


@pytest.fixture
def inductor_isa_switch():
    import torch._inductor.config as config
    saved = config.cpp.vec_isa_ok
    config.cpp.vec_isa_ok = None
    yield config.cpp
    config.cpp.vec_isa_ok = saved


@pytest.mark.parametrize("mode", [0o700, 0o777], ids=["private", "world-writable"])
def test_a_planted_cache_file_never_runs(tmp_path, monkeypatch, mode, inductor_isa_switch):
    from gradspec.compiler.backends import trust_known_vector_isa

    folder, marker = tmp_path / "cache", tmp_path / "payload-ran"
    folder.mkdir()
    _plant(folder, marker)
    folder.chmod(mode)
    monkeypatch.setenv("GRADSPEC_CACHE_DIR", str(folder))
    parser._lark.cache_clear()
    try:
        assert gradspec.parse(H + U).name == "t"
        with pytest.raises(gradspec.SpecError):
            gradspec.parse(H + "x = grad ** 2\n" + U)
        gradspec.load("lookahead(adam)")
        trust_known_vector_isa()
    finally:
        parser._lark.cache_clear()
    assert not marker.exists()
    # a memo is trusted for its existence alone, and only in a folder nobody else can write
    assert inductor_isa_switch.vec_isa_ok is (True if mode == 0o700 else None)


def test_the_parser_keeps_no_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADSPEC_CACHE_DIR", str(tmp_path))
    parser._lark.cache_clear()
    try:
        assert not parser._lark().options.cache
        gradspec.parse(H + U)
    finally:
        parser._lark.cache_clear()
    assert list(tmp_path.iterdir()) == []


def _trusted_setup(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("GRADSPEC_CACHE_DIR", str(folder))
    assert cache.write_private("memo", "ok\n")
    return folder


def test_the_cache_folder_is_made_private_and_its_files_too(tmp_path, monkeypatch):
    folder = _trusted_setup(tmp_path, monkeypatch)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "memo").stat().st_mode) == 0o600
    assert cache.trusted_file("memo") == str(folder / "memo")
    assert cache.trusted_file("absent") is None


@pytest.mark.parametrize("spoil", ["folder writable by others", "folder writable by the group",
                                   "folder is a link", "folder owned by someone else",
                                   "file writable by others", "file is a link", "file is a folder"])
def test_a_cache_anyone_else_could_write_is_treated_as_absent(tmp_path, monkeypatch, spoil):
    folder = _trusted_setup(tmp_path, monkeypatch)
    memo = folder / "memo"
    if spoil == "folder writable by others":
        folder.chmod(0o703)
    elif spoil == "folder writable by the group":
        folder.chmod(0o730)
    elif spoil == "folder is a link":
        monkeypatch.setenv("GRADSPEC_CACHE_DIR", str(tmp_path / "link"))
        (tmp_path / "link").symlink_to(folder)
    elif spoil == "folder owned by someone else":
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)
    elif spoil == "file writable by others":
        memo.chmod(0o602)
    elif spoil == "file is a link":
        (folder / "elsewhere").write_text("ok\n")
        memo.unlink()
        memo.symlink_to(folder / "elsewhere")
    else:
        memo.unlink()
        memo.mkdir()
    assert cache.trusted_file("memo") is None
    if spoil.startswith("folder"):
        before = sorted(p.name for p in folder.iterdir())
        assert not cache.write_private("other", "x")
        assert sorted(p.name for p in folder.iterdir()) == before


def test_writing_the_cache_never_follows_a_planted_link(tmp_path, monkeypatch):
    folder = _trusted_setup(tmp_path, monkeypatch)
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (folder / "memo").unlink()
    (folder / "memo").symlink_to(victim)
    assert not cache.write_private("memo", "overwritten\n")
    assert victim.read_text() == "untouched\n"


# ---- which files are read ------------------------------------------------------------------


def test_a_device_or_pipe_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe.opt")
    (tmp_path / "zero.opt").symlink_to("/dev/zero")
    (tmp_path / "imports_zero.opt").write_text('import "/dev/zero" as z\noptimizer x = z\n')
    script = (
        "import gradspec, sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        gradspec.load(path)\n"
        "    except gradspec.SpecError as error:\n"
        "        print(error.code, error.message)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, "/dev/zero", str(tmp_path / "pipe.opt"),
                           str(tmp_path / "zero.opt"), str(tmp_path / "imports_zero.opt")],
                          capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30
    lines = done.stdout.splitlines()
    assert lines == [
        "GS005 cannot load '/dev/zero': spec files end in .opt",
        f"GS005 cannot load '{tmp_path / 'pipe.opt'}': it is not a regular file (a device, pipe or socket)",
        f"GS005 cannot load '{tmp_path / 'zero.opt'}': it is a link to a file that does not end in .opt",
        "GS020 cannot import '/dev/zero': import paths are relative, not absolute",
    ], done.stderr


def test_a_folder_is_not_a_spec(tmp_path):
    (tmp_path / "specs.opt").mkdir()
    assert _error(str(tmp_path / "specs.opt")).message.endswith("it is a directory")
    assert _error(str(tmp_path) + os.sep).message.endswith("spec files end in .opt")


def test_a_path_no_file_can_have_is_a_spec_error():
    assert _error("spec\0.opt").message == "cannot load 'spec\0.opt': a path cannot hold a NUL character"
    assert gradspec.parse(H + U, "odd\0name.opt").name == "t"


def test_a_spec_file_is_at_most_one_mebibyte(tmp_path):
    text = H + U
    fits = tmp_path / "fits.opt"
    fits.write_text(text + "#" * (MAX_SPEC_BYTES - len(text) - 1) + "\n")
    assert fits.stat().st_size == MAX_SPEC_BYTES
    assert gradspec.load(str(fits)).name == "t"
    big = tmp_path / "big.opt"
    big.write_text(text + "#" * (MAX_SPEC_BYTES - len(text)) + "\n")
    error = _error(str(big))
    assert error.code == "GS005" and "larger than 1,048,576 bytes" in error.message


def test_errors_never_show_a_file_that_is_not_a_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.txt").write_text("the password is hunter2\n")
    (tmp_path / "secret.opt").symlink_to(tmp_path / "secret.txt")
    for spec in ('import "secret.txt" as s\noptimizer x = s\n', 'import "secret.opt" as s\noptimizer x = s\n',
                 'import "/etc/passwd" as s\noptimizer x = s\n'):
        (tmp_path / "main.opt").write_text(spec)
        shown = str(_error("main.opt"))
        assert "hunter2" not in shown and "root:" not in shown
    for path in ("secret.txt", "secret.opt", "/etc/passwd"):
        shown = str(_error(path))
        assert "hunter2" not in shown and "root:" not in shown


def test_a_missing_file_is_a_spec_error_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_adam.opt").write_text(H + U)
    assert _error("my_adma.opt").hint == "did you mean 'my_adam.opt'?"
    assert _error("adam.opt").hint == "the stdlib's 'adam' is loaded by its name, without .opt"
    assert _error(str(tmp_path / "nothing" / "x.opt")).hint == "check the path"
    done = subprocess.run([sys.executable, "-m", "gradspec.cli", "check", "nowhere.opt"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1
    assert "error[GS005]: cannot load 'nowhere.opt': no such file" in done.stderr
    assert "Traceback" not in done.stderr


def test_source_text_given_where_a_name_goes_is_read_as_source():
    """``Optimizer(params, text)`` and ``check(text)``, as users try them first: a string with
    a line break is no name, path or expression, and used to fail as an expression with
    "unexpected 'hyper'" on its second line."""
    import torch
    assert gradspec.load(H + U) == gradspec.parse(H + U)
    assert gradspec.check(H + U).name == "t"
    p = torch.ones(3, dtype=torch.float64, requires_grad=True)
    p.grad = torch.ones_like(p)
    gradspec.Optimizer([p], H + U, backend="eager").step()
    assert torch.equal(p.detach(), torch.full((3,), 0.9, dtype=torch.float64))
    error = _error(H + "param' = param - lr *\n")
    assert (error.code, error.line) == ("GS002", 3) and "<string>" in str(error)


def test_a_path_object_names_a_spec_file_and_other_types_are_refused_by_name(tmp_path):
    import pathlib

    import torch
    path = pathlib.Path(tmp_path / "mine.opt")
    path.write_text(H + U)
    assert gradspec.load(path) == gradspec.load(str(path)) and gradspec.check(path).name == "t"
    p = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = gradspec.Optimizer([p], path, backend="eager")
    assert pickle.loads(pickle.dumps(opt)).spec == opt.spec
    assert gradspec.transform(path).spec == opt.spec
    for bad in (None, ["adam"], 3):
        with pytest.raises(TypeError, match=f"not {type(bad).__name__}"):
            gradspec.load(bad)
        with pytest.raises(TypeError, match=f"not {type(bad).__name__}"):
            gradspec.check(bad)
        with pytest.raises(TypeError, match=f"reads a spec's source text \\(a str\\), not {type(bad).__name__}"):
            gradspec.parse(bad)
    assert _error("a" * 100_000).code == "GS021"  # no stdlib name, file name or expression: unknown
    for seed, error, words in (("x", TypeError, "seed must be an integer, got str"),
                               (True, TypeError, "got bool"), (2 ** 80, ValueError, "seed must fit in 64 bits")):
        with pytest.raises(error, match=words):
            gradspec.Optimizer([p], "adam", backend="eager", seed=seed)


@pytest.mark.parametrize("separator", ["\u2028", "\x85", "\x0c", "\r"])
def test_an_excerpt_is_the_line_the_parser_counted(separator):
    """Lines end at "\n" for the parser; a comment holding another line separator (or a CRLF
    file) must not shift the excerpt of every later line."""
    text = f"optimizer a\nhyper lr = 0.1 >= 0 # x{separator}y\nparam' = param - lr * bad\n"
    with pytest.raises(gradspec.SpecError) as error:
        gradspec.check(text)
    assert "3 | param' = param - lr * bad\n" in str(error.value)


@pytest.mark.parametrize("argv, words", [
    (["check", "--dtype", "float8", "adam"], "invalid choice: 'float8'"),
    (["show", "--cost", "adam", "--dtype", "int32"], "invalid choice: 'int32'"),
    (["bench", "adam", "--params", "1e99"], "a parameter count from 1 to 1e+11, not 1e99"),
    (["bench", "adam", "--params", "nan"], "a parameter count from 1 to 1e+11, not nan"),
])
def test_command_line_values_out_of_range_are_usage_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_an_alias_imported_twice_is_located(tmp_path):
    (tmp_path / "one.opt").write_text(H + U)
    (tmp_path / "two.opt").write_text(H.replace("optimizer t", "optimizer u") + U)
    (tmp_path / "main.opt").write_text('import "one.opt" as b\nimport "two.opt" as b\noptimizer c = b\n')
    error = _error(str(tmp_path / "main.opt"))
    assert (error.code, error.line, error.column) == ("GS010", 2, 1) and "'b' is imported twice" in error.message


def test_import_paths_are_relative_and_may_climb(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.opt").write_text(H + U)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.opt").write_text('import "../shared/base.opt" as base\noptimizer mine = base\n')
    assert gradspec.load(str(tmp_path / "runs" / "mine.opt")).name == "mine"
    (tmp_path / "runs" / "absolute.opt").write_text(
        f'import "{tmp_path / "shared" / "base.opt"}" as base\noptimizer mine = base\n')
    error = _error(str(tmp_path / "runs" / "absolute.opt"))
    assert (error.code, error.line, error.column) == ("GS020", 1, 1)


# ---- import cycles -------------------------------------------------------------------------


def test_an_import_cycle_is_located_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.opt").write_text('import "b.opt" as b\noptimizer a = b\n')
    (tmp_path / "b.opt").write_text('import "c.opt" as c\noptimizer b = c\n')
    (tmp_path / "c.opt").write_text(H + 'import "a.opt" as a\n' + U)
    error = _error("a.opt")
    assert (error.code, error.filename, error.line, error.column) == ("GS032", "c.opt", 3, 1)
    assert error.message == "import cycle: a.opt -> b.opt -> c.opt -> a.opt"
    assert len(str(error).splitlines()) == 4  # the message, the line, the caret, the hint


def test_an_unused_self_import_is_a_cycle_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me.opt").write_text('import "./me.opt" as me\n' + H + U)
    error = _error("me.opt")
    assert (error.code, error.message) == ("GS032", "import cycle: me.opt -> me.opt")


def test_a_file_imported_along_many_paths_is_read_once(tmp_path, monkeypatch):
    """A diamond is not a cycle; a ladder of diamonds (2^40 paths) is read in 40 steps."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "level0.opt").write_text(H + U)
    for level in range(1, 41):
        below = f"level{level - 1}.opt"
        (tmp_path / f"level{level}.opt").write_text(
            f'import "{below}" as left\nimport "./{below}" as right\noptimizer level{level} = left\n')
    started = time.perf_counter()
    assert gradspec.load("level40.opt").name == "level40"
    assert time.perf_counter() - started < 10


# ---- encodings -----------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.opt"
    path.write_bytes(b"\xef\xbb\xbf" + (H + "# caf\u00e9\n" + U).encode())
    assert gradspec.load(str(path)).name == "t"
    assert gradspec.parse("\ufeff" + H + U).name == "t"
    with pytest.raises(gradspec.SpecError) as info:  # columns count from after the mark
        gradspec.parse("\ufeffoptimizer t $\n")
    assert (info.value.line, info.value.column) == (1, 13)


def test_latin1_in_an_imported_file_is_located_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "main.opt").write_text('import "old.opt" as old\noptimizer main = old\n')
    (tmp_path / "old.opt").write_bytes((H + "# na\u00efve\n" + U).encode("latin-1"))
    error = _error("main.opt")
    assert (error.code, error.filename, error.line, error.column) == ("GS006", "old.opt", 3, 5)
    assert "0xef" in error.message and "UTF-8" in error.hint


# ---- syntax errors: all of them, in one report ---------------------------------------------


def _syntax_errors(text):
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.parse(text, "t.opt")
    return [(d.code, d.line, d.column) for d in info.value.diagnostics]


def test_every_syntax_error_of_a_file_is_reported_at_once():
    text = (H + "x = grad ** 2\n"          # 3
            "y = grad $ 2\n"               # 4
            "if lr > 0 {\n"                # 5
            "  z = (grad\n"                # 6
            "}\n"                          # 7
            "w = grad & 1\n"               # 8
            "law = 1\n"                    # 9
            + U)
    assert _syntax_errors(text) == [("GS002", 3, 10), ("GS001", 4, 10), ("GS002", 7, 1), ("GS001", 8, 10),
                                    ("GS002", 9, 5)]


def test_a_good_statement_after_a_bad_one_raises_nothing_more():
    assert _syntax_errors(H + "if lr > 0 {\n  x = grad +\n}\n" + U) == [("GS002", 5, 1)]
    assert _syntax_errors(H + "x = (grad\nstate m = 0\nm' = m\n" + U) == [("GS002", 4, 1)]


def test_syntax_error_recovery_ends():
    started = time.perf_counter()
    found = _syntax_errors(H + "x = grad $ 1\n" * 500 + U)
    assert time.perf_counter() - started < 10
    assert found == [("GS001", n, 10) for n in range(3, 3 + parser._Recovery.MAX_ERRORS)]
    assert _syntax_errors(H + "x = grad +") == [("GS002", 3, 10)]


def test_an_unclosed_string_or_power_stars_say_what_is_wrong():
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.parse('"""Adam, but\n' + H + U)
    assert (info.value.message, info.value.hint) == ("a docstring that is never closed", 'end the docstring with """')
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.parse(H + 'require lr > 0 "lr must be positive\n' + U)
    assert info.value.message == "a string that is never closed"
    assert info.value.hint.startswith('a string ends with " on the line where it starts')
    with pytest.raises(gradspec.SpecError) as info:
        gradspec.parse(H + "x = grad ** 2\n" + U)
    assert info.value.message == "unexpected '**'" and "       |          ^^" in str(info.value)


def test_check_json_lists_every_syntax_error(tmp_path, monkeypatch, capsys):
    import json
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.opt").write_text(H + "x = grad ** 2\ny = grad $ 2\n" + U)
    assert main(["check", "--json", "two.opt"]) == 1
    [report] = json.loads(capsys.readouterr().out)
    assert [(d["code"], d["line"], d["column"]) for d in report["diagnostics"]] == [("GS002", 3, 10),
                                                                                    ("GS001", 4, 10)]


# ---- start-up ------------------------------------------------------------------------------

_IMPORTS_AFTER = """
import contextlib, io, json, sys
from gradspec.cli import main
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    print(code, 'torch' in sys.modules, 'sympy' in sys.modules)
"""

NO_SYMPY = [["--help"], ["--version"], ["show", "adam"], ["show", "lookahead(adam)"]]
NO_TORCH = [["check", "adam"], ["check", "muon"], ["list"]]


def test_commands_that_need_no_torch_do_not_import_it():
    """One fresh interpreter runs the commands in turn and reports after each what is
    imported: a module stays imported, so a line that says torch (or SymPy) is absent clears
    that command and every one before it. The commands that only read a spec import neither."""
    done = subprocess.run([sys.executable, "-c", _IMPORTS_AFTER, json.dumps(NO_SYMPY + NO_TORCH)],
                          capture_output=True, text=True, timeout=300)
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == len(NO_SYMPY + NO_TORCH), done.stderr
    for argv, line in zip(NO_SYMPY, lines):
        assert line == ["0", "False", "False"], (argv, line)
    for argv, line in zip(NO_TORCH, lines[len(NO_SYMPY):]):
        assert line[:2] == ["0", "False"], (argv, line)


def test_gradspec_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out.strip() == f"gradspec {gradspec.__version__}"


def test_lazy_public_names_stay_what_they_were():
    done = _run("import sys, gradspec\n"
                "assert 'torch' not in sys.modules\n"
                "from gradspec.check import diagnose\n"  # imports the submodule gradspec.check
                "assert callable(gradspec.check) and gradspec.check('sgd').name == 'sgd'\n"
                "from gradspec import Optimizer, hessian_eigenpairs, transform\n"
                "import torch\n"
                "assert issubclass(Optimizer, torch.optim.Optimizer)\n"
                "assert set(gradspec.__all__) <= set(dir(gradspec))\n"
                "print('ok')\n", timeout=300)
    assert done.stdout.strip() == "ok", done.stderr
    with pytest.raises(AttributeError):
        gradspec.no_such_name
