"""The entries file: what the user declared, validated as a whole before anything starts.

One or more YAML files (or directories of them) describe drivers, queues, Lua functions and
consumers. Every problem is collected and reported as `file: entry: field: message`, so a user
fixes a file in one pass instead of one error per run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)

ENTRIES_FORMAT = "1.0"  # the `version` an entries file states
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")

# Bounds on the strings and lists an entry holds, far beyond any real use: they cap what one
# entry weighs, and so what a QueueConsumer (whose CRD is generated from these models) may
# weigh, and they let the Kubernetes API server estimate the cost of its validation rules.
SHORT = 255  # an AMQP short string: queue names, consumer tags, virtual hosts
MANY = 100  # list items: policies, their patterns and conditions
Short = Annotated[str, StringConstraints(max_length=SHORT)]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


_DURATION_LENGTH = 32


def parse_duration(value: Any) -> float:
    """Seconds from `10s`, `500ms`, `1.5m`, `1h` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 10s, 500ms, 1h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif (
        isinstance(value, str)
        and len(value) <= _DURATION_LENGTH
        and (match := _DURATION_RE.match(value))
    ):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration like 10s, 500ms, 1h, got {value!r}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def resolve_id(ref: str, namespace: str) -> str:
    """`name` -> `namespace:name`; `ns:name` stays as it is."""
    return ref if ":" in ref else f"{namespace}:{ref}"


def _check_id(value: str) -> str:
    parts = value.split(":")
    if len(parts) != 2 or not all(NAME_RE.match(part) for part in parts):
        raise ValueError(f"{value!r} is not a valid id (expected name or namespace:name)")
    if max(map(len, parts)) > SHORT:
        raise ValueError(f"{value[:40]}...: a name has at most {SHORT} characters")
    return value


def _resolve_ref(value: str, info: ValidationInfo) -> str:
    context: dict[str, Any] = info.context or {}
    return _check_id(resolve_id(value, context["namespace"]))


# The JSON schemas below are what the QueueConsumer CRD is generated from (luaq.operator.crd).
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": _DURATION_RE.pattern, "maxLength": _DURATION_LENGTH},
            ],
            "description": "seconds, or a duration like 500ms, 10s, 1.5m, 1h",
        }
    ),
]
Ref = Annotated[
    str,
    AfterValidator(_resolve_ref),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": rf"^({NAME_RE.pattern[1:-1]}:)?{NAME_RE.pattern[1:-1]}$",
            "maxLength": 2 * SHORT + 1,
            "description": "an id, namespace:name, or a bare name in the file's namespace",
        }
    ),
]
Module = Literal["queue", "logger", "json", "time", "metrics"]
DEFAULT_MODULES: tuple[Module, ...] = ("queue", "logger", "json")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Entry(_Model):
    id: str
    kind: str
    file: Path = Field(exclude=True)

    # cached (entries are frozen): a publish looks its queue's name up every time
    @cached_property
    def namespace(self) -> str:
        return self.id.split(":", 1)[0]

    @cached_property
    def name(self) -> str:
        return self.id.split(":", 1)[1]


class _DriverEntry(_Entry):
    # Bigger bodies are refused on publish and rejected (or dead-lettered) on receipt.
    max_message_size: int = Field(4 * 2**20, ge=1)


class MemoryDriverEntry(_DriverEntry):
    """The embedded in-process broker: no server, nothing survives the process."""

    kind: Literal["queue.driver.memory"]
    publish_timeout: Duration = 5.0


_ENV_RE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """Replace `${env:NAME}` in every string, so secrets come from the pod's environment."""
    if isinstance(value, dict):
        return {k: _expand_env(v, environ, f"{where}{k}.") for k, v in value.items()}
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ValueError(f"{where.rstrip('.')}: environment variable {name} is not set")
            return environ[name]

        return _ENV_RE.sub(lookup, value)
    return value


