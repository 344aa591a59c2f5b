"""The code's shape: each room (a module of runtime/ or operator/, or a package there, such as
drivers/ or lua/, whose modules are its private parts) has one job, so none but the composition
root (runtime/assembly.py, which wires the worker's parts) needs more than a handful of the other
rooms. A module that imports many rooms is a hub every change passes through."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"runtime": "luaq.runtime", "operator": "luaq.operator"}
MOST = 5
COMPOSITION_ROOT = "luaq.runtime.assembly"


def modules() -> dict[str, Path]:
    """Every project module by its import name (a package by its own name)."""
    found: dict[str, Path] = {}
    for directory, package in PACKAGES.items():
        for path in (ROOT / directory).rglob("*.py"):
            parts = path.relative_to(ROOT / directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def project_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports, whether at run time or for type checking: `from a
    import b` names module a.b when b is a module, and module a when b is one of its names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    imported.add(f"{base}.{alias.name}")
                elif base in known:
                    imported.add(base)
    imported.discard(name)
    return imported


def room(name: str) -> str:
    """luaq.runtime.drivers.amqp.client is in room luaq.runtime.drivers; luaq.runtime in its own."""
    return ".".join(name.split(".")[:3])


def test_no_module_but_the_composition_root_imports_more_than_five_other_rooms() -> None:
    found = modules()
    hubs = {
        name: sorted(rooms)
        for name, path in found.items()
        if name != COMPOSITION_ROOT
        and len(rooms := {room(i) for i in project_imports(name, path, set(found))} - {room(name)})
        > MOST
    }
    assert not hubs, "\n".join(f"{name}: {len(i)} {i}" for name, i in sorted(hubs.items()))


def test_the_counting_sees_every_form_of_import() -> None:
    """The rule above can fail: the counter finds absolute, relative, package and module imports."""
    found = modules()
    imported = project_imports(COMPOSITION_ROOT, found[COMPOSITION_ROOT], set(found))
    assert {"luaq.runtime.worker", "luaq.runtime.entries"} <= imported
    cli = project_imports("luaq.runtime.cli", found["luaq.runtime.cli"], set(found))
    assert "luaq.runtime" in cli or "luaq.runtime.assembly" in cli


def test_no_file_cites_what_is_not_in_the_repository() -> None:
    """Design notes and the Lua API live in docs/; an issue number or a file outside the repository
    means nothing to a reader of a clone."""
    # (DESIGN.md in capitals: docs/design.md is the repository's own)
    pattern = re.compile(
        r"(?-i:DESIGN\.md)|lua-queue-module\.md|\(issues? \d+|\bissues? #?\d+\b", re.I
    )
    cited = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for suffix in ("py", "lua", "md", "yaml", "yml", "toml", "sh", "txt")
        for path in ROOT.rglob(f"*.{suffix}")
        if not {".git", ".venv", "node_modules"} & set(path.relative_to(ROOT).parts)
        and path != Path(__file__)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not cited, "\n".join(cited)
