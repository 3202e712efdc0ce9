"""scripts/check_cu_tools.py: the build lines in the standalone CUDA tools' headers are found and parsed as
documented, and a line that cannot build is reported (CI builds every tool with it where nvcc exists)."""
import importlib.util
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_cu_tools", REPO / "scripts" / "check_cu_tools.py")
tools = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tools)


def test_every_tool_documents_a_build_line_with_its_own_source():
    sources = sorted((REPO / "scripts").glob("*.cu"))
    assert sources
    for s in sources:
        argv = tools.build_line(s)
        assert argv is not None, f"{s.name} has no `//   nvcc ...` line in its header"
        assert argv[0] == "nvcc" and f"scripts/{s.name}" in argv and "-o" in argv, (s.name, argv)
        assert "&&" not in argv and not any(a.startswith("[") for a in argv), (s.name, argv)


def test_build_line_joins_continuations_and_drops_options_and_the_run(tmp_path):
    src = tmp_path / "tool.cu"
    src.write_text("// A tool.\n//   nvcc -O3 -Icsrc [-DPROBE] scripts/tool.cu \\\n//     csrc/dec.cu -o /tmp/t && "
                   "[ENV=1] /tmp/t [ARG]\n#include <cstdio>\n")
    assert tools.build_line(src) == ["nvcc", "-O3", "-Icsrc", "scripts/tool.cu", "csrc/dec.cu", "-o", "/tmp/t"]
    bare = tmp_path / "bare.cu"
    bare.write_text("// no build line\nint main() { return 0; }\n")
    assert tools.build_line(bare) is None
    ok, why = tools.check(bare, tmp_path)
    assert not ok and "no `//   nvcc" in why


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_check_reports_a_line_that_does_not_build(tmp_path):
    src = tmp_path / "broken.cu"
    src.write_text(f"//   nvcc -std=c++17 {src} csrc/no_such_file.cu -o /tmp/broken && /tmp/broken\n"
                   "int main() { return 0; }\n")
    ok, why = tools.check(src, tmp_path)
    assert not ok and "no_such_file.cu" in why
    good = tmp_path / "good.cu"
    good.write_text(f"//   nvcc -std=c++17 {good} -o /tmp/good && /tmp/good\nint main() {{ return 0; }}\n")
    assert tools.check(good, tmp_path) == (True, "")
