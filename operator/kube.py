"""The Kubernetes API through the official client: plain dicts in and out.

The typed models of the client cost time and memory for nothing here (the manifests are dicts
from render.py), so requests go through its ApiClient (configuration, authentication, TLS,
connection pool) as JSON. Calls are synchronous; the operator runs them in threads.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .resource import API_VERSION, PLURAL

MERGE_PATCH = "application/merge-patch+json"
# A namespace, an object's or a subresource's name: one path segment, never a path (a name
# from a tenant's spec is validated before it comes here; this is the last line).
_SEGMENT = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def _segment(value: str) -> str:
    if not _SEGMENT.match(value) or ".." in value or len(value) > 253:
        raise ValueError(f"not a Kubernetes name: {value!r}")
    return value


@dataclass(frozen=True)
class ApiResource:
    """An API resource (its group/version and plural), as request paths name it."""

    api_version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [root, "namespaces", _segment(namespace), self.plural]
        parts += [_segment(part) for part in (name, subresource) if part is not None]
        return "/".join(parts)


CONFIG_MAPS = ApiResource("v1", "configmaps")
SECRETS = ApiResource("v1", "secrets")
SERVICES = ApiResource("v1", "services")
DEPLOYMENTS = ApiResource("apps/v1", "deployments")
POD_DISRUPTION_BUDGETS = ApiResource("policy/v1", "poddisruptionbudgets")
LEASES = ApiResource("coordination.k8s.io/v1", "leases")
QUEUE_CONSUMERS = ApiResource(API_VERSION, PLURAL)


def configuration() -> client.Configuration:
    """In a pod, its service account; elsewhere the kubeconfig, as kubectl finds it (KUBECONFIG
    is read now, not when the client library was imported)."""
    loaded = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=loaded)
    except config.ConfigException:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=loaded
        )
    return loaded


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration as the operator's own client."""
    loaded = configuration()
    header = loaded.get_api_key_with_prefix("BearerToken") or ""
    scheme, _, token = header.rpartition(" ")
    return kopf.ConnectionInfo(
        server=loaded.host,
        ca_path=loaded.ssl_ca_cert,
        insecure=not loaded.verify_ssl,
        username=loaded.username or None,
        password=loaded.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=loaded.cert_file,
        private_key_path=loaded.key_file,
        trust_env=settings.networking.trust_env,
    )


class Kube:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api

    @classmethod
    def connect(cls, user_agent: str = "luaq-operator") -> Kube:
        api = client.ApiClient(configuration())
        api.user_agent = user_agent  # how audit logs name the operator
        return cls(api)

    def close(self) -> None:
        self.api.close()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, headers, body, _request_timeout=30)
        data = response.read()
        if not 200 <= response.status < 300:
            raise ApiException.from_response(
                http_resp=response, body=data.decode("utf-8", "replace"), data=None
            )
        result: dict[str, Any] = json.loads(data) if data else {}
        return result

    def get(self, resource: ApiResource, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", resource.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, resource: ApiResource, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", resource.path(namespace), body)

    def labelled(
        self, resource: ApiResource, namespace: str, selector: str
    ) -> list[dict[str, Any]]:
        """The objects of `resource` in `namespace` that match a label selector."""
        found = self.request("GET", resource.path(namespace), query={"labelSelector": selector})
        items: list[dict[str, Any]] = found["items"]
        return items

    def delete(self, resource: ApiResource, namespace: str, name: str) -> None:
        """Gone whether it was there or not."""
        try:
            self.request("DELETE", resource.path(namespace, name))
        except ApiException as exc:
            if exc.status != 404:
                raise

    def replace(
        self, resource: ApiResource, namespace: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        return self.request("PUT", resource.path(namespace, name), body)

    def patch(
        self,
        resource: ApiResource,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        return self.request(
            "PATCH", resource.path(namespace, name, subresource), patch, MERGE_PATCH
        )

    def secret_value(self, namespace: str, name: str, key: str) -> bytes | None:
        """The value of a Secret's key; None when the Secret or the key is missing."""
        secret = self.get(SECRETS, namespace, name)
        if secret is None:
            return None
        if key in (secret.get("stringData") or {}):  # never stored by a real API server
            return str(secret["stringData"][key]).encode()
        encoded = (secret.get("data") or {}).get(key)
        return None if encoded is None else base64.b64decode(encoded)
