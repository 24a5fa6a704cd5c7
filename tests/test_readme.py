"""The README's snippets run as written: every ```sh and ```python block, in order, in one folder.

The blocks form a tutorial (a later one reads what an earlier one wrote), so they run in order
in a fresh folder that holds links to the project's `models/` and `benchmarks/`. ```console blocks are shown, not
run: the Quick start's install and test commands (CI runs the second one verbatim, and the first
one's install is what CI's own install does; its morph is run here without the install).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)

pytest.importorskip("torch")
pytest.importorskip("transformers")


def blocks(language: str | None = None) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README) if language in (None, m.group(1))]


def _run(argv: list[str], cwd: Path, what: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"README {what} failed ({done.returncode}):\n{output}"


def test_every_block_is_shell_python_or_console() -> None:
    assert blocks() and {language for language, _ in blocks()} <= {"sh", "python", "console"}


def test_the_quick_start_holds_exactly_two_commands_and_ci_runs_the_second() -> None:
    quick = README[README.index("## Quick start"):README.index("\n## ", README.index("## Quick start") + 5)]
    (language, text), = [(m.group(1), m.group(2)) for m in BLOCK.finditer(quick)]
    commands = text.strip().splitlines()
    assert language == "console" and len(commands) == 2
    assert commands[0].startswith("pip install -e . && python -m onnxmorph ")
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_snippets_run_in_order(tmp_path: Path) -> None:
    for folder in ("models", "benchmarks"):  # what the snippets read, as from the project's root
        (tmp_path / folder).symlink_to(ROOT / folder)
    quick = blocks("console")[0][1].strip().splitlines()[0]
    _run(["bash", "-euo", "pipefail", "-c", quick.split(" && ", 1)[1]], tmp_path, "Quick start morph")
    for k, (language, text) in enumerate(blocks()):
        if language == "sh":
            _run(["bash", "-euo", "pipefail", "-c", text], tmp_path, f"block {k} (sh)")
        elif language == "python":
            script = tmp_path / f"readme_block_{k}.py"
            script.write_text(text)
            _run([sys.executable, script.name], tmp_path, f"block {k} (python)")
