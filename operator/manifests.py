"""`luaq manifests`: a local project (entries files) as QueueConsumer resources, one per
consumer, and a ConfigMap per Lua source file, so it moves to a cluster in one command.

Ids stay as they are (`app:receipts` means the same queue in both places), each consumer
declares the queues of its broker, and acts as the same actor under the same policies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from luaq.runtime.entries import (
    DEFAULT_MODULES,
    AmqpDriverEntry,
    Config,
    ConsumerEntry,
    QueueEntry,
)
from luaq.runtime.security import access_for

from .crd import spec_schema
from .resource import API_VERSION, KIND, parse_spec, to_camel

LABELS = {"app.kubernetes.io/part-of": "luaq"}  # the operator watches these ConfigMaps


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


def kubernetes_name(name: str) -> str:
    """`email_worker` -> `email-worker`: a DNS-1035 label, as QueueConsumer names must be."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return cleaned if re.match(r"^[a-z]", cleaned) else f"luaq-{cleaned}"


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
    """QueueConsumers (and source ConfigMaps) for every consumer of a validated project."""
    result = Manifests()
    schema = spec_schema()
    sources: dict[str, str] = {}  # file -> ConfigMap name
    metadata: dict[str, Any] = {"namespace": namespace} if namespace else {}
    for consumer in config.consumers.values():
        name = kubernetes_name(consumer.name)
        spec = _spec(consumer, config, secret, result.notes)
        function = config.functions[consumer.function_id]
        if function.source_name:
            path = Path(function.source_name)
            if function.source_name not in sources:
                sources[function.source_name] = kubernetes_name(f"{path.stem}-lua")
                result.documents.append(
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {
                            "name": sources[function.source_name],
                            **metadata,
                            "labels": LABELS,
                        },
                        "data": {path.name: function.source_text},
                    }
                )
            spec["source_ref"] = {
                "config_map_name": sources[function.source_name],
                "key": path.name,
            }
        else:
            spec["source"] = function.source_text
        parse_spec(to_camel(spec, schema), schema)  # what the operator will accept
        result.documents.append(
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "metadata": {"name": name, **metadata},
                "spec": to_camel(spec, schema),
            }
        )
    return result


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
