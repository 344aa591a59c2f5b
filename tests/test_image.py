"""The Docker image without a container engine: hadolint on the Dockerfile, then the package
installed exactly as the Dockerfile's build stage installs it (its own commands, on the build
context .dockerignore leaves) into a fresh virtual environment, run as its final stage runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kube_fixtures import example
from luaq.operator import crd, render
from luaq.operator.resource import parse_spec
from luaq.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
EXAMPLE = ROOT / "examples" / "email"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def stages(text: str) -> list[Stage]:
    """The Dockerfile's stages: continuation lines joined, comments dropped, global ARGs
    substituted into FROM."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    logical = "\n".join(lines).replace("\\\n", " ")
    arguments: dict[str, str] = {}
    found: list[Stage] = []
    for line in filter(str.strip, logical.splitlines()):
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ARG" and not found:
            name, _, default = args.partition("=")
            arguments[name] = default
        elif keyword == "FROM":
            image, _, alias = string.Template(args).substitute(arguments).partition(" AS ")
            found.append(Stage(image.strip(), alias.strip() or None))
        else:
            found[-1].instructions.append((keyword, args))
    return found


STAGES = stages(DOCKERFILE.read_text())
BUILD, FINAL = STAGES


def ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (excludes, pattern) pairs, with Docker's matching: `*` and `?` stay
    within a path segment, `**` crosses them, and a pattern matching a directory matches
    everything in it (character classes are not supported here: the file uses none)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        text = os.path.normpath(line.lstrip("!")).lstrip("/")
        wildcards = {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}
        regex = "".join(
            wildcards.get(part, re.escape(part)) for part in re.split(r"(\*\*/|\*\*|\*|\?)", text)
        )
        patterns.append((not negated, re.compile(regex)))
    return patterns


def ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for excludes, pattern in patterns:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            result = excludes
    return result


def build_context() -> list[str]:
    """The files `docker build .` sends: every file of the worktree .dockerignore keeps
    (directories it excludes entirely are not descended into)."""
    patterns = ignore_patterns()
    included = [pattern.pattern for excludes, pattern in patterns if not excludes]
    files = []
    for directory, subdirectories, names in os.walk(ROOT):
        relative = Path(directory).relative_to(ROOT).as_posix()
        prefix = "" if relative == "." else f"{relative}/"
        subdirectories[:] = [
            name
            for name in subdirectories
            if not ignored(prefix + name, patterns)
            or any(p.startswith(re.escape(prefix + name + "/")) for p in included)
        ]
        files += [prefix + name for name in names if not ignored(prefix + name, patterns)]
    return sorted(files)


