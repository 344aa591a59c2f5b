"""`luaq manifests`: a local project (entries files) as QueueConsumer resources, one per
consumer, and a ConfigMap per Lua source file, so it moves to a cluster in one command.

Ids stay as they are (`app:receipts` means the same queue in both places), each consumer
declares the queues of its broker, and acts as the same actor under the same policies.

Objects are named after the consumer (`email-worker`) and the Lua file (`email-lua`). Where two
would share a name, they take the luaq namespace (`mail-worker`) or the file's path from the
entries files' directory (`mail-handler-lua`), and then a hash of the id or path; a name too long
for Kubernetes is cut and given that hash. The names depend on the project alone (not on where it
is checked out), so applying it again updates the same objects.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, TypeVar

import yaml
from luaq.runtime.entries import (
    DEFAULT_MODULES,
    AmqpDriverEntry,
    Config,
    ConsumerEntry,
    FunctionEntry,
    QueueEntry,
)
from luaq.runtime.errors import ConfigError
from luaq.runtime.security import access_for

from .crd import spec_schema
from .resource import API_VERSION, KIND, parse_spec, to_camel

LABELS = {"app.kubernetes.io/part-of": "luaq"}  # the operator watches these ConfigMaps
# The CRD's limit (crd.METADATA): the operator derives `<name>-metrics` and `<name>-luaq`.
QUEUE_CONSUMER_NAME_LENGTH = 55
CONFIG_MAP_NAME_LENGTH = 253  # a DNS-1123 subdomain, as ConfigMap names (and data keys) are
DIGEST_LENGTH = 8
K = TypeVar("K", bound=Hashable)


class _Dumper(yaml.SafeDumper):
    """Lua sources as literal blocks, readable in the manifests."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


@dataclass
class Manifests:
    documents: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        return yaml.dump_all(
            self.documents, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
        )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]


def kubernetes_name(
    name: str, limit: int = QUEUE_CONSUMER_NAME_LENGTH, key: str = "", hashed: bool = False
) -> str:
    """`email_worker` -> `email-worker`: a DNS-1035 label, as QueueConsumer names must be (and
    a valid ConfigMap name). Longer than `limit`, or `hashed`, it is cut to end with a hash of
    `key` (default: `name`), which tells apart the names it would otherwise confuse."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "luaq"
    cleaned = cleaned if re.match(r"^[a-z]", cleaned) else f"luaq-{cleaned}"
    if not hashed and len(cleaned) <= limit:
        return cleaned
    return f"{cleaned[: limit - DIGEST_LENGTH - 1].rstrip('-')}-{_digest(key or name)}"


def _data_key(file_name: str) -> str:
    """A ConfigMap key for a file: `[-._a-zA-Z0-9]+`, not starting with `..`, at most 253."""
    key = re.sub(r"[^-._a-zA-Z0-9]+", "_", file_name)
    key = f"_{key}" if key.startswith("..") else key
    if len(key) <= CONFIG_MAP_NAME_LENGTH:
        return key
    return f"{key[: CONFIG_MAP_NAME_LENGTH - DIGEST_LENGTH - 1]}-{_digest(file_name)}"


def _unique(
    candidates: dict[K, list[str]], kind: str, describe: Callable[[K], str]
) -> dict[K, str]:
    """A name for every key, from its candidates (in order of preference), no two alike.

    Keys that share a name take their next candidate, except one whose candidate came earlier
    in its list than all the others' (`app:mail-worker`'s own name, against `mail:worker`'s
    namespace-qualified one): it keeps the name. The outcome does not depend on the order of
    the keys. Raises ConfigError when keys run out of candidates and still share a name."""
    levels = dict.fromkeys(candidates, 0)
    while True:
        holders: dict[str, list[K]] = {}
        for key, level in levels.items():
            holders.setdefault(candidates[key][level], []).append(key)
        clashes = {name: keys for name, keys in holders.items() if len(keys) > 1}
        if not clashes:
            return {key: candidates[key][level] for key, level in levels.items()}
        moved = False
        for keys in clashes.values():
            first = min(levels[key] for key in keys)
            if sum(levels[key] == first for key in keys) == 1:
                keys = [key for key in keys if levels[key] != first]
            for key in keys:
                if levels[key] + 1 < len(candidates[key]):
                    levels[key] += 1
                    moved = True
        if not moved:
            raise ConfigError(
                [
                    f"{' and '.join(sorted(map(describe, keys)))} would "
                    f"{'both' if len(keys) == 2 else 'all'} be {kind} {name}: rename one of them"
                    for name, keys in sorted(clashes.items())
                ]
            )


@dataclass
class _Names:
    consumers: dict[str, str]  # consumer id -> QueueConsumer name
    config_maps: dict[str, str]  # source file -> ConfigMap name
    notes: list[str]


def _names(config: Config) -> _Names:
    """The QueueConsumers' and source ConfigMaps' names: today's where they are unique."""
    consumers = {
        consumer.id: [
            kubernetes_name(consumer.name, key=consumer.id),
            kubernetes_name(f"{consumer.namespace}-{consumer.name}", key=consumer.id),
            kubernetes_name(f"{consumer.namespace}-{consumer.name}", key=consumer.id, hashed=True),
        ]
        for consumer in config.consumers.values()
    }
    # Paths from the entries files' directory: the same wherever the project is checked out.
    base = os.path.commonpath([str(Path(file).resolve().parent) for file in config.files] or ["."])
    paths = {
        source: Path(os.path.relpath(source, base)).as_posix()
        for source in (
            config.functions[c.function_id].source_name for c in config.consumers.values()
        )
        if source
    }
    limit = CONFIG_MAP_NAME_LENGTH
    config_maps = {
        source: [
            kubernetes_name(f"{PurePath(source).stem}-lua", limit, key=path),
            kubernetes_name(f"{PurePath(path).with_suffix('')}-lua", limit, key=path),
            kubernetes_name(f"{PurePath(path).with_suffix('')}-lua", limit, key=path, hashed=True),
        ]
        for source, path in paths.items()
    }
    labels = {c.id: config.label(c) for c in config.consumers.values()}
    names = _Names(
        _unique(consumers, "QueueConsumer", labels.__getitem__),
        _unique(config_maps, "ConfigMap", str),
        [],
    )
    for id_, name in names.consumers.items():
        if name != consumers[id_][0]:
            names.notes.append(f"{id_} is QueueConsumer {name} ({consumers[id_][0]} is taken)")
    for source, name in names.config_maps.items():
        if name != config_maps[source][0]:
            names.notes.append(
                f"{paths[source]} is ConfigMap {name} ({config_maps[source][0]} is taken)"
            )
    return names


