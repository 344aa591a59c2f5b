"""The entries file through the CLI: what `luaq check` accepts, and every way it says no.

Every test runs the real `luaq` entry point in-process on files written into a temporary
directory; configuration problems must come out as `file: entry: field: message` lines, exit 2,
and nothing may start.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from luaq.runtime.cli import main
from processes import reported

SUMMARY_RE = re.compile(r"luaq: (\d+) problem\(s\), nothing was started")

HANDLER = "function handle(payload) return true end\n"


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def problems(self) -> list[str]:
        """The problem lines of a rejected configuration (the summary line checked and removed)."""
        lines = self.err.splitlines()
        assert lines, "nothing on stderr"
        summary = SUMMARY_RE.fullmatch(lines[-1])
        assert summary, f"last stderr line is not the problem summary: {lines[-1]!r}\n{self.err}"
        assert int(summary.group(1)) == len(lines) - 1, f"summary count vs lines:\n{self.err}"
        return lines[:-1]


def luaq(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def rejected(result: Result) -> list[str]:
    """Assert a configuration error (exit 2, nothing started) and return its problem lines."""
    assert result.code == 2, (
        f"exit code {result.code}\nstdout:\n{result.out}\nstderr:\n{result.err}"
    )
    assert "nothing was started" in result.err
    assert result.out == "", f"nothing should be printed on stdout:\n{result.out}"
    assert "worker started" not in result.err
    return result.problems


def assert_problem(
    problems: list[str], path: Path, entry: str | None, field: str, message: str
) -> str:
    """One line is `path: entry: field: message` (`field` and `message` are regexes)."""
    where = re.escape(str(path)) + (f": {re.escape(entry)}" if entry else "")
    pattern = re.compile(rf"{where}: (?:{field}): (?P<message>.*)")
    for line in problems:
        match = pattern.fullmatch(line)
        if match and re.search(message, match.group("message"), re.IGNORECASE):
            return line
    listing = "\n".join(problems)
    raise AssertionError(
        f"no problem line `{path}: {entry}: {field}: /{message}/` among:\n{listing}"
    )


# -- writing entries files ---------------------------------------------------------------------


def write_entries(
    path: Path,
    entries: list[dict[str, Any]],
    namespace: str | None = "app",
    version: str | None = "1.0",
) -> Path:
    document: dict[str, Any] = {}
    if version is not None:
        document["version"] = version
    if namespace is not None:
        document["namespace"] = namespace
    document["entries"] = entries
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def broker(name: str = "broker", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "queue.driver.memory", **extra}


def queue(name: str, driver: str = "broker", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "queue.queue", "driver": driver, **extra}


def function(
    name: str = "handler", source: str = HANDLER, method: str = "handle", **extra: Any
) -> dict[str, Any]:
    return {"name": name, "kind": "function.lua", "source": source, "method": method, **extra}


def consumer(name: str = "worker", queue: str = "jobs", **extra: Any) -> dict[str, Any]:
    fields = {"func": "handler"} if not ({"func", "method", "source"} & set(extra)) else {}
    return {"id": name, "kind": "queue.consumer", "queue": queue, **fields, **extra}


def app(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    """A broker, a `jobs` queue, a `handler` function and a `worker` consumer, plus `extra`."""
    return [broker(), queue("jobs"), function(), consumer(), *extra]


# -- valid files ---------------------------------------------------------------------------------


def test_check_valid_file_reports_what_it_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "email.lua").write_text(
        "function handle_email(payload)\n  logger:info('sent', {to = payload.to})\nend\n"
    )
    path = write_entries(
        tmp_path / "app.yaml",
        [
            broker(),
            queue("emails", driver="app:broker", queue_name="emails"),
            {"id": "receipts", "kind": "queue.queue", "driver": "broker"},
            function("email_handler", "file://email.lua", "handle_email"),
            {
                "id": "email_worker",
                "kind": "queue.consumer",
                "queue": "app:emails",
                "func": "app:email_handler",
                "concurrency": 4,
                "prefetch": 20,
                "auto_ack": False,
            },
            {
                "name": "receipt_worker",
                "kind": "queue.consumer",
                "queue": "receipts",
                "method": "record",
                "source": "function record(receipt) end\n",
            },
        ],
    )

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "ok: 1 file(s), 1 driver(s), 2 queue(s), 2 function(s), 2 consumer(s)"
    email = next(line for line in lines if "app:email_worker" in line)
    assert "app:email_worker: app:emails -> app:email_handler" in email
    assert "concurrency 4" in email
    assert "prefetch 20" in email
    receipt = next(line for line in lines if "app:receipt_worker" in line)
    assert receipt.strip().startswith("app:receipt_worker: app:receipts")
    assert "concurrency 1" in receipt
    assert "prefetch 10" in receipt
    assert len(lines) == 3
    assert "nothing was started" not in result.err


def test_id_and_name_are_both_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(
        tmp_path / "app.yaml",
        [
            {"id": "broker", "kind": "queue.driver.memory"},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
            {"id": "app:other", "kind": "queue.queue", "driver": "app:broker"},
            {"name": "handler", "kind": "function.lua", "source": HANDLER, "method": "handle"},
            {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "func": "handler"},
            {"name": "worker2", "kind": "queue.consumer", "queue": "other", "func": "handler"},
        ],
    )

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err
    assert "2 queue(s)" in result.out
    assert "app:worker: app:jobs -> app:handler" in result.out
    assert "app:worker2: app:other -> app:handler" in result.out


def test_id_and_name_together_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_entries(
        tmp_path / "app.yaml",
        [broker(), {"id": "jobs", "name": "jobs", "kind": "queue.queue", "driver": "broker"}],
    )

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "entries[1]", "id|name", "either id or name")


def test_bare_names_resolve_in_the_file_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_entries(
        tmp_path / "shop.yaml",
        [
            broker(),
            queue("emails"),  # driver: broker -> shop:broker
            queue("orders", driver="shop:broker"),
            function(),
            consumer("mailer", queue="emails"),  # -> shop:emails, func -> shop:handler
            consumer("orderer", queue="shop:orders", func="shop:handler"),
        ],
        namespace="shop",
    )

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err
    assert "shop:mailer: shop:emails -> shop:handler" in result.out
    assert "shop:orderer: shop:orders -> shop:handler" in result.out


def test_bare_name_does_not_reach_another_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = write_entries(tmp_path / "a.yaml", [broker(), queue("jobs")], namespace="shared")
    app_file = write_entries(tmp_path / "b.yaml", [function(), consumer()], namespace="app")

    problems = rejected(luaq(capsys, "check", shared, app_file))

    assert_problem(problems, app_file, "app:worker", "queue", r"app:jobs is not a declared")


def test_several_files_load_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queues = write_entries(tmp_path / "queues.yaml", [broker(), queue("emails")])
    shared = write_entries(
        tmp_path / "shared.yaml", [broker("bus"), queue("jobs", driver="bus")], namespace="shared"
    )
    workers = write_entries(
        tmp_path / "workers.yaml",
        [function(), consumer("mailer", queue="emails"), consumer("jobber", queue="shared:jobs")],
    )

    alone = luaq(capsys, "check", workers)
    together = luaq(capsys, "check", queues, shared, workers)

    assert alone.code == 2, "the consumers' queues live in the other files"
    assert together.code == 0, together.err
    assert together.out.splitlines()[0] == (
        "ok: 3 file(s), 2 driver(s), 2 queue(s), 1 function(s), 2 consumer(s)"
    )
    assert "app:mailer: app:emails -> app:handler" in together.out
    assert "app:jobber: shared:jobs -> app:handler" in together.out


def test_directory_loads_every_yaml_and_yml_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config"
    write_entries(config / "queues.yaml", [broker(), queue("jobs")])
    write_entries(config / "workers.yml", [function(), consumer()])
    (config / "README.txt").write_text("not: [an entries file\n")
    (config / "handler.lua").write_text(HANDLER)

    result = luaq(capsys, "check", config)

    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == (
        "ok: 2 file(s), 1 driver(s), 1 queue(s), 1 function(s), 1 consumer(s)"
    )
    assert "app:worker: app:jobs -> app:handler" in result.out


def test_empty_directory_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()

    problems = rejected(luaq(capsys, "check", empty))

    assert len(problems) == 1
    assert problems[0].startswith(f"{empty}: ")


def test_file_source_is_relative_to_the_entries_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    (conf / "lua").mkdir(parents=True)
    (conf / "lua" / "h.lua").write_text("function from_conf(payload) end\n")
    # A decoy at the same relative path from the working directory: must not be the one read.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "lua").mkdir(parents=True)
    (elsewhere / "lua" / "h.lua").write_text("this is ( not lua\n")
    write_entries(
        conf / "app.yaml",
        [
            broker(),
            queue("jobs"),
            function("handler", "file://lua/h.lua", "from_conf"),
            consumer(),
            consumer("short", queue="jobs", method="from_conf", source="file://lua/h.lua"),
        ],
    )
    monkeypatch.chdir(elsewhere)

    absolute = luaq(capsys, "check", conf / "app.yaml")
    monkeypatch.chdir(tmp_path)
    relative = luaq(capsys, "check", Path("conf") / "app.yaml")

    assert absolute.code == 0, absolute.err
    assert relative.code == 0, relative.err


def test_inline_source_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = textwrap.dedent(
        """\
        local count = 0
        local M = {}
        function M.handle(payload)
          count = count + 1
          return true
        end
        return M
        """
    )
    path = write_entries(tmp_path / "app.yaml", app(function("table_handler", source, "handle")))

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err
    assert "2 function(s)" in result.out


def test_consumer_short_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "receipts.lua").write_text("function record(receipt) end\n")
    path = write_entries(
        tmp_path / "app.yaml",
        [
            broker(),
            queue("receipts"),
            {
                "id": "from_file",
                "kind": "queue.consumer",
                "queue": "receipts",
                "method": "record",
                "source": "file://receipts.lua",
            },
            {
                "id": "inline",
                "kind": "queue.consumer",
                "queue": "receipts",
                "method": "record",
                "source": "function record(receipt) end",
                "concurrency": 3,
            },
        ],
    )

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == (
        "ok: 1 file(s), 1 driver(s), 1 queue(s), 2 function(s), 2 consumer(s)"
    )
    assert "app:from_file: app:receipts" in result.out
    assert "app:inline: app:receipts" in result.out
    assert "concurrency 3" in result.out


@pytest.mark.parametrize("where", ["function", "consumer"])
def test_modules_list_is_accepted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """`modules: [queue, logger, json]`, as docs/lua-api.md writes it: a YAML list is accepted."""
    source = 'local time = require("time")\nfunction handle(p) time.sleep(0) end\n'
    modules = ["queue", "logger", "json", "time"]
    if where == "function":
        entries = [broker(), queue("jobs"), function(source=source, modules=modules), consumer()]
    else:
        short = consumer(method="handle", source=source, modules=modules)
        entries = [broker(), queue("jobs"), short]
    path = write_entries(tmp_path / "app.yaml", entries)

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err


def test_unknown_module_is_a_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(tmp_path / "app.yaml", app(function("other", modules=["queue", "os"])))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:other", r"modules(\.\d+)?", r"queue|logger|json|time")


# -- validation errors ---------------------------------------------------------------------------


def test_unknown_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(tmp_path / "app.yaml", app({"name": "mystery", "kind": "queue.topic"}))

    problems = rejected(luaq(capsys, "check", path))

    line = assert_problem(problems, path, "app:mystery", "kind", r"unknown kind 'queue\.topic'")
    assert "queue.queue" in line, "the known kinds are listed"
    assert len(problems) == 1


@pytest.mark.parametrize(
    ("entry", "entry_id", "field"),
    [
        ({"name": "nodriver", "kind": "queue.queue"}, "app:nodriver", "driver"),
        ({"name": "f", "kind": "function.lua", "source": HANDLER}, "app:f", "method"),
        ({"name": "f", "kind": "function.lua", "method": "handle"}, "app:f", "source"),
        ({"name": "c", "kind": "queue.consumer", "func": "handler"}, "app:c", "queue"),
    ],
    ids=["queue-driver", "function-method", "function-source", "consumer-queue"],
)
def test_missing_required_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    entry: dict[str, Any],
    entry_id: str,
    field: str,
) -> None:
    path = write_entries(tmp_path / "app.yaml", app(entry))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, entry_id, field, "required")
    assert len(problems) == 1


def test_entry_without_name_or_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(tmp_path / "app.yaml", app({"kind": "queue.queue", "driver": "broker"}))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "entries[4]", "name|id", "required")


def test_unknown_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(
        tmp_path / "app.yaml",
        [broker(), queue("jobs", colour="red"), function(), consumer(concurency=4)],
    )

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:jobs", "colour", "unknown field")
    assert_problem(problems, path, "app:worker", "concurency", "unknown field")
    assert len(problems) == 2


def test_unknown_top_level_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(
        yaml.safe_dump({"version": "1.0", "namespace": "app", "entries": app(), "extra": 1})
    )

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, None, "extra", "unknown field")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("concurrency", "4", "integer"),
        ("prefetch", "20", "integer"),
        ("auto_ack", "yes", "bool"),
    ],
)
def test_wrong_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: str, message: str
) -> None:
    # Strings in YAML ('4', 'yes'), not a number and a boolean.
    overrides: dict[str, Any] = {field: value}
    entries = [broker(), queue("jobs"), function(), consumer(**overrides)]
    path = write_entries(tmp_path / "app.yaml", entries)
    assert f"{field}: '{value}'" in path.read_text()

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:worker", field, message)
    assert len(problems) == 1


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("concurrency", 0, "1"),
        ("concurrency", 1001, "1000"),
        ("prefetch", 0, "1"),
        ("prefetch", 10001, "10000"),
    ],
)
def test_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: int, bound: str
) -> None:
    overrides: dict[str, Any] = {field: value}
    entries = [broker(), queue("jobs"), function(), consumer(**overrides)]
    path = write_entries(tmp_path / "app.yaml", entries)

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:worker", field, rf"(than|to) {bound}$")
    assert len(problems) == 1


def test_range_bounds_are_inclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(
        tmp_path / "app.yaml",
        [
            broker(),
            queue("jobs"),
            function(),
            consumer("low", concurrency=1, prefetch=1),
            consumer("high", concurrency=1000, prefetch=10000),
        ],
    )

    result = luaq(capsys, "check", path)

    assert result.code == 0, result.err
    assert "concurrency 1000, prefetch 10000" in result.out


@pytest.mark.parametrize(
    ("extra", "entry_id", "field", "target"),
    [
        (queue("orphan", driver="nobroker"), "app:orphan", "driver", "app:nobroker"),
        (consumer("lost", queue="nowhere"), "app:lost", "queue", "app:nowhere"),
        (consumer("lost", func="other:nothing"), "app:lost", "func", "other:nothing"),
    ],
    ids=["queue-driver", "consumer-queue", "consumer-func"],
)
def test_dangling_reference(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: dict[str, Any],
    entry_id: str,
    field: str,
    target: str,
) -> None:
    path = write_entries(tmp_path / "app.yaml", app(extra))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, entry_id, field, rf"{re.escape(target)} is not a declared")
    assert len(problems) == 1


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"queue_name": "q" * 227}, "queue_name", r"227 bytes long; .* at most 226"),
        ({"queue_name": "é" * 114}, "queue_name", r"228 bytes long"),  # bytes, not characters
        ({"queue_name": "amq.jobs"}, "queue_name", r"'amq.jobs': .*reserved"),
    ],
    ids=["too-long", "too-long-in-utf8", "reserved"],
)
def test_amqp_queue_names_the_broker_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict[str, Any], field: str,
    message: str,
) -> None:  # fmt: skip
    amqp = {"name": "rabbit", "kind": "queue.driver.amqp", "url": "amqp://localhost/"}
    path = write_entries(tmp_path / "app.yaml", app(amqp, queue("far", "rabbit", **fields)))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:far", field, message)
    assert len(problems) == 1


def test_the_longest_amqp_queue_name_and_a_longer_memory_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    amqp = {"name": "rabbit", "kind": "queue.driver.amqp", "url": "amqp://localhost/"}
    longest = queue("far", "rabbit", queue_name="q" * 226)
    path = write_entries(
        tmp_path / "app.yaml", app(amqp, longest, queue("near", queue_name="q" * 255))
    )

    assert luaq(capsys, "check", path).code == 0


def test_names_and_lists_have_bounds_no_one_reaches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bounds the QueueConsumer CRD carries (so the API server can cost its rules) are the
    entries file's own: `luaq check` refuses what the API server would."""
    too_long = queue("near", queue_name="q" * 256)
    long_id = consumer("w" * 256)
    path = write_entries(tmp_path / "app.yaml", app(too_long, long_id))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:near", "queue_name", "at most 255 characters")
    assert any("a name has at most 255 characters" in p for p in problems), problems


