"""The `luaq` command: runs with --input and --until-idle, the shipped example, bad input,
runtime failures, graceful shutdown of a real process on SIGTERM/SIGINT, and --help.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from luaq.runtime.cli import main
from luaq.runtime.consumer import Consumer
from luaq.runtime.drivers.memory import MemoryDelivery
from processes import (
    LUAQ,
    Process,
    Spawner,
    json_lines,
    reported,
    summary,
    wait_until,
    write_app,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "email"


# -- helpers -------------------------------------------------------------------------------------


def broker(**extra: Any) -> dict[str, Any]:
    return {"name": "broker", "kind": "queue.driver.memory", **extra}


def queue(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "queue.queue", "driver": "broker", **extra}


@dataclass
class Result:
    code: int
    out: str
    err: str


def luaq(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


# -- luaq run --input --until-idle ----------------------------------------------------------------

COUNTING_HANDLER = """
-- Module-level state: each message misbehaves at most once, so the counts are exact.
local seen = {}

function handle(payload)
  local n = payload.n
  local first = not seen[n]
  seen[n] = true
  if first and n % 3 == 0 then
    return nil, errors.new({message = "try again", kind = errors.UNAVAILABLE, retryable = true})
  end
  if first and n % 4 == 0 then
    return false
  end
  if first and n % 5 == 0 then
    error("boom")
  end
  assert(queue.publish("out", {n = n}))
