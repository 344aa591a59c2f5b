"""What luaq publishes itself, not a handler: the lines of `luaq run --input` and the message
of `luaq publish`, each checked against the entries before anything starts, and their
publishing through a worker's host without consuming.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .codecs import CODECS
from .entries import Config, resolve_id
from .errors import EXIT_OK, ConfigError, QueueError, failed

if TYPE_CHECKING:
    from .worker import Worker


@dataclass(frozen=True)
class InputMessage:
    queue: str
    data: Any
    headers: dict[str, Any]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def message(
    config: Config, queue_id: str, data_text: str, header_texts: Sequence[str]
) -> InputMessage:
    """`luaq publish`'s message: DATA as JSON (a bare word as a string), each -H KEY=VALUE
    with VALUE as JSON when it parses to a number, a boolean or a string, else as text."""
    problems = []
    queue_id = resolve_id(queue_id, config.namespace)
    if queue_id not in config.queues:
        problems.append(f"QUEUE_ID: {queue_id} is not a declared queue.queue entry")
    data = _json_or_text(data_text)
    if data in (None, ""):
        problems.append("DATA: message data is empty")
    headers: dict[str, Any] = {}
    for header in header_texts:
        key, sep, value = header.partition("=")
        if not sep or not key:
            problems.append(f"-H {header}: expected KEY=VALUE")
            continue
        parsed = _json_or_text(value)
        headers[key] = parsed if isinstance(parsed, str | int | float | bool) else value
    if problems:
        raise ConfigError(problems)
    return InputMessage(queue_id, data, headers)


def read(path: Path, config: Config) -> list[InputMessage]:
    """The lines of `luaq run --input`: parsed and checked up front, so a bad line stops the run
    before it starts."""
    messages: list[InputMessage] = []
    problems: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            problems.append(f"{where}: not valid JSON: {exc}")
            continue
        if not isinstance(item, dict) or not isinstance(item.get("queue"), str):
            problems.append(f'{where}: expected {{"queue": ID, "data": ..., "headers": {{...}}}}')
            continue
        queue = resolve_id(item["queue"], config.namespace)
        headers = item.get("headers") or {}
        if queue not in config.queues:
            problems.append(f"{where}: queue: {queue} is not declared")
        elif item.get("data") in (None, ""):
            problems.append(f"{where}: data: message data is empty")
        elif not isinstance(headers, dict):
            problems.append(f"{where}: headers: must be an object")
        elif unknown := sorted(set(item) - {"queue", "data", "headers"}):
            problems.append(f"{where}: {', '.join(unknown)}: unknown field")
        else:
            try:
                CODECS[config.queues[queue].codec].encode(item["data"])
            except QueueError as exc:
                problems.append(f"{where}: data: {exc.message}")
                continue
            messages.append(InputMessage(queue, item["data"], headers))
    if problems:
        raise ConfigError(problems)
    return messages


async def publish(worker: Worker, messages: Sequence[InputMessage], show_ids: bool) -> int:
    """Publish without consuming: `luaq publish`, and --input before worker processes fork
    (each would publish it again)."""
    try:
        await worker.connect()
        for message in messages:
            message_id = await worker.host.publish("", message.queue, message.data, message.headers)
            if show_ids:
                print(message_id)
    except QueueError as exc:
        return failed(exc)
    finally:
        await worker.stop(0)
    return EXIT_OK