def _dump(entry: Any, *exclude: str) -> dict[str, Any]:
    data: dict[str, Any] = entry.model_dump(
        mode="json", exclude_defaults=True, exclude=set(exclude)
    )
    return data


def _queue(queue: QueueEntry) -> dict[str, Any]:
    return {"name": queue.id, **_dump(queue, "id", "kind", "file", "driver")}


def _broker(driver: Any, secret: str, notes: list[str]) -> dict[str, Any]:
    broker: dict[str, Any] = {"url_secret_ref": {"name": secret, "key": "url"}}
    if not isinstance(driver, AmqpDriverEntry):
        note = (
            f"{driver.id} is an in-memory driver: on the cluster, the consumers use the broker "
            f"whose URL is in Secret {secret} (key url)"
        )
        if note not in notes:
            notes.append(note)
        return broker
    broker.update(_dump(driver, "id", "kind", "file", "url", "tls"))
    tls = driver.tls
    if tls.enabled:
        broker["tls"] = _dump(tls, "ca", "cert", "key")
        for part, file_name in (("ca", "ca.crt"), ("cert", "tls.crt"), ("key", "tls.key")):
            if getattr(tls, part):
                broker["tls"][f"{part}_secret_ref"] = {"name": f"{secret}-tls", "key": file_name}
                notes.append(
                    f"{driver.id}: tls.{part} comes from Secret {secret}-tls ({file_name})"
                )
    return broker


def manifests(config: Config, namespace: str | None, secret: str) -> Manifests:
    """QueueConsumers (and source ConfigMaps) for every consumer of a validated project.

    Raises ConfigError when two objects cannot be given different names."""
    names = _names(config)
    result = Manifests(notes=list(names.notes))
    schema = spec_schema()
    written: set[str] = set()  # source files whose ConfigMap is listed
    metadata: dict[str, Any] = {"namespace": namespace} if namespace else {}
    for consumer in config.consumers.values():
        spec = _spec(consumer, config, secret, result.notes)
        function = config.functions[consumer.function_id]
        if function.source_name:
            spec["source_ref"] = _source_ref(function, names, metadata, written, result)
        else:
            spec["source"] = function.source_text
        parse_spec(to_camel(spec, schema), schema)  # what the operator will accept
        result.documents.append(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": names.consumers[consumer.id], **metadata},
                "spec": to_camel(spec, schema),
            }
        )
    return result


def _source_ref(
    function: FunctionEntry,
    names: _Names,
    metadata: dict[str, Any],
    written: set[str],
    result: Manifests,
) -> dict[str, str]:
    """The ConfigMap holding the function's file (listed before its first consumer)."""
    name = names.config_maps[function.source_name]
    key = _data_key(Path(function.source_name).name)
    if function.source_name not in written:
        written.add(function.source_name)
        result.documents.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, **metadata, "labels": LABELS},
                "data": {key: function.source_text},
            }
        )
    return {"config_map_name": name, "key": key}


def _spec(consumer: ConsumerEntry, config: Config, secret: str, notes: list[str]) -> dict[str, Any]:
    function = config.functions[consumer.function_id]
    queue = config.queues[consumer.queue]
    spec: dict[str, Any] = {
        "id_namespace": consumer.namespace,
        "queue": consumer.queue,
        "method": function.method,
        **({"func": consumer.func} if consumer.func else {}),
        **({"modules": list(function.modules)} if function.modules != DEFAULT_MODULES else {}),
        **_dump(consumer, "id", "kind", "file", "queue", "func", "method", "source", "modules",
                "security"),
        "broker": _broker(config.drivers[queue.driver], secret, notes),
        "queues": [_queue(q) for q in config.queues.values() if q.driver == queue.driver],
    }  # fmt: skip
    access = access_for(consumer, config)
    if access.policies:
        spec["policies"] = [_dump(policy.policy) for policy in access.policies]
        spec["actor"] = access.actor
    elif consumer.security.actor is not None:
        spec["actor"] = access.actor
    return spec
