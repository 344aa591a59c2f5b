"""The operator's own Prometheus metrics, in a registry of its own (one per operator).

What it says of a QueueConsumer is labelled with its `namespace` and `queueconsumer` (the label
the workers' metrics carry under the chart's monitors), and only the leader says it: a replica
that loses the Lease drops those series, so a follower never reports a stale backlog or
desired replicas beside the leader's."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

CONSUMER = ["namespace", "queueconsumer"]
OUTCOMES = ("ok", "invalid", "error")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "luaq_operator_reconciles",
            "Reconciliations of QueueConsumers by outcome (ok, invalid, error: an API or broker "
            "failure, a backlog that could not be read included)",
            [*CONSUMER, "outcome"],
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
            CONSUMER,
            registry=self.registry,
        )
        self.ready = Gauge(
            "luaq_operator_ready_replicas",
            "Ready replicas of a QueueConsumer's Deployment",
            CONSUMER,
            registry=self.registry,
        )
        self.backlog = Gauge(
            "luaq_operator_backlog",
            "Ready messages in an autoscaled QueueConsumer's queue, as the autoscaler last read",
            CONSUMER,
            registry=self.registry,
        )
        self.read_errors = Counter(
            "luaq_operator_backlog_read_errors",
            "Reads of an autoscaled QueueConsumer's backlog that failed",
            CONSUMER,
            registry=self.registry,
        )
        self.read_time = Gauge(
            "luaq_operator_backlog_last_read_timestamp_seconds",
            "When the autoscaler last read a QueueConsumer's backlog (Unix time)",
            CONSUMER,
            registry=self.registry,
        )
        self.leader = Gauge(
            "luaq_operator_leader",
            "1 when this replica holds the leader Lease",
            registry=self.registry,
        )
        self._by_consumer = (
            self.desired,
            self.ready,
            self.backlog,
            self.read_time,
            self.read_errors,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def record(
        self,
        namespace: str,
        name: str,
        outcome: str,
        status: Mapping[str, Any] | None,
        backlog: tuple[int, float] | None,
        read_errors: int,
    ) -> None:
        """A pass over a QueueConsumer: its outcome, the replicas of the status the operator last
        wrote (None before it wrote one), the backlog last read and when (None: not autoscaled,
        or never read), and the reads of the backlog that failed in this pass."""
        self.reconciles.labels(namespace, name, outcome).inc()
        self.read_errors.labels(namespace, name).inc(read_errors)
        if status is not None:
            self.desired.labels(namespace, name).set(status["desiredReplicas"])
            self.ready.labels(namespace, name).set(status["readyReplicas"])
        if backlog is None:
            self._remove((self.backlog, self.read_time), namespace, name)
        else:
            self.backlog.labels(namespace, name).set(backlog[0])
            self.read_time.labels(namespace, name).set(backlog[1])

    def forget(self, namespace: str, name: str) -> None:
        """A QueueConsumer deleted (or its daemon stopped): its series go."""
        self._remove(self._by_consumer, namespace, name)
        for outcome in OUTCOMES:
            self._remove((self.reconciles,), namespace, name, outcome)

    def follow(self) -> None:
        """This replica lost the Lease: what it said of QueueConsumers is the leader's to say."""
        for metric in (self.reconciles, *self._by_consumer):
            metric.clear()

    @staticmethod
    def _remove(metrics: tuple[Gauge | Counter, ...], *labels: str) -> None:
        for metric in metrics:
            with contextlib.suppress(KeyError):  # never reported
                metric.remove(*labels)

    @property
    def serving(self) -> bool:
        return self._server is not None

    def serve(self, port: int) -> None:
        self._server, self._thread = start_http_server(port, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
