"""The layering rule of docs/design.md: a package imports only packages below it, so that the
language and the compiler can be used (and tested) without the runtime above them."""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "gradspec"

LAYERS = [
    {"cache", "recursion", "stdlib"},
    {"dsl"},
    {"compiler"},
    {"symbolic"},
    {"check", "docs"},
    {"runtime"},
    {"tasks", "compare", "bench", "integrations"},
    {"cli", "__init__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def _unit(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def _imported_units(path: pathlib.Path, package: pathlib.Path = PACKAGE):
    """(line, unit) of every gradspec unit ``path`` imports, relative or absolute."""
    parts = path.relative_to(package).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = list(parts[:len(parts) - node.level]) + (node.module.split(".") if node.module else [])
            names = [target[0]] if target else [alias.name for alias in node.names]
            yield from ((node.lineno, name) for name in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradspec."):
            yield node.lineno, node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name.split(".")[1]) for alias in node.names
                        if alias.name.startswith("gradspec."))


def test_every_unit_has_a_layer():
    units = {_unit(path) for path in PACKAGE.rglob("*.py")}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS"


def test_no_import_runs_up():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = _unit(path)
        for line, unit in _imported_units(path):
            if unit in RANK and RANK[unit] > RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {unit}")
    assert not upward, "\n".join(upward)


def test_the_rule_finds_an_upward_import(tmp_path):
    """Not vacuous: a compiler module importing the runtime, relatively or absolutely, is seen."""
    bad = tmp_path / "gradspec" / "compiler" / "lower.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from ..runtime.distributed import local\nimport gradspec.runtime.buckets\n")
    assert [unit for _, unit in _imported_units(bad, tmp_path / "gradspec")] == ["runtime", "runtime"]


def test_every_subpackage_is_a_regular_package():
    folders = {path.parent for path in PACKAGE.rglob("*.py")}
    assert all((folder / "__init__.py").exists() for folder in folders)