end
"""


def test_run_until_idle_prints_exact_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "handler.lua").write_text(COUNTING_HANDLER)
    app = write_app(
        tmp_path / "app.yaml",
        [
            broker(),
            queue("in", retry={"delay": "5ms"}),
            queue("out"),
            {"name": "handler", "kind": "function.lua", "source": "file://handler.lua"}
            | {"method": "handle"},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "func": "handler"}
            | {"concurrency": 3},
            {"id": "sink", "kind": "queue.consumer", "queue": "app:out", "method": "sink"}
            | {"source": "function sink(payload) end"},
        ],
    )
    inputs = [{"queue": "in", "data": {"n": n}} for n in range(1, 11)]
    inputs.append({"queue": "app:out", "data": {"n": 0}, "headers": {"source": "input"}})
    messages = write_jsonl(tmp_path / "messages.jsonl", inputs)

    result = luaq(capsys, "run", app, "--input", messages, "--until-idle")

    assert result.code == 0, result.err
    rows = summary(result.out)
    assert set(rows) == {"app:worker", "app:sink"}
    # n = 1..10: 3, 6, 9 fail once (nil, err); 4, 8 return false once; 5, 10 raise once.
    worker = rows["app:worker"]
    assert worker["processed"] == 10 + 3 + 2 + 2
    assert worker["acked"] == 10
    assert worker["retried"] == 7
    assert worker["failed"] == 5
    assert (worker["rejected"], worker["requeued"], worker["stale"]) == (0, 0, 0)
    assert worker["rate"] > 0
    sink = rows["app:sink"]
    assert (sink["processed"], sink["acked"], sink["retried"], sink["failed"]) == (11, 11, 0, 0)
    failures = [line for line in json_lines(result.err) if line.get("msg") == "handler failed"]
    assert len(failures) == 5
    assert all(line["consumer"] == "app:worker" for line in failures)


def noop_app(directory: Path) -> Path:
    """One memory queue, `in`, and a consumer whose handler does nothing."""
    return write_app(
        directory / "app.yaml",
        [
            broker(),
            queue("in"),
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle"}
            | {"source": "function handle() end"},
        ],
    )


def test_run_until_idle_with_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = noop_app(tmp_path)

    result = luaq(capsys, "run", app, "--until-idle")

    assert result.code == 0, result.err
    assert summary(result.out)["app:worker"]["processed"] == 0


# -- the shipped example --------------------------------------------------------------------------


def test_email_example(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    messages = EXAMPLE / "messages.jsonl"
    lines = [line for line in messages.read_text().splitlines() if line.strip()]

    process = spawn("run", EXAMPLE / "app.yaml", "--input", messages, "--until-idle")
    code = process.wait(15)

    assert code == 0, process.stderr
    rows = summary(process.stdout)
    assert set(rows) == {"app:email_worker", "app:receipt_worker"}
    receipts, emails = rows["app:receipt_worker"], rows["app:email_worker"]
    assert receipts["processed"] == len(lines)
    assert receipts["acked"] == len(lines)
    assert emails["acked"] == len(lines)
    assert emails["retried"] > 0, "some emails fail on purpose and are tried again"
    assert emails["processed"] == emails["acked"] + emails["retried"]
    logs = process.logs()
    assert len(logs) == len(process.stderr.splitlines()), "every stderr line is JSON"
    handler_logs = [line for line in logs if line.get("msg") in ("Processing", "Receipt")]
    assert len([line for line in handler_logs if line["msg"] == "Receipt"]) == len(lines)
    for line in handler_logs:
        expected = "app:email_worker" if line["msg"] == "Processing" else "app:receipt_worker"
        assert line["consumer"] == expected, line
        assert line["message_id"], line


# -- bad --input ----------------------------------------------------------------------------------

LOGGING_APP = [
    broker(),
    queue("in"),
    {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle"}
    | {"source": 'function handle(payload) logger:info("HANDLED", {}) end'},
]


def assert_nothing_ran(result: Result) -> list[str]:
    assert result.code == 2, f"exit {result.code}\n{result.out}\n{result.err}"
    assert result.out == "", "no summary: nothing ran"
    assert "worker started" not in result.err
    assert "HANDLED" not in result.err
    *problems, summary = reported(result.err)  # JSON, as every line `luaq run` writes
    assert summary == f"{len(problems)} problem(s), nothing was started", result.err
    return problems


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"not valid JSON"),
        ('{"queue": "nope", "data": 1}', r"queue: app:nope is not declared"),
        ('{"queue": "app:missing", "data": 1}', r"queue: app:missing is not declared"),
        ('{"queue": "in"}', r"data: .*empty"),
        ('{"queue": "in", "data": ""}', r"data: .*empty"),
        ('{"data": 1}', r"queue"),
        ('{"queue": "in", "data": 1, "headers": [1]}', r"headers: "),
        ('{"queue": "in", "data": 1, "extra": 1}', r"extra: unknown field"),
    ],
    ids=[
        "invalid-json",
        "unknown-queue",
        "unknown-qualified-queue",
        "missing-data",
        "empty-data",
        "missing-queue",
        "headers-not-object",
        "unknown-field",
    ],
)
def test_bad_input_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str
) -> None:
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    messages = tmp_path / "messages.jsonl"
    messages.write_text(f'{{"queue": "in", "data": 1}}\n\n{line}\n{{"queue": "in", "data": 2}}\n')

    problems = assert_nothing_ran(luaq(capsys, "run", app, "--input", messages, "--until-idle"))

    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{messages}:3: "), problems[0]
    assert re.search(message, problems[0]), problems[0]


def test_every_bad_input_line_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    messages = tmp_path / "messages.jsonl"
    messages.write_text(
        '{"queue": "in", "data": 1}\n'
        "not json\n"
        '{"queue": "elsewhere", "data": 1}\n'
        '{"queue": "in", "headers": {"a": 1}}\n'
    )

    problems = assert_nothing_ran(luaq(capsys, "run", app, "--input", messages, "--until-idle"))

    assert [problem.split(": ", 1)[0] for problem in problems] == [
        f"{messages}:2",
        f"{messages}:3",
        f"{messages}:4",
    ]


def test_input_data_that_cannot_be_encoded_is_rejected_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`NaN` parses as JSON in Python but cannot be published: a bad line, caught before
    anything is published or processed (not a runtime failure halfway through the input)."""
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    messages = tmp_path / "messages.jsonl"
    messages.write_text('{"queue": "in", "data": 1}\n{"queue": "in", "data": {"x": NaN}}\n')

    problems = assert_nothing_ran(luaq(capsys, "run", app, "--input", messages, "--until-idle"))

    assert len(problems) == 1
    assert problems[0].startswith(f"{messages}:2: data: "), problems[0]


