"""kmock's Kubernetes emulator with what the operator tests need of an API server.

Stock kmock 0.8 stores and serves objects but leaves out most of an API server's behaviour;
this subclass adds, for the resources registered with `register`: uid, resourceVersion,
creationTimestamp, generation and generateName; merge, JSON and strategic merge patches and
PUT with resourceVersion preconditions; status and scale subresources; finalizers and
ownerReference garbage collection; label and field selectors; lists with their kind and
resourceVersion; watches that start from a resourceVersion (no replay of old objects, no gap);
and server-side tables with a CRD's printer columns, for `kubectl get`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import decimal
import json
import math
import re
import secrets
import string
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import attrs
import kmock
from kmock._internal import apps, parsing, rendering

Body = dict[str, Any]

_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads `/api/v1/namespaces` and `/api/v1/namespaces/NAME` as paths inside a
    namespace (and fails on the first): they are the cluster-scoped namespaces resource."""
    parts = path.strip("/").split("/")
    subresource = len(parts) == 5 and parts[4] in ("status", "finalize")
    if parts[:3] == ["api", "v1", "namespaces"] and (len(parts) <= 4 or subresource):
        name = parts[3] if len(parts) > 3 else None
        return parsing.ParsedPath(
            "", "v1", "namespaces", None, name, parts[4] if subresource else None
        )
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path


# kubectl 1.37 sends the objects of its `create` subcommands (namespace, secret, configmap) in
# Kubernetes' protobuf encoding, and a real API server reads them. These are the fields of those
# kinds that kubectl fills in, by field number (k8s.io/api's generated.proto); a non-empty field
# not listed here is refused with 415, so a test never sees part of what was sent.
PROTOBUF = "application/vnd.kubernetes.protobuf"
_STRINGS = ("map", str)
_OBJECT_META = {
    1: ("name", str),
    2: ("generateName", str),
    3: ("namespace", str),
    11: ("labels", _STRINGS),
    12: ("annotations", _STRINGS),
}
_PROTO_KINDS: dict[str, dict[int, tuple[str, Any]]] = {
    "Namespace": {1: ("metadata", _OBJECT_META)},
    "Secret": {
        1: ("metadata", _OBJECT_META),
        2: ("data", ("map", bytes)),
        3: ("type", str),
        4: ("stringData", _STRINGS),
        5: ("immutable", bool),
    },
    "ConfigMap": {
        1: ("metadata", _OBJECT_META),
        2: ("data", _STRINGS),
        3: ("binaryData", ("map", bytes)),
        4: ("immutable", bool),
    },
}


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """A protobuf message's fields in order: varints as ints, length-delimited ones as bytes."""
    found: list[tuple[int, int | bytes]] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        if key & 7 == 0:
            value, at = _varint(data, at)
            found.append((key >> 3, value))
        elif key & 7 == 2:
            size, at = _varint(data, at)
            found.append((key >> 3, data[at : at + size]))
            at += size
        else:
            raise ValueError(f"wire type {key & 7}")
    return found


def _empty(value: int | bytes) -> bool:
    if not value:
        return True
    try:
        return isinstance(value, bytes) and all(_empty(v) for _, v in _fields(value))
    except (ValueError, IndexError):
        return False


def _message(data: bytes, schema: Mapping[int, tuple[str, Any]], where: str) -> Body:
    body: Body = {}
    for number, value in _fields(data):
        if number not in schema:
            if not _empty(value):
                raise ValueError(f"{where}: field {number} is not emulated")
            continue
        name, kind = schema[number]
        if isinstance(kind, dict):
            assert isinstance(value, bytes)
            body[name] = _message(value, kind, f"{where}.{name}")
        elif isinstance(kind, tuple):  # a map<string, T>: repeated entries of key 1, value 2
            assert isinstance(value, bytes)
            entry = dict(_fields(value))
            key, item = bytes(entry.get(1, b"")).decode(), entry.get(2, b"")
            assert isinstance(item, bytes)
            body.setdefault(name, {})[key] = (
                base64.b64encode(item).decode() if kind[1] is bytes else item.decode()
            )
        elif kind is bool:
            body[name] = bool(value)
        elif value:
            assert isinstance(value, bytes)
            body[name] = value.decode()
    return body


