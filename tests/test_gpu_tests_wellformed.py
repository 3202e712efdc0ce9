"""The GPU-only test files (skipped whole on a CPU machine) are checked here for what pytest would only report at
setup on the GPU: every argument of a test is parametrized or a fixture. A lost ``@pytest.mark.parametrize`` line
(session 11's merge of two branches dropped one) would otherwise pass CI unseen and fail on the card."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
GPU_ONLY = ["test_cuda_kernels.py", "test_gpu_e2e.py"]
BUILTIN_FIXTURES = {"tmp_path", "tmp_path_factory", "monkeypatch", "capsys", "capfd", "caplog", "request",
                    "recwarn", "pytestconfig"}


def _is_call_to(node: ast.expr, dotted: str) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return ast.unparse(target) == dotted


def _fixtures(tree: ast.Module) -> set[str]:
    return {f.name for f in tree.body if isinstance(f, ast.FunctionDef)
            and any(_is_call_to(d, "pytest.fixture") for d in f.decorator_list)}


def _parametrized(fn: ast.FunctionDef) -> set[str]:
    names: set[str] = set()
    for d in fn.decorator_list:
        if isinstance(d, ast.Call) and _is_call_to(d, "pytest.mark.parametrize"):
            first = d.args[0]
            assert isinstance(first, ast.Constant), f"{fn.name}: parametrize names must be a literal"
            names |= {s.strip() for s in first.value.split(",")}
    return names


def unprovided_arguments(source: str, fixtures: set[str]) -> list[str]:
    """'test: arg' for each test argument no parametrize, fixture of this module or of conftest provides."""
    tree = ast.parse(source)
    provided = fixtures | _fixtures(tree) | BUILTIN_FIXTURES
    out = []
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_"):
            given = _parametrized(fn) | provided
            out += [f"{fn.name}: {a.arg}" for a in fn.args.args if a.arg not in given]
    return out


def _conftest_fixtures() -> set[str]:
    return _fixtures(ast.parse((TESTS / "conftest.py").read_text()))


@pytest.mark.parametrize("name", GPU_ONLY)
def test_every_gpu_test_argument_is_provided(name):
    missing = unprovided_arguments((TESTS / name).read_text(), _conftest_fixtures())
    assert not missing, f"{name}: arguments without a parametrize or fixture: {missing}"


def test_the_check_catches_a_lost_parametrize():
    src = ('import pytest\n@pytest.mark.parametrize("shape", [1])\ndef test_a(shape, m): pass\n'
           '@pytest.mark.parametrize("m, n", [(1, 2)])\ndef test_b(m, n, tmp_path, cache_dir): pass\n')
    assert unprovided_arguments(src, {"cache_dir"}) == ["test_a: m"]
