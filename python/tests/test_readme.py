"""The README's Python quickstart runs as written: a two-stage pipeline with
an async and a plain handler, on the installed package."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from flowgate import _flowgate

README = Path(__file__).resolve().parents[2] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("### Quickstart", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_quickstart_runs(tmp_path: Path) -> None:
    code = _quickstart()
    toml = re.search(r'from_toml\("""(.*?)"""\)', code, re.S)
    assert toml is not None, "the quickstart's config"
    cleanup = _flowgate.Cleanup(_flowgate.Config.from_toml(toml.group(1)))
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    try:
        out = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
    finally:
        cleanup.close()
    assert out.returncode == 0, out.stderr
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("invoiced"))
    assert lines == ["invoiced o-0: 9.5", "invoiced o-1: 19.0", "invoiced o-2: 28.5"], out.stdout