def from_protobuf(data: bytes) -> Body:
    """A built-in object in Kubernetes' protobuf envelope (`k8s\\0`, then runtime.Unknown with
    the type and the raw object) as the JSON body the API server would have read."""
    if not data.startswith(b"k8s\x00"):
        raise ValueError("no k8s protobuf magic")
    envelope = dict(_fields(data[4:]))
    type_meta = dict(_fields(bytes(envelope.get(1, b""))))
    api_version = bytes(type_meta.get(1, b"")).decode()
    kind = bytes(type_meta.get(2, b"")).decode()
    if kind not in _PROTO_KINDS:
        raise ValueError(f"{kind} is not emulated in protobuf")
    raw = envelope.get(2, b"")
    assert isinstance(raw, bytes)
    return {"apiVersion": api_version, "kind": kind, **_message(raw, _PROTO_KINDS[kind], kind)}


@dataclass(frozen=True)
class Scale:
    """Where the scale subresource reads and writes: dotted paths in the object."""

    spec_replicas: str
    status_replicas: str
    selector: str | None = None  # a label selector string in the object
    match_labels: str | None = None  # or a matchLabels map (Deployments)


@dataclass(frozen=True)
class Kind:
    resource: kmock.resource
    kind: str
    namespaced: bool = True
    status: bool = False
    scale: Scale | None = None
    columns: tuple[Mapping[str, str], ...] = ()

    @property
    def api_version(self) -> str:
        group, version = self.resource.group, self.resource.version
        return f"{group}/{version}" if group else str(version)


_CLOSED = -1  # the resourceVersion close_watches puts in a watch's queue: the stream ends