class TlsOptions(_Model):
    """PEM material inline, as file://path, or from ${env:NAME}."""

    enabled: bool = False
    server_name: Short | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure_skip_verify: bool = False


def _whole_seconds(seconds: float) -> float:
    """AMQP negotiates its heartbeat in whole seconds, as a 16-bit number; 0 turns it off.
    Nothing is rounded: 400ms would round to 0, heartbeats off, the opposite of what was
    meant."""
    if 0 < seconds < 1:
        raise ValueError(
            f"AMQP heartbeats are whole seconds: {seconds:g}s would be 0, which turns them off "
            "(write 0 for that, or at least 1s)"
        )
    if seconds != int(seconds):
        raise ValueError(
            f"AMQP heartbeats are whole seconds: {seconds:g}s is not one (write "
            f"{int(seconds)}s or {int(seconds) + 1}s)"
        )
    if seconds > 65_535:
        raise ValueError(f"AMQP heartbeats are at most 65535s, not {seconds:g}s")
    return seconds


class AmqpDriverEntry(_DriverEntry):
    """A RabbitMQ (or any AMQP 0-9-1) broker connection, recovered with backoff when lost."""

    kind: Literal["queue.driver.amqp"]
    url: str = "amqp://guest:guest@localhost:5672/"
    vhost: Short | None = None
    connection_name: Short | None = None
    heartbeat: Annotated[Duration, AfterValidator(_whole_seconds)] | None = None
    connection_timeout: Duration = 10.0  # also bounds every other wait on the broker
    # how long a publish may wait for the link, a blocking broker and its confirm
    publish_timeout: Duration = 10.0
    reconnect_delay: Duration = 1.0
    reconnect_max_delay: Duration = 30.0
    default_message_ttl: Duration | None = None
    default_queue_expiry: Duration | None = None
    prefetch_count: int | None = Field(None, ge=1, le=65_535)
    tls: TlsOptions = TlsOptions()

    @model_validator(mode="before")
    @classmethod
    def _environment(cls, data: Any, info: ValidationInfo) -> Any:
        environ = (info.context or {}).get("environ")
        if not isinstance(data, dict):
            return data
        return _expand_env(data, os.environ if environ is None else environ)

    @model_validator(mode="after")
    def _check(self) -> AmqpDriverEntry:
        if not self.url.startswith(("amqp://", "amqps://")):
            raise ValueError("url: must start with amqp:// or amqps://")
        # The URL holds a password: no message quotes any part of it.
        unreadable = ValueError(
            "url: cannot be read as amqp://user:password@host:port/vhost (a '/', '?', '#' "
            "or '@' in the user, password or vhost must be percent-encoded, as %2F, %3F, %23, %40)"
        )
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise unreadable from None
        # amqp://u:12/pw@host/ is host u, port 12 and a path: its password would be in the clear
        if "@" in parts.path or parts.path.count("/") > 1:
            raise unreadable
        if parts.query or parts.fragment:
            raise ValueError(
                "url: query parameters are not read; use the entry's fields (heartbeat, "
                "connection_timeout, connection_name, tls, ...), and percent-encode a '?' or "
                "'#' in the password"
            )
        if self.reconnect_max_delay < self.reconnect_delay:
            raise ValueError("reconnect_max_delay: must not be less than reconnect_delay")
        return self


class MemoryQueueOptions(_Model):
    max_length: int = Field(1000, ge=1, le=10_000_000)


class AmqpQueueOptions(_Model):
    durable: bool = True
    auto_delete: bool = False
    message_ttl: Duration | None = None
    queue_expiry: Duration | None = None
    max_length: int | None = Field(None, ge=1)
    max_priority: int | None = Field(None, ge=1, le=255)
    type: Literal["classic", "quorum"] = "classic"


class QueueDriverOptions(_Model):
    memory: MemoryQueueOptions = MemoryQueueOptions()
    amqp: AmqpQueueOptions = AmqpQueueOptions()


