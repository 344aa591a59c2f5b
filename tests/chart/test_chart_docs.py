"""charts/luaq/README.md is what scripts/chart_docs.py writes from the chart (`make chart-docs`),
and it documents every value with its default."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "luaq"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_docs", ROOT / "scripts" / "chart_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


chart_docs = _load()


def test_the_committed_readme_is_the_generated_one() -> None:
    committed = (CHART / "README.md").read_text()
    assert committed == chart_docs.readme(CHART), "charts/luaq/README.md: run `make chart-docs`"
    assert chart_docs.main(["--check"]) == 0


def leaves(values: dict[str, object], prefix: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def test_every_value_is_in_the_table_with_its_default_and_a_description() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = {row.key: row for row in chart_docs.rows((CHART / "values.yaml").read_text())}
    for path, default in leaves(values).items():
        # a value is listed itself, or within a map listed whole
        parts = path.split(".")
        listed = next(".".join(parts[:n]) for n in range(len(parts), 0, -1)
                      if ".".join(parts[:n]) in rows)  # fmt: skip
        row = rows[listed]
        assert row.description, listed
        if listed == path:
            assert json.loads(row.default) == default, path
        else:
            whole = json.loads(row.default)
            for part in parts[len(listed.split(".")) :]:
                whole = whole[part]
            assert whole == default, path
    readme = (CHART / "README.md").read_text()
    for key in rows:
        assert f"| `{key}` |" in readme


def test_the_table_reads_the_comment_above_a_value_or_after_it(tmp_path: Path) -> None:
    text = (
        "# A file's own comment, not a value's.\n"
        "\n"
        "# The first.\n"
        "# Two lines.\n"
        "first: 1\n"
        "second: [a, b]  # After it | with a pipe.\n"
        "# A group of values.\n"
        "group:\n"
        "  # Inside it: <name> and a glob registry/*, `<kept> *` in code.\n"
        "  inner: x\n"
        "# A map listed whole.\n"
        "whole:\n"
        "  a: {b: true}\n"
    )
    rows = chart_docs.rows(text)
    assert [(r.key, r.type, r.default, r.description) for r in rows] == [
        ("first", "int", "1", "The first. Two lines."),
        ("second", "list", '["a","b"]', "After it | with a pipe."),
        ("group", "object", "", "A group of values."),
        ("group.inner", "string", '"x"',
         "Inside it: <name> and a glob registry/*, `<kept> *` in code."),
        ("whole", "object", '{"a":{"b":true}}', "A map listed whole."),
    ]  # fmt: skip
    assert chart_docs._cell(rows[3].description) == (
        "Inside it: &lt;name&gt; and a glob registry/\\*, `<kept> *` in code."
    )
    assert chart_docs._cell(rows[1].description) == "After it \\| with a pipe."


@pytest.mark.parametrize(
    "text",
    ["documented: 1\nnot: 2\n", "# A group.\ngroup:\n  # One.\n  one: 1\n  two: 2\n",
     "# Separated by a blank line.\n\nvalue: 1\n"],
)  # fmt: skip
def test_a_value_without_a_description_stops_the_generation(text: str, tmp_path: Path) -> None:
    with pytest.raises(chart_docs.Undocumented):
        chart_docs.rows(text)
    chart = tmp_path / "chart"
    chart.mkdir()
    (chart / "Chart.yaml").write_text((CHART / "Chart.yaml").read_text())
    (chart / "values.yaml").write_text(text)
    assert chart_docs.main(["--chart", str(chart)]) == 2
    assert not (chart / "README.md").exists()


def test_check_fails_on_a_stale_readme(tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    chart.mkdir()
    for name in ("Chart.yaml", "values.yaml"):
        (chart / name).write_text((CHART / name).read_text())
    assert chart_docs.main(["--chart", str(chart), "--check"]) == 1
    assert chart_docs.main(["--chart", str(chart)]) == 0
    assert chart_docs.main(["--chart", str(chart), "--check"]) == 0
    values = (chart / "values.yaml").read_text().replace("replicaCount: 1", "replicaCount: 2")
    (chart / "values.yaml").write_text(values)
    assert chart_docs.main(["--chart", str(chart), "--check"]) == 1