@dataclass
class _Watchers:
    log: list[tuple[int, Body]] = field(default_factory=list)
    queues: list[asyncio.Queue[tuple[int, Body]]] = field(default_factory=list)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(obj: Mapping[str, Any], path: str) -> Any:
    value: Any = obj
    for part in path.strip(".").split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _set(obj: Body, path: str, value: Any) -> None:
    *parents, last = path.strip(".").split(".")
    for part in parents:
        obj = obj.setdefault(part, {})
    obj[last] = value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Merge patch, except lists of named maps (containers, env, ports...) merge by name."""
    if isinstance(patch, list) and isinstance(target, list) and _named(patch) and _named(target):
        result = [copy.deepcopy(item) for item in target]
        for item in patch:
            index = next((i for i, old in enumerate(result) if old["name"] == item["name"]), None)
            if item.get("$patch") == "delete":
                if index is not None:
                    del result[index]
            elif index is None:
                result.append(copy.deepcopy(item))
            else:
                result[index] = strategic_merge_patch(result[index], item)
        return result
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            result.pop(key, None)
        else:
            result[key] = strategic_merge_patch(result.get(key), value)
    return result


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.split("/")[1:]]


def json_patch(target: Any, operations: Iterable[Mapping[str, Any]]) -> Any:
    """RFC 6902; a failed `test` is a conflict, as the API server answers it."""
    document = copy.deepcopy(target)
    for op in operations:
        parts = _pointer(op["path"])
        parent: Any = document
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1] if parts else ""
        kind = op["op"]
        if kind == "test":
            actual = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if actual != op.get("value"):
                raise kmock.KubernetesError(
                    status=409, reason="Conflict", message=f"test failed at {op['path']}"
                )
        elif kind == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif kind in ("add", "replace"):
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                elif kind == "add":
                    parent.insert(int(last), value)
                else:
                    parent[int(last)] = value
            else:
                parent[last] = value
        else:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"op {kind}")
    return document


_REQUIREMENT = re.compile(
    r"^\s*(?P<key>!?[\w./-]+)\s*(?:(?P<op>==|!=|=|\s+in\s+|\s+notin\s+)\s*(?P<value>.*?))?\s*$"
)


def matches_labels(labels: Mapping[str, str], selector: str) -> bool:
    """Equality- and set-based label selectors (`a=b,c!=d,e,!f,g in (x,y)`)."""
    for requirement in re.split(r",(?![^(]*\))", selector):
        if not requirement.strip():
            continue
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message=selector)
        key, op, value = match["key"], (match["op"] or "").strip(), match["value"]
        if op == "":
            if key.startswith("!"):
                if key[1:] in labels:
                    return False
            elif key not in labels:
                return False
        elif op in ("=", "=="):
            if labels.get(key) != value:
                return False
        elif op == "!=":
            if labels.get(key) == value:
                return False
        else:
            values = {v.strip() for v in value.strip("() ").split(",")}
            if (labels.get(key) in values) != (op == "in"):
                return False
    return True


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    created = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = max(0, int((datetime.now(UTC) - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@attrs.define(kw_only=True)
class KubernetesEmulator(kmock.KubernetesEmulator):
    _kinds: dict[kmock.resource, Kind] = attrs.field(factory=dict, init=False)
    _watchers: dict[kmock.resource, _Watchers] = attrs.field(factory=dict, init=False)
    _version: int = attrs.field(default=0, init=False)
    # As the API server's NamespaceLifecycle admission: objects go only into namespaces that
    # exist. Off unless a test asks, since most tests make up namespaces by name alone.
    namespace_lifecycle: bool = False

    async def __call__(self, raw_request: Any) -> Any:
        """A real API server reads requests of up to 3 MiB (aiohttp's default is 1 MiB)."""
        raw_request._client_max_size = 3 * 2**20
        return await super().__call__(raw_request)

    async def _handle(self, request: rendering.Request) -> Any:
        """Registered resources are served here, straight (kmock's routing looks through every
        past request for each new one, too slow for hundreds of objects); the rest, discovery
        mostly, goes through kmock's routing (not its emulator's bookkeeping of writes)."""
        serve = self._server_of(request)
        if serve is None and request.url.path.startswith("/openapi/v3"):
            serve = self._serve_openapi
        if serve is None:
            return await apps.RawHandler._handle(self, request)
        return await rendering.Response(payload=serve)(request)

    async def _serve_openapi(self, request: rendering.Request) -> Body:
        """The part of the OpenAPI v3 documents kubectl reads before it leaves the validation
        of fields to the server (`fieldValidation`, its default): per group-version, the PATCH
        of each resource, its kind, and that parameter. Without them kubectl validates with a
        downloaded schema, and fails here without `--validate=false`."""
        versions: dict[str, list[Kind]] = {}
        for kind in self._kinds.values():
            group, version = kind.resource.group, kind.resource.version
            versions.setdefault(
                f"apis/{group}/{version}" if group else f"api/{version}", []
            ).append(kind)
        path = request.url.path.removeprefix("/openapi/v3").strip("/")
        if not path:
            return {"paths": {p: {"serverRelativeURL": f"/openapi/v3/{p}"} for p in versions}}
        if path not in versions:
            raise kmock.KubernetesResourceNotFoundError()
        paths = {}
        for kind in versions[path]:
            scope = "/namespaces/{namespace}" if kind.namespaced else ""
            gvk = {"group": kind.resource.group or "", "version": kind.resource.version,
                   "kind": kind.kind}  # fmt: skip
            parameter = {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}
            paths[f"/{path}{scope}/{kind.resource.plural}/{{name}}"] = {
                "patch": {"x-kubernetes-group-version-kind": gvk, "parameters": [parameter]}
            }
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": "v1"},
            "paths": paths,
        }

    def _server_of(self, request: rendering.Request) -> Any:
        if request.resource is None or request.resource not in self._kinds:
            return None
        if request.method == kmock.method.PUT and request.name is not None:
            return self._serve_replace
        return {
            kmock.action.WATCH: self._serve_watch,
            kmock.action.LIST: self._serve_list,
            kmock.action.FETCH: self._serve_fetch,
            kmock.action.CREATE: self._serve_create,
            kmock.action.UPDATE: self._serve_update,
            kmock.action.DELETE: self._serve_delete,
        }.get(request.action)

    async def _serve_version(self, request: rendering.Request) -> Any:
        payload = await super()._serve_version(request)
        payload["groupVersion"] = payload["groupVersion"].lstrip("/")  # the core group is ""
        for entry in payload["resources"]:
            if "/" in entry["name"]:  # subresources have no short names or categories
                entry["shortNames"], entry["categories"] = [], []
        return payload

    # -- setup -----------------------------------------------------------------------------------

    def register(
        self, kind: Kind, *, short_names: Iterable[str] = (), categories: Iterable[str] = ()
    ) -> None:
        self._kinds[kind.resource] = kind
        self._watchers[kind.resource] = _Watchers()
        subresources = {"status"} if kind.status else set()
        if kind.scale:
            subresources.add("scale")
        self.resources[kind.resource] = kmock.ResourceInfo(
            kind=kind.kind,
            singular=kind.kind.lower(),
            namespaced=kind.namespaced,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            shortnames=set(short_names),
            categories=set(categories),
            subresources=subresources,
        )

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("storage"))
        scale = version.get("subresources", {}).get("scale")
        self.register(
            Kind(
                kmock.resource(spec["group"], version["name"], spec["names"]["plural"]),
                spec["names"]["kind"],
                namespaced=spec["scope"] == "Namespaced",
                status="status" in version.get("subresources", {}),
                scale=Scale(
                    scale["specReplicasPath"],
                    scale["statusReplicasPath"],
                    scale.get("labelSelectorPath"),
                )
                if scale
                else None,
                columns=tuple(version.get("additionalPrinterColumns", ())),
            ),
            short_names=spec["names"].get("shortNames", ()),
            categories=spec["names"].get("categories", ()),
        )

    # -- access for tests ------------------------------------------------------------------------

    def read(
        self, plural_or_resource: str | kmock.resource, namespace: str | None, name: str
    ) -> Body | None:
        """The current object, as a plain dict copy (None when absent)."""
        resource = self._resource(plural_or_resource)
        key = (resource, namespace, name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)

    def read_all(
        self, plural_or_resource: str | kmock.resource, namespace: str | None = None
    ) -> list[Body]:
        resource = self._resource(plural_or_resource)
        return [
            copy.deepcopy(obj.raw)
            for (res, ns, _), obj in self._objects.items()
            if res == resource and not obj.deleted and (namespace is None or ns == namespace)
        ]

    def _resource(self, value: str | kmock.resource) -> kmock.resource:
        if isinstance(value, kmock.resource):
            return value
        found = [r for r in self._kinds if r.plural == value]
        if len(found) != 1:
            raise KeyError(value)
        return found[0]

    # -- serving ---------------------------------------------------------------------------------

    def _namespace_exists(self, namespace: str) -> bool:
        """Those of every cluster, and those created."""
        if namespace in ("default", "kube-system", "kube-public", "kube-node-lease"):
            return True
        return any(
            key[0].plural == "namespaces" and key[2] == namespace and not obj.deleted
            for key, obj in self._objects.items()
        )

    def _kind(self, request: rendering.Request) -> Kind:
        assert request.resource is not None
        for resource, kind in self._kinds.items():
            if resource == request.resource:
                return kind
        raise kmock.KubernetesResourceNotFoundError()

    def _current(self, kind: Kind, namespace: str | None, name: str) -> Body:
        key = (kind.resource, namespace if kind.namespaced else None, name)
        if key not in self._objects or self._objects[key].deleted:
            raise kmock.KubernetesError(
                status=404, reason="NotFound", message=f'{kind.resource.plural} "{name}" not found'
            )
        return copy.deepcopy(self._objects[key].raw)

    def _next_version(self) -> str:
        self._version += 1
        return str(self._version)

    def _emit(self, kind: Kind, event_type: str, obj: Body) -> None:
        version = int(obj["metadata"]["resourceVersion"])
        event = {"type": event_type, "object": copy.deepcopy(obj)}
        watchers = self._watchers[kind.resource]
        watchers.log.append((version, event))
        for queue in watchers.queues:
            queue.put_nowait((version, event))

    def _store(self, kind: Kind, obj: Body) -> None:
        meta = obj["metadata"]
        key = (kind.resource, meta.get("namespace"), meta["name"])
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj

    async def _serve_create(self, request: rendering.Request) -> Body:
        kind = self._kind(request)
        obj: Body = copy.deepcopy(request.data or {})
        if request.headers.get("Content-Type", "").startswith(PROTOBUF):
            try:
                obj = from_protobuf(request.body)
            except ValueError as exc:
                raise kmock.KubernetesError(
                    status=415, reason="UnsupportedMediaType", message=str(exc)
                ) from None
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message="name is required"
                )
            suffix = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5)
            )
            meta["name"] = meta["generateName"] + suffix
        if kind.namespaced:
            namespace = request.namespace or meta.get("namespace")
            if meta.get("namespace", namespace) != namespace:
                raise kmock.KubernetesError(
                    status=400, reason="BadRequest", message="namespace mismatch"
                )
            meta["namespace"] = namespace
            if self.namespace_lifecycle and not self._namespace_exists(namespace):
                raise kmock.KubernetesError(
                    status=404, reason="NotFound", message=f'namespaces "{namespace}" not found'
                )
        key = (kind.resource, meta.get("namespace"), meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise kmock.KubernetesError(
                status=409, reason="AlreadyExists", message=f'"{meta["name"]}" already exists'
            )
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        if kind.status:
            obj.pop("status", None)
        obj = stored_form(kind.kind, obj, None)
        meta = obj["metadata"]
        meta.update(
            uid=secrets.token_hex(16),
            creationTimestamp=_now(),
            resourceVersion=self._next_version(),
        )
        if "spec" in obj:
            meta["generation"] = 1
        self._store(kind, obj)
        self._emit(kind, "ADDED", obj)
        return obj

    async def _serve_fetch(self, request: rendering.Request) -> Body:
        kind = self._kind(request)
        assert request.name is not None
        obj = self._current(kind, request.namespace, request.name)
        if request.subresource == "scale":
            return self._scale_of(kind, obj)
        if _wants_table(request):
            return self._table(kind, [obj])
        return obj

    async def _serve_list(self, request: rendering.Request) -> Body:
        kind = self._kind(request)
        items = self._select(kind, request)
        if _wants_table(request):
            return self._table(kind, items)
        return {
            "apiVersion": kind.api_version,
            "kind": f"{kind.kind}List",
            "metadata": {"resourceVersion": str(self._version)},
            "items": items,
        }

    def _select(self, kind: Kind, request: rendering.Request) -> list[Body]:
        return [
            copy.deepcopy(obj.raw)
            for (resource, namespace, _), obj in self._objects.items()
            if resource == kind.resource
            and not obj.deleted
            and (request.namespace is None or namespace == request.namespace)
            and _selected(obj.raw, request.params)
        ]

    async def _serve_watch(self, request: rendering.Request) -> AsyncIterator[Any]:
        kind = self._kind(request)
        yield b""  # headers out: the stream is open
        queue: asyncio.Queue[tuple[int, Body]] = asyncio.Queue()
        watchers = self._watchers[kind.resource]
        watchers.queues.append(queue)  # before the replay: nothing falls in between
        try:
            since = request.params.get("resourceVersion") or "0"
            sent = int(since)
            if since == "0":
                backlog = [
                    (sent, {"type": "ADDED", "object": obj}) for obj in self._select(kind, request)
                ]
            else:
                backlog = [(v, e) for v, e in watchers.log if v > sent]
            timeout = request.params.get("timeoutSeconds")
            deadline = time.monotonic() + float(timeout) if timeout else None
            for version, event in backlog:
                if self._watched(event, request):
                    yield event
                sent = max(sent, version)
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                try:
                    version, event = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    return
                if version == _CLOSED:
                    return
                if version > sent and self._watched(event, request):
                    yield event
        finally:
            watchers.queues.remove(queue)

    def close_watches(self) -> None:
        """End every watch stream, as an API server going away does: the server's shutdown
        waits for the requests in progress, and a watch whose client went while the server did
        not read (nothing to send) would otherwise last its timeoutSeconds (60 s)."""
        for watchers in self._watchers.values():
            for queue in watchers.queues:
                queue.put_nowait((_CLOSED, {}))

    def _watched(self, event: Body, request: rendering.Request) -> bool:
        meta = event["object"]["metadata"]
        if request.namespace is not None and meta.get("namespace") != request.namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        return _selected(event["object"], request.params)

    async def _serve_update(self, request: rendering.Request) -> Body:
        kind = self._kind(request)
        assert request.name is not None
        current = self._current(kind, request.namespace, request.name)
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        patchers = {
            "application/merge-patch+json": merge_patch,
            "application/strategic-merge-patch+json": strategic_merge_patch,
            "application/json-patch+json": json_patch,
        }
        if content_type not in patchers:
            raise kmock.KubernetesError(
                status=415, reason="UnsupportedMediaType", message=f"{content_type} patches"
            )
        if request.subresource == "scale":
            scale = patchers[content_type](self._scale_of(kind, current), request.data)
            return self._scale_of(kind, self._set_replicas(kind, current, scale))
        new = patchers[content_type](current, request.data)
        return self._write(kind, current, new, request.subresource)

    async def _serve_replace(self, request: rendering.Request) -> Body:
        kind = self._kind(request)
        if request.name is None:
            raise kmock.KubernetesError(status=405, reason="MethodNotAllowed", message="PUT a list")
        current = self._current(kind, request.namespace, request.name)
        new = copy.deepcopy(request.data or {})
        self._precondition(current, new)
        if request.subresource == "scale":
            return self._scale_of(kind, self._set_replicas(kind, current, new))
        return self._write(kind, current, new, request.subresource)

    def _precondition(self, current: Body, new: Body) -> None:
        wanted = (new.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message="the object has been modified; apply your changes to the latest version",
            )

    def _set_replicas(self, kind: Kind, current: Body, scale: Mapping[str, Any]) -> Body:
        assert kind.scale is not None
        new = copy.deepcopy(current)
        _set(new, kind.scale.spec_replicas, scale["spec"]["replicas"])
        return self._write(kind, current, new, None)

    def _scale_of(self, kind: Kind, obj: Body) -> Body:
        if kind.scale is None:
            raise kmock.KubernetesError(
                status=404, reason="NotFound", message="no scale subresource"
            )
        meta = obj["metadata"]
        status: Body = {"replicas": _get(obj, kind.scale.status_replicas) or 0}
        if kind.scale.selector:
            status["selector"] = _get(obj, kind.scale.selector)
        elif kind.scale.match_labels:
            labels = _get(obj, kind.scale.match_labels) or {}
            status["selector"] = ",".join(f"{k}={v}" for k, v in labels.items())
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                key: meta[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if key in meta
            },
            "spec": {"replicas": _get(obj, kind.scale.spec_replicas) or 0},
            "status": status,
        }

    def _write(self, kind: Kind, current: Body, new: Body, subresource: str | None) -> Body:
        self._precondition(current, new)
        if subresource == "status":
            new = {**current, "status": new.get("status")}
        elif subresource is not None:
            raise kmock.KubernetesError(status=404, reason="NotFound", message=subresource)
        elif kind.status:
            new["status"] = current.get("status")
            if new["status"] is None:
                del new["status"]
        if subresource is None:
            new = stored_form(kind.kind, new, current)
        meta = new.setdefault("metadata", {})
        for key in (
            "uid",
            "name",
            "namespace",
            "creationTimestamp",
            "generation",
            "resourceVersion",
        ):
            if key in current["metadata"]:
                meta[key] = current["metadata"][key]
        if meta.get("deletionTimestamp") != current["metadata"].get("deletionTimestamp"):
            meta["deletionTimestamp"] = current["metadata"].get("deletionTimestamp")
            if meta["deletionTimestamp"] is None:
                del meta["deletionTimestamp"]
        if new == current:
            return current  # a no-op write changes nothing, not even the resourceVersion
        if "generation" in meta and _spec(new) != _spec(current):
            meta["generation"] += 1
        meta["resourceVersion"] = self._next_version()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(kind, new)
            return new
        self._store(kind, new)
        self._emit(kind, "MODIFIED", new)
        return new

    async def _serve_delete(self, request: rendering.Request) -> Body:
        kind = self._kind(request)
        assert request.name is not None
        return self._delete(kind, self._current(kind, request.namespace, request.name))

    def _delete(self, kind: Kind, current: Body) -> Body:
        """Gone at once, or marked for deletion while finalizers remain."""
        meta = current["metadata"]
        if meta.get("finalizers") and meta.get("deletionTimestamp"):
            return current
        meta["resourceVersion"] = self._next_version()
        if meta.get("finalizers"):
            meta["deletionTimestamp"] = _now()
            self._store(kind, current)
            self._emit(kind, "MODIFIED", current)
        else:
            self._remove(kind, current)
        return current

    def _remove(self, kind: Kind, obj: Body) -> None:
        meta = obj["metadata"]
        self._objects[kind.resource, meta.get("namespace"), meta["name"]].delete()
        self._emit(kind, "DELETED", obj)
        self._collect_garbage(meta["uid"])

    def _collect_garbage(self, owner_uid: str) -> None:
        """What the garbage collector does for ownerReferences (background propagation)."""
        for (resource, namespace, name), obj in list(self._objects.items()):
            owners = [] if obj.deleted else obj.raw.get("metadata", {}).get("ownerReferences")
            if any(owner.get("uid") == owner_uid for owner in owners or []):
                kind = self._kinds[resource]
                self._delete(kind, self._current(kind, namespace, name))

    def _table(self, kind: Kind, items: list[Body]) -> Body:
        columns = [{"name": "Name", "type": "string", "format": "name"}]
        columns += [
            {"name": c["name"], "type": c.get("type", "string"), "format": ""}
            for c in kind.columns
            or [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        ]
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column in kind.columns or [
                {"type": "date", "jsonPath": ".metadata.creationTimestamp"}
            ]:
                value = _get(obj, column["jsonPath"])
                cells.append(_age(value) if column.get("type") == "date" else value)
            rows.append(
                {
                    "cells": cells,
                    "object": {
                        "apiVersion": "meta.k8s.io/v1",
                        "kind": "PartialObjectMetadata",
                        "metadata": obj["metadata"],
                    },
                }
            )
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": {"resourceVersion": str(self._version)},
            "columnDefinitions": [{**c, "description": "", "priority": 0} for c in columns],
            "rows": rows,
        }


