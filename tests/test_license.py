"""The Apache-2.0 LICENSE at the top, verbatim, and in every wheel built from the project."""

from __future__ import annotations

import email
import hashlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, as many Apache-2.0 wheels ship it
APACHE_2_0 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_the_license_is_the_apache_license_2_0_verbatim() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0
    assert PROJECT["project"]["license"] == "Apache-2.0"


def test_the_wheel_carries_the_license(tmp_path: Path) -> None:
    """Built as pip builds it for a user (an isolated build environment with the
    build-system.requires of pyproject.toml), from a copy of the project's files."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for directory in ("runtime", "operator"):
        shutil.copytree(
            ROOT / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("luaq-*.whl")
    version = PROJECT["project"]["version"]
    dist_info = f"luaq-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        license_text = archive.read(f"{dist_info}/licenses/LICENSE")
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