def test_reference_to_the_wrong_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(tmp_path / "app.yaml", app(consumer("odd", queue="handler")))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:odd", "queue", r"app:handler is not a declared")


def test_duplicate_id_within_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(
        tmp_path / "app.yaml", app({"id": "app:jobs", "kind": "queue.driver.memory"})
    )

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(
        problems, path, "app:jobs", "id|name", rf"already declared in {re.escape(str(path))}"
    )
    assert len(problems) == 1


def test_duplicate_id_across_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = write_entries(tmp_path / "a.yaml", app())
    second = write_entries(tmp_path / "b.yaml", [queue("jobs")])

    problems = rejected(luaq(capsys, "check", first, second))

    assert_problem(
        problems, second, "app:jobs", "id|name", rf"already declared in {re.escape(str(first))}"
    )
    assert len(problems) == 1


def test_lua_syntax_error_in_a_file_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lua = tmp_path / "broken.lua"
    lua.write_text("-- line 1\nfunction handle(payload)\n  local x = = 1\nend\n")
    path = write_entries(tmp_path / "app.yaml", app(function("broken", "file://broken.lua")))

    problems = rejected(luaq(capsys, "check", path))

    line = assert_problem(problems, path, "app:broken", "source", r"broken\.lua:3:")
    assert "'='" in line or "near" in line, "the Lua parser's message is kept"
    assert len(problems) == 1