# -- what the API server stores: defaults, canonical forms, immutability -------------------------

_BINARY = (("Ei", 2**60), ("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))
_DECIMAL = {"E": 18, "P": 15, "T": 12, "G": 9, "M": 6, "k": 3, "": 0, "m": -3, "u": -6, "n": -9}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?[0-9]+)?$")


def canonical_quantity(value: str | int | float) -> str:
    """A resource quantity as the API server writes it back: `0.5` -> `500m`, `1000m` -> `1`,
    `1.5Gi` -> `1536Mi` (binary suffixes stay binary where the value allows, sub-milli values
    round up)."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise kmock.KubernetesError(status=422, reason="Invalid", message=f"quantity {value!r}")
    number, suffix = decimal.Decimal(match[1]), match[2] or ""
    if suffix.endswith("i"):
        exact = number * dict(_BINARY)[suffix]
        if exact == exact.to_integral_value() and exact >= 1024:
            for unit, factor in _BINARY:
                if exact % factor == 0:
                    return f"{int(exact // factor)}{unit}"
        number, suffix = exact, ""
    exponent = int(suffix[1:]) if suffix[:1] in ("e", "E") else _DECIMAL[suffix]
    milli = math.ceil(number * decimal.Decimal(10) ** (exponent + 3))
    for unit, power in _DECIMAL.items():
        if power >= 0 and milli % 10 ** (power + 3) == 0:
            return f"{milli // 10 ** (power + 3)}{unit}"
    return f"{milli}m"


# core/v1 Affinity's fields, as a real API server decodes them into Go structs: an object's
# own fields (a dict), a list of objects ([dict]), or a value (None: a string, a number, a
# list of strings, a map of strings).
_EXPRESSION = {"key": None, "operator": None, "values": None}
_SELECTOR = {"matchLabels": None, "matchExpressions": [_EXPRESSION]}
_NODE_TERM = {"matchExpressions": [_EXPRESSION], "matchFields": [_EXPRESSION]}
_POD_TERM = {"labelSelector": _SELECTOR, "namespaceSelector": _SELECTOR, "namespaces": None,
             "topologyKey": None, "matchLabelKeys": None, "mismatchLabelKeys": None}  # fmt: skip
_POD_AFFINITY = {
    "requiredDuringSchedulingIgnoredDuringExecution": [_POD_TERM],
    "preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": None, "podAffinityTerm": _POD_TERM}
    ],
}
_AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [_NODE_TERM]},
        "preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": None, "preference": _NODE_TERM}
        ],
    },
    "podAffinity": _POD_AFFINITY,
    "podAntiAffinity": _POD_AFFINITY,
}


def _as_stored(value: Any, fields: Any) -> Any:
    """`value` as Go decodes it into `fields` and encodes it again: unknown fields dropped;
    nulls, empty lists and empty maps left out (omitempty); an empty object kept (a pointer
    to an empty struct is not empty)."""
    if isinstance(fields, list):
        return [_as_stored(item, fields[0]) for item in value]
    if fields is None or not isinstance(value, dict):
        return value
    return {
        key: _as_stored(item, fields[key])
        for key, item in value.items()
        if key in fields and item is not None and item != [] and (item != {} or fields[key])
    }


def _pod_defaults(pod: Body) -> None:
    if "affinity" in pod:
        pod["affinity"] = _as_stored(pod["affinity"], _AFFINITY)
    pod.setdefault("restartPolicy", "Always")
    pod.setdefault("terminationGracePeriodSeconds", 30)
    pod.setdefault("dnsPolicy", "ClusterFirst")
    pod.setdefault("schedulerName", "default-scheduler")
    pod.setdefault("securityContext", {})
    for volume in pod.get("volumes") or []:
        for source in ("configMap", "secret", "projected"):
            if source in volume:
                volume[source].setdefault("defaultMode", 0o644)
        for projection in (volume.get("projected") or {}).get("sources") or []:
            if "serviceAccountToken" in projection:
                projection["serviceAccountToken"].setdefault("expirationSeconds", 3600)
        empty_dir = volume.get("emptyDir") or {}
        if "sizeLimit" in empty_dir:
            empty_dir["sizeLimit"] = canonical_quantity(empty_dir["sizeLimit"])
    for container in pod.get("containers") or []:
        image = str(container.get("image", ""))
        latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")
        for probe in (container.get(p) for p in ("livenessProbe", "readinessProbe")):
            if probe:
                for key, default in (("timeoutSeconds", 1), ("periodSeconds", 10),
                                     ("successThreshold", 1), ("failureThreshold", 3)):  # fmt: skip
                    probe.setdefault(key, default)
                if "httpGet" in probe:
                    probe["httpGet"].setdefault("scheme", "HTTP")
        for variable in container.get("env") or []:
            if variable.get("value") == "":  # omitempty: an empty value is stored as none
                del variable["value"]
        for group in (container.get("resources") or {}).values():
            for key, quantity in group.items():
                group[key] = canonical_quantity(quantity)


def stored_form(kind: str, new: Body, current: Body | None) -> Body:
    """`new` as the API server would store it over `current` (None: a create), or the 422 it
    answers: defaults of the fields the operator tests look at, canonical quantities, empty env
    values dropped, a pod's affinity as Go stores it, immutable ConfigMaps and Secrets, a
    Service's allocated cluster IP."""
    new = copy.deepcopy(new)
    immutable = kind in ("ConfigMap", "Secret") and (current or {}).get("immutable")
    if immutable and any(new.get(k) != current.get(k) for k in ("data", "binaryData", "immutable")):
        raise kmock.KubernetesError(
            status=422, reason="Invalid", message="field is immutable when `immutable` is set"
        )
    if kind in ("ConfigMap", "Secret"):
        size = sum(len(k) + len(str(v).encode()) for k, v in (new.get("data") or {}).items())
        if size > 2**20:
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message="[]: Too long: must have at most 1048576 bytes",
            )
    spec = new.get("spec")
    if kind == "Deployment" and isinstance(spec, dict):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
        spec.setdefault(
            "strategy",
            {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            },
        )
        _pod_defaults(spec.setdefault("template", {}).setdefault("spec", {}))
    if kind == "Service" and isinstance(spec, dict):
        before = (current or {}).get("spec") or {}
        allocated = (
            before.get("clusterIP")
            or f"10.96.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"
        )
        if spec.get("clusterIP") not in (None, allocated):
            raise kmock.KubernetesError(
                status=422, reason="Invalid", message="spec.clusterIP: field is immutable"
            )
        spec.update(clusterIP=allocated, clusterIPs=[allocated])
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
        for port in spec.get("ports") or []:
            port.setdefault("protocol", "TCP")
            port.setdefault("targetPort", port.get("port"))
    return new


