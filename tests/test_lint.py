"""The code base passes ruff (lint and import order), as configured in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    folders = [d for d in ("nesso_mlx", "tests", "benchmarks", "convert", "examples") if (ROOT / d).is_dir()]
    result = subprocess.run([ruff, "check", *folders], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_is_light():
    """`import nesso_mlx` must not pull in mlx, tokenizers or huggingface_hub (CLI start-up)."""
    code = "import sys, nesso_mlx; print(sorted(m for m in ('mlx', 'tokenizers', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def import_graph() -> dict[str, set[str]]:
    """Which nesso_mlx modules each module imports, lazily inside functions too (not under TYPE_CHECKING)."""
    import ast

    package = ROOT / "nesso_mlx"
    graph: dict[str, set[str]] = {}
    for file in package.rglob("*.py"):
        parts = file.with_suffix("").relative_to(ROOT).parts
        name = ".".join(parts[:-1] if file.name == "__init__.py" else parts)
        base = name if file.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(file.read_text(encoding="utf-8"))
        typing_only = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        graph[name] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and id(node) not in typing_only:
                up = base.split(".")[: len(base.split(".")) - node.level + 1]
                if node.module:
                    graph[name].add(".".join([*up, node.module]))
                else:  # `from . import cli`: the module cli
                    graph[name].update(".".join([*up, alias.name]) for alias in node.names)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                modules = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                graph[name].update(m for m in modules if m and m.startswith("nesso_mlx."))
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str, seen: set[str]) -> bool:
    for nxt in graph.get(start, ()):
        if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(graph, nxt, goal, seen))):
            return True
    return False


def test_no_import_cycles():
    """No module of nesso_mlx imports, even lazily inside a function, one that imports it back."""
    graph = import_graph()
    cyclic = sorted(m for m in graph if reaches(graph, m, m, set()))
    assert cyclic == [], f"modules in import cycles: {cyclic}"


ENGINE = ["model", "cache", "sampling", "generation", "speculative", "batch"]


def test_the_engine_knows_nothing_of_tools_templates_or_replies():
    """The engine's modules do not import, even lazily or through another module, the tools, the
    tokenizer's chat templating, the reply layer, the Python API or anything of HTTP and terminals."""
    graph = import_graph()
    outside = ["tools", "tokenizer", "reply", "api", "constrained", "request", "server", "server_engine", "chat", "cli"]
    for engine in ENGINE:
        for module in outside:
            goal = f"nesso_mlx.{module}"
            targets = [m for m in graph if m == goal or m.startswith(goal + ".")]
            reached = [m for m in targets if reaches(graph, f"nesso_mlx.{engine}", m, set())]
            assert not reached, (engine, reached)  # a package's submodules count (nesso_mlx.request.core)
    assert graph["nesso_mlx.api"] & {"nesso_mlx.generation", "nesso_mlx.reply"}  # the check sees real imports


def test_slow_marks_name_real_tests():
    """Every test `conftest.SLOW_TESTS` marks slow exists (a renamed test would drop out of it silently)."""
    import ast

    from conftest import SLOW_FILES, SLOW_TESTS

    tests = ROOT / "tests"
    for file, names in SLOW_TESTS.items():
        tree = ast.parse((tests / file).read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert names <= defined, (file, names - defined)
    assert all((tests / file).is_file() for file in SLOW_FILES)
