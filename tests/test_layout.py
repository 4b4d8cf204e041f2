"""The house rules of the source tree: no import cycle, small modules and functions, a public
API that resolves, docs that state what is."""

from __future__ import annotations

import ast
import re
from datetime import datetime
from pathlib import Path
from typing import TypedDict, get_type_hints

import pytest

from slidelake.rows import Int32

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "slidelake"


def _imports(path: Path) -> set[str]:
    """slidelake modules imported by ``path`` at any depth of its code (``TYPE_CHECKING``
    blocks excluded: they never run)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slidelake."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("slidelake.")}
    return out


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) - {p.stem} for p in SRC.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_slidelake():
    graph = _graph()
    assert {"pipeline", "lake", "masks", "tissue", "overlays", "qc"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_pure_modules_do_not_import_spark():
    """The tissue algorithm, the grid and overlap arithmetic's pure helpers and the overlay
    files are testable without Spark."""
    for name in ("tissue", "overlays", "qc", "encoding", "filtering"):
        text = (SRC / f"{name}.py").read_text()
        assert not re.search(r"^\s*(from|import) pyspark", text, re.M), name


def test_module_and_function_sizes():
    """Every module at most 500 lines, every function at most 80; the package at most 7,850
    lines (the goal is 5,500; object storage, storage.py, slide_cache.py and the ranged reads,
    is about 600)."""
    total = 0
    long_functions = []
    for p in SRC.glob("*.py"):
        lines = p.read_text().splitlines()
        total += len(lines)
        assert len(lines) <= 500, f"{p.name}: {len(lines)} lines"
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert total <= 7850, total
    assert not long_functions, long_functions


def test_public_api_names_resolve():
    import slidelake

    for name in slidelake.__all__:
        assert getattr(slidelake, name) is not None, name
    with pytest.raises(AttributeError):
        slidelake.no_such_name  # noqa: B018


def test_docs_and_docstrings_cite_no_benchmark_pass_or_run_letter():
    """Docs state what is; history lives in git."""
    pattern = re.compile(r"\b(first|second|third|\w+teenth|\w+th) pass\b|\brun [A-Z]{1,2}\b|\bpass(es)? [A-Z]{1,2}\b")
    files = [*SRC.glob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "bench").glob("*.py")]
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in pattern.finditer(p.read_text())]
    assert not hits, hits[:20]


class _Inner(TypedDict):
    level: Int32
    downsample: float


class _Row(TypedDict):
    name: str
    size: int | None
    ok: bool
    at: datetime | None
    levels: list[_Inner] | None
    props: dict[str, str] | None
    level: Int32 | None


class _Odd(TypedDict):
    value: complex


def test_spark_schema_of_a_row_type():
    """Each table's schema is made from its row type (:mod:`slidelake.rows`): the mapping
    against a schema written by hand, and the failed tile's fields against the table's."""
    from pyspark.sql import types as T

    from slidelake.rows import TileFailure, spark_schema
    from slidelake.write import TILE_FAILURE

    assert spark_schema(_Row) == T.StructType([
        T.StructField("name", T.StringType(), False), T.StructField("size", T.LongType(), True),
        T.StructField("ok", T.BooleanType(), False), T.StructField("at", T.TimestampType(), True),
        T.StructField("levels", T.ArrayType(T.StructType([T.StructField("level", T.IntegerType(), False),
                                                          T.StructField("downsample", T.DoubleType(), False)])), True),
        T.StructField("props", T.MapType(T.StringType(), T.StringType()), True),
        T.StructField("level", T.IntegerType(), True),
    ])
    assert all(f.nullable for f in spark_schema(_Inner, all_nullable=True).fields)
    with pytest.raises(TypeError, match="_Odd: no Spark type"):
        spark_schema(_Odd)
    assert list(get_type_hints(TileFailure)) == TILE_FAILURE.fieldNames()


@pytest.mark.parametrize("require_all", ["1", "0"])
def test_a_skip_fails_where_every_test_must_run(tmp_path, require_all):
    """``.ci/run`` sets ``SLIDELAKE_REQUIRE_ALL=1``: a test that skips (here: real slides
    absent) fails there, and skips with its reason in a local run."""
    import shutil
    import subprocess
    import sys

    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs_slides.py").write_text(
        "from pathlib import Path\nfrom conftest import need\n\n"
        "def test_x():\n    need(Path('/nonexistent/CMU-1.svs'))\n")
    env = {**__import__("os").environ, "SLIDELAKE_REQUIRE_ALL": require_all}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if require_all == "1":
        assert out.returncode == 1 and "1 failed" in out.stdout, out.stdout
        assert "SLIDELAKE_REQUIRE_ALL=1): real slides absent" in out.stdout, out.stdout
    else:
        assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout


def test_the_mutation_run_names_existing_modules_and_tests():
    """``mutmut run`` (docs/testing.md) mutates and tests files that exist."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert conf["only_mutate"] and all((ROOT / f).is_file() for f in conf["only_mutate"])
    assert all((ROOT / f).is_file() for f in conf["pytest_add_cli_args_test_selection"])
    assert all((ROOT / d).is_dir() for d in conf["also_copy"])
