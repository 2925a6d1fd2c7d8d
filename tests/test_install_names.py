"""The installed import names: everything under ``lowband``, nothing at the top of site-packages that
could collide with another package's ``node`` or ``sim``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # -I: no user site, no PYTHONPATH, and no current directory on sys.path: what an installed user sees
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_the_packages_import_under_lowband(tmp_path: Path) -> None:
    done = _python("import lowband.node, lowband.coordinator, lowband.protocols, lowband.sim; "
                   "import lowband.node.pipeline.agent, lowband.coordinator.skippipe.planner; print('ok')", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("name", ["node", "coordinator", "protocols", "sim"])
def test_no_top_level_module_of_a_generic_name_is_installed(tmp_path: Path, name: str) -> None:
    done = _python(f"import {name}", tmp_path)
    assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, done.stderr


def test_no_module_imports_the_folders_by_their_bare_names() -> None:
    """A stray ``from node.x import`` works in the repository (the folder is on the path) and breaks
    once installed; every import names ``lowband``."""
    offenders = []
    for folder in ("node", "coordinator", "protocols", "sim", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                if len(words) >= 2 and words[0] in ("from", "import") and \
                        words[1].split(".")[0] in ("node", "coordinator", "protocols", "sim"):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