@pytest.mark.parametrize("form", ["function", "consumer"])
def test_lua_syntax_error_in_inline_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    source = "function handle(payload)\n  return true\n\nend end\n"
    if form == "function":
        extra, entry_id = function("broken", source), "app:broken"
    else:
        extra, entry_id = consumer("broken", method="handle", source=source), "app:broken"
    path = write_entries(tmp_path / "app.yaml", app(extra))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, entry_id, "source", r":4:")
    assert len(problems) == 1


def test_lua_error_at_load_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = "local x = nil\nlocal y = x.field\nfunction handle() end\n"
    path = write_entries(tmp_path / "app.yaml", app(function("crashes", source)))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:crashes", "source", r":2:")


@pytest.mark.parametrize("form", ["function", "consumer"])
def test_method_not_defined_by_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    source = "function handel(payload) end\n"
    if form == "function":
        extra = function("typo", source, "handle")
    else:
        extra = consumer("typo", method="handle", source=source)
    path = write_entries(tmp_path / "app.yaml", app(extra))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:typo", "method|source", r"handle is not defined")
    assert len(problems) == 1


def test_consumer_with_both_func_and_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_entries(
        tmp_path / "app.yaml",
        app(consumer("both", func="handler", method="handle", source=HANDLER)),
    )

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:both", "func|method", r"either func .* or method")
    assert len(problems) == 1