def test_input_file_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    missing = tmp_path / "missing.jsonl"

    problems = assert_nothing_ran(luaq(capsys, "run", app, "--input", missing, "--until-idle"))

    assert len(problems) == 1
    assert problems[0].startswith(f"{missing}: cannot read")


# -- runtime failure ------------------------------------------------------------------------------


def test_publishing_input_to_a_full_queue_is_a_runtime_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = write_app(
        tmp_path / "app.yaml",
        [
            broker(publish_timeout="100ms"),
            queue("in"),
            queue("full", driver_options={"memory": {"max_length": 1}}),
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle"}
            | {"source": "function handle() end"},
        ],
    )
    messages = write_jsonl(
        tmp_path / "messages.jsonl", [{"queue": "full", "data": {"n": n}} for n in range(3)]
    )

    started = time.monotonic()
    result = luaq(capsys, "run", app, "--input", messages, "--until-idle")
    elapsed = time.monotonic() - started

    assert result.code == 1, f"exit {result.code}\n{result.out}\n{result.err}"
    failure = reported(result.err)
    assert len(failure) == 1, result.err
    assert re.fullmatch(r"INTERNAL: queue full is full .*", failure[0]), failure[0]
    assert "Traceback" not in result.err
    assert "nothing was started" not in result.err
    assert elapsed < 5, "the publish timeout bounds the wait"


# -- graceful shutdown ---------------------------------------------------------------------------

SLEEPY_HANDLER = """
local time = require("time")

function handle(payload)
  logger:info("handling", {n = payload.n})
  time.sleep(payload.sleep)
  logger:info("handled", {n = payload.n})
end
"""


def sleepy_app(tmp_path: Path, seconds: float, count: int) -> tuple[Path, Path]:
    (tmp_path / "sleepy.lua").write_text(SLEEPY_HANDLER)
    app = write_app(
        tmp_path / "app.yaml",
        [
            broker(),
            queue("jobs"),
            {"name": "sleepy", "kind": "function.lua", "source": "file://sleepy.lua"}
            | {"method": "handle", "modules": ["queue", "logger", "json", "time"]},
            {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "func": "sleepy"}
            | {"concurrency": 2},
        ],
    )
    messages = write_jsonl(
        tmp_path / "messages.jsonl",
        [{"queue": "jobs", "data": {"n": n, "sleep": seconds}} for n in range(count)],
    )
    return app, messages


def wait_for_handler(process: Process) -> None:
    def handling() -> bool:
        if process.popen.poll() is not None:
            code = process.popen.returncode
            raise AssertionError(f"luaq exited early ({code}):\n{process.stderr}")
        return '"msg": "handling"' in process.stderr

    wait_until(handling, timeout=10, what="a handler log line")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_handlers_and_exits_0(
    tmp_path: Path, spawn: Callable[..., Process], signum: signal.Signals
) -> None:
    app, messages = sleepy_app(tmp_path, seconds=0.3, count=20)
    process = spawn("run", app, "--input", messages, "--shutdown-timeout", "5")
    wait_for_handler(process)

    process.popen.send_signal(signum)
    sent = time.monotonic()
    code = process.wait(timeout=10)
    elapsed = time.monotonic() - sent

    assert code == 0, process.stderr
    assert elapsed < 3, f"20 x 0.3 s / 2 would take 3 s; draining took {elapsed:.2f}s"
    worker = summary(process.stdout)["app:worker"]
    assert 1 <= worker["processed"] < 20, "stopped early, after the in-flight handlers"
    assert worker["acked"] == worker["processed"], "in-flight handlers finished within the grace"
    # the prefetched deliveries (10 held, 2 of them running) that never started are given back
    assert worker["requeued"] == min(8, 20 - worker["processed"])
    logs = process.logs()
    started = {line["fields"]["n"] for line in logs if line.get("msg") == "handling"}
    finished = {line["fields"]["n"] for line in logs if line.get("msg") == "handled"}
    assert started == finished, "every handler that started was allowed to finish"