class DeadLetter(_Model):
    """After `max_attempts` failed invocations a message moves to `queue`, or, without one, is
    rejected (dropped, unless the broker dead-letters it by its own policy); a body that cannot
    be decoded goes the same way at once. Without `dead_letter` nothing is ever dropped: a
    failing message is retried, with backoff, until it succeeds."""

    queue: Ref | None = None
    max_attempts: int = Field(5, ge=1, le=1000)


class Retry(_Model):
    """Wait before a failed message is tried again: `delay`, times `multiplier` per attempt,
    at most `max_delay`. The consumer is not blocked meanwhile. There is always a delay: an
    instant requeue would run a failing message again and again as fast as the CPU allows."""

    delay: Duration = 1.0
    max_delay: Duration = 60.0
    multiplier: float = Field(2.0, ge=1.0, le=100.0, strict=False)

    @model_validator(mode="after")
    def _some_delay(self) -> Retry:
        if self.delay < 0.001:
            raise ValueError("delay: must be at least 1ms (a retry without delay would spin)")
        return self

    def delay_after(self, attempts: int) -> float:
        """The wait after the `attempts`-th attempt failed. Capped before it is computed: the
        power alone overflows a float past a thousand attempts or so."""
        exponent = max(attempts - 1, 0)
        if self.delay >= self.max_delay:
            return float(self.max_delay)
        if exponent * math.log(self.multiplier) >= math.log(self.max_delay / self.delay):
            return float(self.max_delay)
        return float(min(self.delay * self.multiplier**exponent, self.max_delay))

    def delays(self) -> list[float]:
        """Every distinct wait this policy gives, shortest first: `delay` times each power of
        `multiplier` below `max_delay`, then `max_delay` (a finite list)."""
        found = [self.delay_after(1)]
        attempts = 1
        while found[-1] < self.max_delay and self.multiplier > 1:
            attempts += 1
            found.append(self.delay_after(attempts))
        return found


DEFAULT_RETRY = Retry()  # 1s, doubling up to 60s: for a consumer and queue without `retry`


class QueueEntry(_Entry):
    kind: Literal["queue.queue"]
    driver: Ref
    queue_name: str | None = Field(None, min_length=1, max_length=SHORT)
    codec: Literal["json/plain", "application/msgpack"] = "json/plain"
    dead_letter: DeadLetter | None = None
    retry: Retry | None = None
    driver_options: QueueDriverOptions = QueueDriverOptions()

    @cached_property
    def external_name(self) -> str:
        return self.queue_name or self.name


class _LuaSource(_Model):
    """A `source:` that is `file://path` (relative to the entries file) or inline Lua."""

    source: str | None = None
    _text: str = PrivateAttr("")
    _origin: str = PrivateAttr("")

    @property
    def source_text(self) -> str:
        return self._text

    @property
    def source_name(self) -> str:
        """The file the source came from, or "" when it is inline."""
        return self._origin

    @model_validator(mode="after")
    def _read_source(self, info: ValidationInfo) -> _LuaSource:
        if self.source is None:
            return self
        base: Path = (info.context or {})["base_dir"]
        if self.source.startswith("file://"):
            path = (base / self.source.removeprefix("file://")).resolve()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"source: cannot read {path}: {exc}") from exc
            name = str(path)
        else:
            text, name = self.source, ""
        self._text, self._origin = text, name
        return self


class FunctionEntry(_Entry, _LuaSource):
    kind: Literal["function.lua"]
    source: str = Field(min_length=1)
    method: str = Field(min_length=1, max_length=SHORT)
    modules: tuple[Module, ...] = Field(DEFAULT_MODULES, strict=False, max_length=MANY)


class ConsumerAmqpOptions(_Model):
    consumer_tag: Short | None = None
    exclusive: bool = False


class ConsumerDriverOptions(_Model):
    amqp: ConsumerAmqpOptions = ConsumerAmqpOptions()