def _spec(obj: Mapping[str, Any]) -> Body:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _wants_table(request: rendering.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _selected(obj: Mapping[str, Any], params: Mapping[str, str]) -> bool:
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if not matches_labels(labels, params.get("labelSelector", "")):
        return False
    for requirement in filter(None, params.get("fieldSelector", "").split(",")):
        path, _, value = requirement.partition("=")
        if str(_get(obj, path.rstrip("="))) != value.lstrip("="):
            return False
    return True


BUILTINS = (
    Kind(kmock.resource("", "v1", "configmaps"), "ConfigMap"),
    Kind(kmock.resource("", "v1", "secrets"), "Secret"),
    Kind(kmock.resource("", "v1", "services"), "Service", status=True),
    Kind(kmock.resource("", "v1", "events"), "Event"),
    Kind(kmock.resource("", "v1", "namespaces"), "Namespace", namespaced=False, status=True),
    Kind(kmock.resource("coordination.k8s.io", "v1", "leases"), "Lease"),
    Kind(
        kmock.resource("apps", "v1", "deployments"),
        "Deployment",
        status=True,
        scale=Scale("spec.replicas", "status.replicas", match_labels="spec.selector.matchLabels"),
    ),
    Kind(
        kmock.resource("policy", "v1", "poddisruptionbudgets"), "PodDisruptionBudget", status=True
    ),
    Kind(kmock.resource("rbac.authorization.k8s.io", "v1", "roles"), "Role"),
    Kind(kmock.resource("rbac.authorization.k8s.io", "v1", "rolebindings"), "RoleBinding"),
    Kind(
        kmock.resource("rbac.authorization.k8s.io", "v1", "clusterroles"),
        "ClusterRole",
        namespaced=False,
    ),
    Kind(
        kmock.resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
        "ClusterRoleBinding",
        namespaced=False,
    ),
    Kind(kmock.resource("", "v1", "serviceaccounts"), "ServiceAccount"),
)


def kubeconfig(url: str) -> str:
    """A kubeconfig for the emulator, as kubectl, kopf and the kubernetes client read it."""
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": url}}],
            "users": [{"name": "kmock", "user": {"token": "kmock"}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
            "current-context": "kmock",
        }
    )
