"""operator/ has no __init__.py, so `python` started in the repo root still gets the standard
library's operator module, while the installed package maps the directory to luaq.operator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_the_standard_library_operator_module_wins_in_the_repo_root() -> None:
    done = _python("-c", "import operator; operator.eq; import luaq.operator.crd")
    assert done.returncode == 0, done.stderr
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_pytest_collects_from_the_repo_root() -> None:
    done = _python("-m", "pytest", "--co", "-q", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "test_pytest_collects_from_the_repo_root" in done.stdout