@dataclass
class Image:
    """The final stage's filesystem as far as luaq goes: its virtual environment, and the
    environment its processes get."""

    venv: Path
    env: dict[str, str]
    command: list[str]

    def run(self, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def relocate(value: str, root: Path) -> str:
    """The image's own directories live under `root` here."""
    return re.sub(r"(?<![\w/])/(opt|src)\b", lambda m: f"{root}{m.group(0)}", value)


def expand(value: str, env: dict[str, str]) -> str:
    return string.Template(value).safe_substitute(env)


def host_env(root: Path) -> dict[str, str]:
    """This machine's environment as the base image's: `python` on PATH, no virtualenv."""
    shims = root / "usr-local-bin"
    shims.mkdir(parents=True)
    (shims / "python").symlink_to(sys._base_executable)  # type: ignore[attr-defined]
    venv_bin = str(Path(sys.executable).parent)
    path = [shims, *(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(map(str, path))}


def run_stage(stage: Stage, root: Path, context: Path, env: dict[str, str]) -> dict[str, str]:
    """Each instruction of a stage, on this machine; an instruction this does not know fails,
    so the Dockerfile cannot do more than what is tested here."""
    cwd = root
    for keyword, args in stage.instructions:
        if keyword == "ENV":
            for assignment in shlex.split(args):
                name, _, value = assignment.partition("=")
                env[name] = expand(relocate(value, root), env)
        elif keyword == "WORKDIR":
            cwd = Path(relocate(args, root))
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY" and args.startswith("--from="):
            source, destination = (expand(arg, env) for arg in args.split()[1:])
            assert source == destination, "the venv must stay where it was built"
        elif keyword == "COPY":
            *sources, destination = args.split()
            target = cwd / destination
            for source in sources:
                if (context / source).is_dir():
                    shutil.copytree(context / source, target, dirs_exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(context / source, target)
        elif keyword == "RUN":
            done = subprocess.run(
                ["/bin/sh", "-c", args], cwd=cwd, env=env, capture_output=True, text=True,
                timeout=600,
            )  # fmt: skip
            assert done.returncode == 0, f"RUN {args}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        elif keyword not in ("USER", "EXPOSE", "ENTRYPOINT", "CMD"):
            raise AssertionError(f"test_image.py does not know the Dockerfile's {keyword}")
    return env


def exec_form(found: list[str]) -> list[str]:
    """ENTRYPOINT and CMD in exec form (a JSON array), the last one of the stage."""
    value = json.loads(found[-1])
    assert isinstance(value, list), "exec form, so signals reach luaq"
    return [str(part) for part in value]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    root = tmp_path_factory.mktemp("image")
    context = root / "context"
    for name in build_context():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    base = host_env(root)
    run_stage(BUILD, root, context, dict(base))
    env = run_stage(FINAL, root, context, dict(base))
    command = [*exec_form(FINAL.args("ENTRYPOINT")), *exec_form(FINAL.args("CMD"))]
    yield Image(Path(env["VIRTUAL_ENV"]), env, command)
    shutil.rmtree(root)


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_the_build_context_is_the_package_and_nothing_else() -> None:
    context = build_context()
    tracked = subprocess.run(
        ["git", "ls-files", "runtime", "operator"], cwd=ROOT, capture_output=True, text=True,
        check=True,
    ).stdout.split()  # fmt: skip
    assert set(tracked) <= set(context)  # nothing the package needs is left out
    others = {name for name in context if not name.startswith(("runtime/", "operator/"))}
    assert others == {"constraints.txt", "pyproject.toml", "README.md", "LICENSE"}
    assert not [name for name in context if "__pycache__" in name or name.endswith(".pyc")]


def test_the_dockerignore_matcher_keeps_out_what_docker_would() -> None:
    patterns = ignore_patterns()
    kept_out = [
        "__pycache__/x.pyc",
        "tests/test_image.py",
        ".venv/bin/python",
        ".git/HEAD",
        ".mypy_cache/x.json",
        "runtime/__pycache__/cli.cpython-311.pyc",
        "charts/luaq/values.yaml",
        "Dockerfile",
    ]
    for path in kept_out:
        assert ignored(path, patterns), path
    for path in ("runtime/cli.py", "operator/lua/x.lua", "README.md", "LICENSE", "constraints.txt"):
        assert not ignored(path, patterns), path


def test_the_image_is_slim_pinned_non_root_and_compiles_nothing() -> None:
    assert BUILD.name == "build"
    assert FINAL.base == BUILD.base  # the venv's python is the base image's
    # a patch release of the slim image, pinned by digest: a tag can be pushed again, a digest not
    for stage in STAGES:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+@sha256:[0-9a-f]{64}", stage.base), (
            stage.base
        )
    (user,) = FINAL.args("USER")
    assert re.fullmatch(r"[1-9]\d*:\d+", user), "a numeric, non-root USER"
    assert not FINAL.args("RUN"), "the final stage only copies the built venv"
    (install,) = BUILD.args("RUN")
    assert "--only-binary=:all:" in install  # no compiler needed, none used
    assert "--constraint constraints.txt" in install


def test_the_image_runs_luaq_by_default_as_the_workers_deployment_does(image: Image) -> None:
    body = next(doc for doc in example("email-worker.yaml") if doc["kind"] == "QueueConsumer")
    owner = {**body, "metadata": {"name": "w", "namespace": "ns", "uid": "u"}}
    spec = parse_spec(body["spec"], crd.spec_schema())
    worker = render.desired(owner, spec, OperatorSettings(), spec.source or "", {}, 1).deployment
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert image.command == container["command"]


def installed(image: Image, cwd: Path) -> dict[str, str]:
    """The distributions in the image's venv, name to version (the venv has no pip to ask)."""
    listed = image.run(
        "python", "-c",
        "import importlib.metadata as m\n"
        "for d in m.distributions(): print(d.metadata['Name'], d.version)",
        cwd=cwd,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    return dict(line.split(" ", 1) for line in listed.stdout.splitlines())


def test_every_installed_distribution_is_pinned_by_the_constraints(
    image: Image, tmp_path: Path
) -> None:
    distributions = installed(image, tmp_path)
    assert distributions.pop("luaq") == VERSION
    pinned = [
        line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    frozen = [f"{name}=={version}" for name, version in distributions.items()]
    assert sorted(f.lower() for f in frozen) == sorted(p.lower() for p in pinned), (
        "constraints.txt is stale: run `make constraints`"
    )


def test_the_venv_carries_no_installer_and_the_license(image: Image, tmp_path: Path) -> None:
    """pip, setuptools and wheel stay in the build stage; the package's dist-info has the
    LICENSE, so the wheel built there had it."""
    assert not {"pip", "setuptools", "wheel"} & set(installed(image, tmp_path))
    (site_packages,) = image.venv.glob("lib/python3*/site-packages")
    patterns = ["pip*", "setuptools*", "wheel*", "*distutils*"]
    leftovers = [
        *(path for pattern in patterns for path in site_packages.glob(pattern)),
        *image.venv.glob("bin/pip*"),
        *image.venv.glob("bin/wheel"),
    ]
    assert not leftovers
    imported = image.run("python", "-c", "import pip", cwd=tmp_path)
    assert imported.returncode != 0, "the image's python imports pip"
    licenses = list(site_packages.glob("luaq-*.dist-info/licenses/LICENSE"))
    assert licenses, "the build stage made a wheel without the LICENSE: COPY it"
    assert [path.read_bytes() for path in licenses] == [(ROOT / "LICENSE").read_bytes()]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in directory.rglob("*")
        if not path.is_symlink()
    }


def test_luaq_and_the_operator_run_from_the_image_writing_only_to_tmp(
    image: Image, tmp_path: Path
) -> None:
    """As on a read-only root filesystem: the image's files, the working directory and HOME
    stay as they are; only TMPDIR (the pod's /tmp) is written to."""
    work, home, tmp = tmp_path / "work", tmp_path / "home", tmp_path / "tmp"
    for directory in (work, home, tmp):
        directory.mkdir()
    shutil.copytree(EXAMPLE, work / "email")
    image.env.update(HOME=str(home), TMPDIR=str(tmp))
    before = snapshot(image.venv), snapshot(work)

    version = image.run("luaq", "--version", cwd=work)
    assert version.returncode == 0, version.stderr
    assert VERSION in version.stdout
    checked = image.run("luaq", "check", "email/app.yaml", cwd=work)
    assert checked.returncode == 0, checked.stderr
    ran = image.run(
        "luaq", "run", "email/app.yaml", "--input", "email/messages.jsonl", "--until-idle",
        cwd=work,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "email_worker" in ran.stdout
    helped = image.run("luaq-operator", "--help", cwd=work)
    assert helped.returncode == 0, helped.stderr
    assert "--image" in helped.stdout

    assert (snapshot(image.venv), snapshot(work)) == before
    assert list(home.iterdir()) == []