Operator = Literal[
    "eq", "ne", "lt", "gt", "lte", "gte", "in", "nin", "exists", "nexists",
    "contains", "ncontains", "matches", "nmatches",
]  # fmt: skip
Patterns = Annotated[
    tuple[Short, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v)
]
_FIELD = r"^(actor\.id|actor\.meta\..+|action|resource|meta\..+)$"


class Condition(_Model):
    """`field` (actor.id, actor.meta.*, action, resource, meta.*) compared with `value`, or
    with another field named by `value_from`."""

    field: str = Field(pattern=_FIELD, max_length=SHORT)
    operator: Operator
    value: Any = None
    value_from: str | None = Field(None, pattern=_FIELD, max_length=SHORT)

    @model_validator(mode="after")
    def _operand(self) -> Condition:
        unary = self.operator in ("exists", "nexists")
        given = ("value" in self.model_fields_set) + (self.value_from is not None)
        if unary and given:
            raise ValueError(f"operator: {self.operator} takes no value")
        if not unary and given != 1:
            raise ValueError(f"value: {self.operator} needs exactly one of value or value_from")
        listed = self.value_from is not None or isinstance(self.value, list)
        if self.operator in ("in", "nin") and not listed:
            raise ValueError(f"value: {self.operator} needs a list")
        if self.operator in ("matches", "nmatches") and self.value_from is None:
            try:
                re.compile(str(self.value))
            except re.error as exc:
                raise ValueError(f"value: not a valid regular expression: {exc}") from exc
        return self


class PolicyRule(_Model):
    actions: Patterns = Field(strict=False, min_length=1, max_length=MANY)
    resources: Patterns = Field(("*",), strict=False, min_length=1, max_length=MANY)
    effect: Literal["allow", "deny"]
    conditions: tuple[Condition, ...] = Field((), strict=False, max_length=MANY)


class PolicyEntry(_Entry):
    """A rule for actors that name it, or that are in one of its groups."""

    kind: Literal["security.policy"]
    policy: PolicyRule
    groups: tuple[str, ...] = Field((), strict=False)


class Actor(_Model):
    id: str = Field(min_length=1, max_length=SHORT)
    meta: dict[str, Any] = Field(default_factory=dict, max_length=MANY)


class ConsumerSecurity(_Model):
    actor: Actor | None = None
    policies: tuple[Ref, ...] = Field((), strict=False)
    groups: tuple[str, ...] = Field((), strict=False)


class ConsumerEntry(_Entry, _LuaSource):
    kind: Literal["queue.consumer"]
    queue: Ref
    func: Ref | None = None
    method: str | None = Field(None, min_length=1, max_length=SHORT)
    modules: tuple[Module, ...] = Field(DEFAULT_MODULES, strict=False, max_length=MANY)
    concurrency: int = Field(1, ge=1, le=1000)
    prefetch: int = Field(10, ge=1, le=10_000)
    auto_ack: bool = False
    retry: Retry | None = None  # overrides the queue's
    driver_options: ConsumerDriverOptions = ConsumerDriverOptions()
    security: ConsumerSecurity = ConsumerSecurity()

    @model_validator(mode="after")
    def _one_handler(self) -> ConsumerEntry:
        if self.func and (self.method or self.source):
            raise ValueError("func: give either func (a function.lua entry) or method with source")
        if not self.func and not self.method:
            raise ValueError("func: needs func (a function.lua entry) or method with source")
        if self.method and not self.source:
            raise ValueError("method: needs a source (file://path or inline Lua) on the consumer")
        return self

    @property
    def function_id(self) -> str:
        """The function this consumer runs; short-form consumers get a private one."""
        return self.func or f"{self.id}#handler"

    def inline_function(self) -> FunctionEntry | None:
        if self.func or self.method is None or self.source is None:
            return None
        function = FunctionEntry.model_construct(
            id=self.function_id,
            kind="function.lua",
            file=self.file,
            source=self.source,
            method=self.method,
            modules=self.modules,
        )
        function._text, function._origin = self._text, self._origin
        return function