def test_shutdown_timeout_cuts_long_handlers_short(
    tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    app, messages = sleepy_app(tmp_path, seconds=30, count=5)
    process = spawn("run", app, "--input", messages, "--shutdown-timeout", "0.2")
    wait_for_handler(process)

    process.popen.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = process.wait(timeout=10)
    elapsed = time.monotonic() - sent

    assert code == 0, process.stderr
    assert elapsed < 5, f"exited {elapsed:.2f}s after SIGTERM"
    worker = summary(process.stdout)["app:worker"]
    assert worker["acked"] == 0
    assert not any(line.get("msg") == "handled" for line in process.logs())
    warnings = [line for line in process.logs() if "shutdown timeout" in str(line.get("msg"))]
    assert warnings, process.stderr


def test_handlers_cut_short_at_shutdown_count_as_requeued(
    tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    """ConsumerStats: requeued = "given back at once: not started, or cut short, at
    shutdown"."""
    app, messages = sleepy_app(tmp_path, seconds=30, count=5)
    process = spawn("run", app, "--input", messages, "--shutdown-timeout", "0.2")
    wait_for_handler(process)
    wait_until(
        lambda: sum(line.get("msg") == "handling" for line in process.logs()) == 2,
        what="both handlers (concurrency 2) running",
    )

    process.popen.send_signal(signal.SIGTERM)
    code = process.wait(timeout=10)

    assert code == 0, process.stderr
    worker = summary(process.stdout)["app:worker"]
    assert worker["requeued"] >= 2, f"two invocations were cut off and requeued: {worker}"


def test_ctrl_c_while_the_lua_loads_stops_luaq_run(tmp_path: Path, spawn: Spawner) -> None:
    """Python raised KeyboardInterrupt inside a function Lua called (the bridge's keepalive),
    where a pcall swallowed it: the load went on, and the worker started as if nothing had
    been asked. Now it stops once the module is loaded, having started nothing."""
    app = write_app(tmp_path / "app.yaml", [
        broker(), queue("in"),
        {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle",
         "source": "local n = 0 for i = 1, 2e8 do n = n + i end function handle() end"},
    ])  # fmt: skip
    process = spawn("run", app, "--max-instructions", "10000000000")
    ticks = os.sysconf("SC_CLK_TCK")

    def cpu_seconds() -> float:  # (user time: the module's loop)
        stat = Path(f"/proc/{process.popen.pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[11]) / ticks

    wait_until(lambda: cpu_seconds() >= 0.5, 30, "loading the module")
    process.popen.send_signal(signal.SIGINT)

    assert process.wait(60) == 130, process.stderr
    assert reported(process.stderr) == ["interrupted, nothing was started"]
    assert "worker started" not in process.stderr


def test_ctrl_c_during_a_publish_is_no_success(tmp_path: Path, spawn: Spawner) -> None:
    """`luaq publish` cut short by Ctrl-C (its broker not answering yet) exited 0, and a script
    took the message as sent."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never speaks AMQP
        app = write_app(tmp_path / "app.yaml", [
            {"name": "broker", "kind": "queue.driver.amqp",
             "url": f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"},
            queue("out"),
        ])  # fmt: skip
        process = spawn("publish", "--entries", app, "app:out", "{}")
        silent.settimeout(30)
        connection, _ = silent.accept()
        with connection:
            process.popen.send_signal(signal.SIGINT)
            assert process.wait(30) == 128 + signal.SIGINT, process.stderr
    assert process.stderr.strip().splitlines()[-1] == "luaq: interrupted"


# -- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flags"),
    [
        (["--help"], ["check", "run", "--log-level"]),
        (["run", "--help"], ["--input", "--until-idle", "--shutdown-timeout", "PATH"]),
        (["check", "--help"], ["PATH"]),
    ],
    ids=["luaq", "run", "check"],
)
def test_help(args: list[str], flags: list[str]) -> None:
    result = subprocess.run([*LUAQ, *args], capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: luaq")
    for flag in flags:
        assert flag in result.stdout, flag


def test_no_command_is_a_usage_error() -> None:
    result = subprocess.run([*LUAQ], capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert "usage: luaq" in result.stderr


@pytest.mark.parametrize(
    "flag", ["--processes", "--shutdown-timeout", "--hard-timeout", "--max-instructions",
             "--lua-max-memory"],
)  # fmt: skip
def test_a_limit_of_luaq_run_that_is_no_limit_is_a_usage_error_in_its_log_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """Refused (exit 2) rather than taken to mean unlimited; said in a JSON line, as the
    reports of `luaq run` are, so that a pod whose flags are wrong says so to its log pipeline."""
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    with pytest.raises(SystemExit) as exited:
        main(["run", str(app), f"{flag}=-1", "--until-idle"])

    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (said,) = reported(captured.err)
    assert re.fullmatch(rf"luaq run: argument {flag}: must be at least \S+, got -1", said), said


@pytest.mark.parametrize(
    ("flag", "value"), [("--metrics-port", "65536"), ("--lua-max-memory", str(2**40 + 1))]
)
def test_a_number_too_large_for_luaq_run_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """Not an OverflowError from bind() or lupa, after the start: exit 2, and why."""
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    with pytest.raises(SystemExit) as exited:
        main(["run", str(app), f"{flag}={value}", "--until-idle"])

    assert exited.value.code == 2
    (said,) = reported(capsys.readouterr().err)
    assert re.fullmatch(rf"luaq run: argument {flag}: must be at most \S+, got {value}", said)


@pytest.mark.parametrize(
    ("args", "env", "error"),
    [
        (["--log-level", "loud", "run"], {}, "argument --log-level: invalid choice: 'loud'"),
        (["run"], {"LUAQ_LOG_LEVEL": "bogus"}, "argument --log-level: invalid choice: 'bogus'"),
        (["run"], {"LUAQ_LOG_FORMAT": "xml"}, "argument --log-format: invalid choice: 'xml'"),
        (["--bogus", "run"], {}, "unrecognized arguments: --bogus"),
    ],
    ids=["level-flag", "level-env", "format-env", "unknown-option"],
)
def test_wrong_logging_options_of_luaq_run_are_a_usage_error_in_a_log_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    error: str,
) -> None:
    """Even the options that say how to log: a bad one is one error line, logged as the
    defaults say (JSON off a terminal), not a traceback or argparse's usage."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = write_app(tmp_path / "app.yaml", LOGGING_APP)
    with pytest.raises(SystemExit) as exited:
        main([*args, str(app), "--until-idle"])

    assert exited.value.code == 2
    (said,) = reported(capsys.readouterr().err)
    assert said.startswith(f"luaq: {error}"), said


def test_a_usage_error_of_another_command_shows_the_usage() -> None:
    result = subprocess.run([*LUAQ, "check"], capture_output=True, text=True, timeout=30)

    assert result.returncode == 2
    assert result.stderr.startswith("usage: luaq check")
    assert result.stderr.endswith("error: the following arguments are required: PATH\n")


def test_run_until_idle_fails_when_a_message_was_left_unsettled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error in luaq itself, then one giving the message back: the queue looks empty and the
    broker has the message back only once the channel closes, so all is not done."""

    async def broken(*_: Any) -> None:
        raise RuntimeError("a bug in luaq")

    monkeypatch.setattr(Consumer, "_handle", broken)
    monkeypatch.setattr(MemoryDelivery, "retry", broken)
    app = noop_app(tmp_path)
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"queue": "in", "data": {"n": 1}}])

    result = luaq(capsys, "run", app, "--input", messages, "--until-idle")

    assert result.code == 1, result.err
    assert "giving the message back failed" in result.err
    assert (
        "1 message(s) left unsettled by an error in luaq (logged above): the queues look "
        "empty, but the broker delivers these again" in reported(result.err)
    )