def test_consumer_with_neither_func_nor_method(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = {"id": "idle", "kind": "queue.consumer", "queue": "jobs"}
    path = write_entries(tmp_path / "app.yaml", app(entry))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:idle", "func|method", r"needs func .* or method")
    assert len(problems) == 1


def test_consumer_method_without_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = {"id": "nosrc", "kind": "queue.consumer", "queue": "jobs", "method": "handle"}
    path = write_entries(tmp_path / "app.yaml", app(entry))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:nosrc", "method|source", r"needs a source")
    assert len(problems) == 1


def test_missing_namespace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(tmp_path / "app.yaml", app(), namespace=None)

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, None, "namespace", "required")
    assert len(problems) == 1


def test_unsupported_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_entries(tmp_path / "app.yaml", app(), version="2.0")

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, None, "version", r"unsupported version '2\.0'.*1\.0")
    assert len(problems) == 1


def test_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "app.yaml"
    path.write_text('version: "1.0"\nnamespace: app\nentries:\n  - name: [broker\n')

    result = luaq(capsys, "check", path)

    assert result.code == 2
    assert "nothing was started" in result.err
    assert result.err.startswith(f"{path}: not valid YAML")


def test_not_yaml_is_reported_on_one_line_with_its_location(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A problem is one `file: ...` line; the parser's location stays in it."""
    path = tmp_path / "app.yaml"
    path.write_text('version: "1.0"\nnamespace: app\nentries:\n  - name: [broker\n')

    problems = rejected(luaq(capsys, "check", path))

    assert len(problems) == 1, "one problem, one line"
    assert problems[0].startswith(f"{path}: ")
    assert re.search(r"line \d+", problems[0])


@pytest.mark.parametrize(
    "content", ["just a string\n", "- a\n- list\n", ""], ids=["scalar", "list", "empty"]
)
def test_yaml_that_is_not_an_entries_document(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = tmp_path / "app.yaml"
    path.write_text(content)

    problems = rejected(luaq(capsys, "check", path))

    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: ")
    assert "mapping" in problems[0]


def test_path_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.yaml"

    problems = rejected(luaq(capsys, "check", missing))

    assert problems == [f"{missing}: no such file or directory"]


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_file_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    target = tmp_path / "handler.lua"
    if kind == "directory":
        target.mkdir()
    elif kind == "not-utf8":
        target.write_bytes(b"function handle() return '\xff\xfe' end\n")
    path = write_entries(tmp_path / "app.yaml", app(function("unread", "file://handler.lua")))

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:unread", "source", rf"cannot read {re.escape(str(target))}")
    assert len(problems) == 1


def test_every_problem_of_a_file_is_reported_in_one_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_entries(
        tmp_path / "app.yaml",
        [
            broker(),
            queue("jobs"),
            function(),
            {"name": "mystery", "kind": "queue.topic"},
            {"name": "nodriver", "kind": "queue.queue"},
            consumer("busy", concurrency=0, prefetch="many"),
            consumer("lost", queue="nowhere"),
            function("broken", "function handle(\n"),
            queue("jobs"),
        ],
    )

    problems = rejected(luaq(capsys, "check", path))

    assert_problem(problems, path, "app:mystery", "kind", "unknown kind")
    assert_problem(problems, path, "app:nodriver", "driver", "required")
    assert_problem(problems, path, "app:busy", "concurrency", "greater than or equal to 1")
    assert_problem(problems, path, "app:busy", "prefetch", "integer")
    assert_problem(problems, path, "app:lost", "queue", "app:nowhere is not a declared")
    assert_problem(problems, path, "app:broken", "source", r":\d+:")
    assert_problem(problems, path, "app:jobs", "id|name", "already declared")
    assert len(problems) == 7, "\n".join(problems)


def test_problems_of_several_files_are_reported_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_entries(tmp_path / "a.yaml", app(), version="9")
    second = write_entries(tmp_path / "b.yaml", [queue("more", driver="ghost")])
    missing = tmp_path / "c.yaml"

    problems = rejected(luaq(capsys, "check", first, second, missing))

    assert_problem(problems, first, None, "version", "unsupported")
    assert_problem(problems, second, "app:more", "driver", "app:ghost is not a declared")
    assert f"{missing}: no such file or directory" in problems
    assert len(problems) == 3, "\n".join(problems)


def test_run_with_a_configuration_error_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = 'function handle(payload) logger:info("HANDLER RAN", {}) end\n'
    path = write_entries(
        tmp_path / "app.yaml",
        [broker(), queue("jobs"), function(source=source), consumer(), consumer("bad", prefetch=0)],
    )
    messages = tmp_path / "messages.jsonl"
    messages.write_text('{"queue": "jobs", "data": {"n": 1}}\n')

    result = luaq(capsys, "run", path, "--input", messages, "--until-idle")

    assert (result.code, result.out) == (2, ""), result.err
    *problems, summary = reported(result.err)  # JSON, as every line `luaq run` writes
    assert summary == "1 problem(s), nothing was started"
    assert_problem(problems, path, "app:bad", "prefetch", "greater than or equal to 1")
    assert "HANDLER RAN" not in result.err