DriverEntry = MemoryDriverEntry | AmqpDriverEntry
KINDS: dict[str, type[_Entry]] = {
    "queue.driver.memory": MemoryDriverEntry,
    "queue.driver.amqp": AmqpDriverEntry,
    "queue.queue": QueueEntry,
    "function.lua": FunctionEntry,
    "queue.consumer": ConsumerEntry,
    "security.policy": PolicyEntry,
}


@dataclass
class Config:
    """Everything that validated; `problems` lists what did not (empty means runnable)."""

    drivers: dict[str, DriverEntry] = field(default_factory=dict)
    queues: dict[str, QueueEntry] = field(default_factory=dict)
    functions: dict[str, FunctionEntry] = field(default_factory=dict)
    consumers: dict[str, ConsumerEntry] = field(default_factory=dict)
    policies: dict[str, PolicyEntry] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def label(self, entry: _Entry) -> str:
        return f"{entry.file}: {entry.id}"

    @property
    def namespace(self) -> str:
        """Where a bare queue name given on the command line resolves: the queues' namespace."""
        return next(iter(self.queues.values())).namespace if self.queues else "app"


def _format_error(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"] if part != "function-after")
    message = str(error["msg"]).removeprefix("Value error, ")
    message = {
        "Extra inputs are not permitted": "unknown field",
        "Field required": "required",
    }.get(message, message)
    return f"{loc}: {message}" if loc else message


def _files(paths: Iterable[Path | str]) -> tuple[list[Path], list[str]]:
    files: list[Path] = []
    problems: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
            if not found:
                problems.append(f"{path}: no .yaml or .yml files in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems


def _parse_file(path: Path, problems: list[str]) -> tuple[str, list[Any]] | None:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{path}: cannot read: {exc}")
        return None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.append(f"{path}: not valid YAML: {where}{problem}")
        return None
    if not isinstance(document, dict):
        problems.append(f"{path}: expected a mapping with version, namespace and entries")
        return None
    ok = True
    for key in sorted(set(document) - {"version", "namespace", "entries"}):
        problems.append(f"{path}: {key}: unknown field")
        ok = False
    version = document.get("version", ENTRIES_FORMAT)
    if str(version) != ENTRIES_FORMAT:
        problems.append(
            f'{path}: version: unsupported version {version!r}, expected "{ENTRIES_FORMAT}"'
        )
        ok = False
    namespace = document.get("namespace")
    if not isinstance(namespace, str) or not NAME_RE.match(namespace):
        problems.append(f"{path}: namespace: required, a name like app (got {namespace!r})")
        ok = False
    entries = document.get("entries")
    if not isinstance(entries, list):
        problems.append(f"{path}: entries: required, a list of entries")
        ok = False
    if not ok or not isinstance(entries, list):
        return None
    return str(namespace), entries


def _validate_entry(
    raw: Any,
    index: int,
    path: Path,
    namespace: str,
    problems: list[str],
    environ: Mapping[str, str] | None,
) -> _Entry | None:
    where = f"{path}: entries[{index}]"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping with kind and name")
        return None
    data = dict(raw)
    name, entry_id = data.pop("name", None), data.pop("id", None)
    if name is not None and entry_id is not None:
        problems.append(f"{where}: id: give either id or name, not both")
        return None
    given = entry_id if entry_id is not None else name
    if not isinstance(given, str):
        problems.append(f"{where}: name: required, a name or namespace:name")
        return None
    try:
        full_id = _check_id(resolve_id(given, namespace))
    except ValueError as exc:
        problems.append(f"{where}: name: {exc}")
        return None
    where = f"{path}: {full_id}"
    kind = data.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        problems.append(f"{where}: kind: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        return None
    context = {"namespace": namespace, "base_dir": path.parent, "environ": environ}
    try:
        return model.model_validate({**data, "id": full_id, "file": path}, context=context)
    except ValidationError as exc:
        problems.extend(f"{where}: {_format_error(e)}" for e in exc.errors())
        return None


def _check_refs(config: Config) -> None:
    targets: dict[str, dict[str, Any]] = {
        "driver": config.drivers,
        "queue": config.queues,
        "func": config.functions,
    }
    kinds = {"driver": "queue driver", "queue": "queue.queue", "func": "function.lua"}
    for entry in [*config.queues.values(), *config.consumers.values()]:
        for field_name, table in targets.items():
            ref = getattr(entry, field_name, None)
            if ref is not None and ref not in table:
                config.problems.append(
                    f"{config.label(entry)}: {field_name}: {ref} is not a declared "
                    f"{kinds[field_name]} entry"
                )
    for queue in config.queues.values():
        target = queue.dead_letter.queue if queue.dead_letter else None
        if target is not None and (target not in config.queues or target == queue.id):
            config.problems.append(
                f"{config.label(queue)}: dead_letter.queue: {target} is not another declared "
                "queue.queue entry"
            )
    for consumer in config.consumers.values():
        for ref in consumer.security.policies:
            if ref not in config.policies:
                config.problems.append(
                    f"{config.label(consumer)}: security.policies: {ref} is not a declared "
                    "security.policy entry"
                )


# AMQP names a queue with a short string of at most 255 bytes, and luaq's delay queues append
# `.delay.<milliseconds>ms` (drivers/amqp.py; `.retry.<milliseconds>ms` for a queue that is not
# durable, as every delay queue was named before) to it: at most 29 more bytes.
AMQP_QUEUE_NAME_BYTES = 255 - 29


def _check_amqp_names(config: Config) -> None:
    """Queue names an AMQP broker would refuse, found before anything starts rather than as a
    failure at start-up (or at a message's first retry, for a delay queue's name)."""
    for queue in config.queues.values():
        if not isinstance(config.drivers.get(queue.driver), AmqpDriverEntry):
            continue
        name, field = queue.external_name, "queue_name" if queue.queue_name else "name"
        size = len(name.encode())
        if size > AMQP_QUEUE_NAME_BYTES:
            config.problems.append(
                f"{config.label(queue)}: {field}: {size} bytes long; an AMQP queue name may have "
                f"at most {AMQP_QUEUE_NAME_BYTES} here (255, less what luaq adds to name its "
                "delay queues)"
            )
        if name.startswith("amq."):
            config.problems.append(
                f"{config.label(queue)}: {field}: {name!r}: names starting with amq. are "
                "reserved by AMQP brokers"
            )


def load(paths: Iterable[Path | str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate entries files; a directory means every YAML file in it.

    `${env:NAME}` reads `environ` (default: this process's environment), so the operator can
    check a file with the environment its pod will have."""
    files, problems = _files(paths)
    config = Config(files=files, problems=problems)
    seen: dict[str, Path] = {}
    tables: dict[type[_Entry], dict[str, Any]] = {
        MemoryDriverEntry: config.drivers,
        AmqpDriverEntry: config.drivers,
        QueueEntry: config.queues,
        FunctionEntry: config.functions,
        ConsumerEntry: config.consumers,
        PolicyEntry: config.policies,
    }
    for path in files:
        parsed = _parse_file(path, config.problems)
        if parsed is None:
            continue
        namespace, raw_entries = parsed
        for index, raw in enumerate(raw_entries):
            entry = _validate_entry(raw, index, path, namespace, config.problems, environ)
            if entry is None:
                continue
            if entry.id in seen:
                config.problems.append(
                    f"{path}: {entry.id}: id: already declared in {seen[entry.id]}"
                )
                continue
            seen[entry.id] = path
            tables[type(entry)][entry.id] = entry
    for consumer in config.consumers.values():
        inline = consumer.inline_function()
        if inline is not None:
            config.functions[inline.id] = inline
    _check_refs(config)
    _check_amqp_names(config)
    return config
