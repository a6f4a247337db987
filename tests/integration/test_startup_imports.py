"""Start-up stays light: the everyday commands import neither torch nor GitPython (docs/architecture.md#layers-and-import-rules)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.facts_matrix import MACHINES, write_facts

PROBE = """
import json, sys
from lowvram.cli import main
code = main(sys.argv[1:])
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'git', 'gitdb', 'pydantic', 'numpy'})
sys.stderr.write('\\nHEAVY=' + json.dumps(heavy) + '\\n')
"""


def _heavy_imports(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stderr.splitlines() if x.startswith("HEAVY="))
    return json.loads(line[len("HEAVY="):])


@pytest.mark.parametrize("args", [
    ("--help",),
    ("doctor",),
    ("plan", "--facts", "{facts}", "--model", "sdxl", "--json"),
    ("estimate", "--model", "sdxl", "--width", "1024", "--height", "1024", "--json"),
    ("profiles", "list"),
], ids=lambda a: " ".join(a[:2]))
def test_command_imports_no_torch_and_no_gitpython(args: tuple[str, ...], tmp_path: Path) -> None:
    facts = write_facts(MACHINES["gtx1070-8gb"], tmp_path / "facts.json")
    argv = [a.format(facts=facts) for a in args]
    assert _heavy_imports(*argv) == []
