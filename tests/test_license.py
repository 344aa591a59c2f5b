"""The Apache-2.0 LICENSE at the top, verbatim, and in every wheel built from the project, which
carries every module of the source tree (a package missing from pyproject breaks only installs)."""

from __future__ import annotations

import email
import hashlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt, as many Apache-2.0 wheels ship it
APACHE_2_0 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_the_license_is_the_apache_license_2_0_verbatim() -> None:
    text = (ROOT / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_0
    assert PROJECT["project"]["license"] == "Apache-2.0"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built as pip builds it for a user (an isolated build environment with the
    build-system.requires of pyproject.toml), from a copy of the project's files."""
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    (built_wheel,) = (tmp_path / "dist").glob("luaq-*.whl")
    return built_wheel


def test_the_wheel_carries_the_license(wheel: Path) -> None:
    version = PROJECT["project"]["version"]
    dist_info = f"luaq-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        license_text = archive.read(f"{dist_info}/licenses/LICENSE")
        metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]


def test_the_wheel_carries_every_module_and_lua_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.startswith("luaq/")}
    for directory, package in (("runtime", "luaq/runtime"), ("operator", "luaq/operator")):
        for path in (ROOT / directory).rglob("*"):
            if path.suffix in (".py", ".lua") and "__pycache__" not in path.parts:
                relative = path.relative_to(ROOT / directory).as_posix()
                assert f"{package}/{relative}" in packed, f"{directory}/{relative} is not installed"
