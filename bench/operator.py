"""The operator at scale: N QueueConsumers applied to the emulated API server (tests/), the
operator running as `luaq-operator` in its own process, as in a pod.

Prints JSON: seconds from the first create until every QueueConsumer has its Deployment, and
the operator's peak RSS. Targets for 500: under 60 s and under 150 MB.

    .venv/bin/python bench/operator.py [--consumers 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kmock
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

from kube_emulator import BUILTINS, KubernetesEmulator, kubeconfig  # noqa: E402
from luaq.operator import crd  # noqa: E402

OPERATOR = Path(sys.executable).with_name("luaq-operator")


def peak_rss(pid: int) -> int:
    """The kernel's high-water mark of the process's resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process(pid).memory_info().rss


async def bench(consumers: int) -> dict[str, Any]:
    emulator = KubernetesEmulator()
    for kind in BUILTINS:
        emulator.register(kind)
    emulator.register_crd(crd.crd())
    example = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "examples/k8s/email-worker.yaml").read_text())
        if doc
    )
    async with emulator, kmock.Server(emulator) as server:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "kubeconfig"
            config.write_text(kubeconfig(str(server.url).rstrip("/")))
            env = {**os.environ, "KUBECONFIG": str(config)}
            log = (Path(tmp) / "operator.log").open("wb")
            operator = await asyncio.create_subprocess_exec(
                OPERATOR, "--metrics-port", "0", "--health-port", "0",
                "--lease-namespace", "default", "--log-level", os.environ.get("LOG", "warning"),
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                secret = {"metadata": {"name": "rabbitmq"}, "stringData": {"url": "amqp://x/"}}
                await emulator.post("/api/v1/namespaces/bench/secrets", json=secret)
                started = time.monotonic()
                path = "/apis/luaq.dev/v1alpha1/namespaces/bench/queueconsumers"
                for number in range(consumers):
                    body = {**example, "metadata": {"name": f"worker-{number}"}}
                    response = await emulator.post(path, json=body)
                    assert response.status == 200, await response.text()
                created = time.monotonic() - started
                deadline = started + 300
                while len(emulator.read_all("deployments", "bench")) < consumers:
                    if time.monotonic() > deadline or operator.returncode is not None:
                        tail = (Path(tmp) / "operator.log").read_text()[-3000:]
                        raise SystemExit(f"the operator did not create every Deployment:\n{tail}")
                    await asyncio.sleep(0.05)
                seconds = time.monotonic() - started
                rss = peak_rss(operator.pid)
                operator_cpu = sum(psutil.Process(operator.pid).cpu_times()[:2])
            finally:
                stopping = time.monotonic()
                operator.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(operator.wait(), 60)
                except TimeoutError:
                    operator.kill()
                    raise
                finally:
                    stop = time.monotonic() - stopping
                    if os.environ.get("LOG"):
                        print((Path(tmp) / "operator.log").read_text(), file=sys.stderr)
    return {
        "queueconsumers": consumers,
        "seconds_to_create_them": round(created, 2),
        "seconds_until_all_have_a_deployment": round(seconds, 2),
        "deployments_per_second": round(consumers / seconds, 1),
        "operator_peak_rss_mb": round(rss / 2**20, 1),
        "seconds_to_stop_on_sigterm": round(stop, 2),
        "operator_cpu_seconds": round(operator_cpu, 1),
        "api_requests": sum(1 for _ in emulator),
        "targets": {"seconds": 60, "peak_rss_mb": 150},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumers", type=int, default=500)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(bench(args.consumers)), indent=2))


if __name__ == "__main__":
    main()
