"""The operator's own Prometheus metrics, in a registry of its own (one per operator)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "luaq_operator_reconciles",
            "Reconciliations of QueueConsumers by outcome (ok, invalid, error)",
            ["outcome"],
            registry=self.registry,
        )
        self.consumers = Gauge(
            "luaq_operator_queueconsumers",
            "QueueConsumers this operator manages",
            registry=self.registry,
        )
        self.desired = Gauge(
            "luaq_operator_desired_replicas",
            "Replicas a QueueConsumer asks for (spec or autoscaler)",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.ready = Gauge(
            "luaq_operator_ready_replicas",
            "Ready replicas of a QueueConsumer's Deployment",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "luaq_operator_leader",
            "1 when this replica holds the leader Lease",
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def record(
        self, namespace: str, name: str, outcome: str, status: Mapping[str, Any] | None
    ) -> None:
        """A pass over a QueueConsumer: its outcome, and the replicas of the status the operator
        last wrote (None before it wrote one)."""
        self.reconciles.labels(outcome).inc()
        if status is not None:
            self.desired.labels(namespace, name).set(status["desiredReplicas"])
            self.ready.labels(namespace, name).set(status["readyReplicas"])

    def forget(self, namespace: str, name: str) -> None:
        for gauge in (self.desired, self.ready):
            with contextlib.suppress(KeyError):  # never reported
                gauge.remove(namespace, name)

    def serve(self, port: int) -> None:
        self._server, self._thread = start_http_server(port, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
