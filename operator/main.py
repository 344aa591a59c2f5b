"""`luaq-operator`: run the operator. Every flag can also be set as LUAQ_OPERATOR_<FLAG>.

kopf and the Kubernetes client come with the `operator` extra: they are imported when the
operator starts, not with this module, so that without them `luaq-operator` says what to
install instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from luaq.runtime import logs

from .resource import QUANTITY
from .settings import DEFAULT_IMAGE, OperatorSettings, Policy

_SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# What the `operator` extra installs, by import name.
_OPERATOR_EXTRA = ("kopf", "kubernetes", "aiohttp")
EXIT_FAILURE, EXIT_CONFIG = 1, 2  # as luaq's (luaq.runtime.errors): could not run, nothing ran


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"LUAQ_OPERATOR_{name.upper()}", default)


def _own_namespace() -> str:
    """The operator's namespace: the pod's (downward API or service account), else default."""
    if namespace := os.environ.get("POD_NAMESPACE"):
        return namespace
    if _SERVICE_ACCOUNT_NAMESPACE.exists():
        return _SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def _list(name: str) -> list[str]:
    return [item for item in _env(name, "").split(",") if item]


def _quantity(text: str) -> str:
    """A Kubernetes quantity, checked as the API server checks it."""
    if not QUANTITY.match(text):
        raise argparse.ArgumentTypeError(f"not a Kubernetes quantity: {text!r}")
    return text


def _in_workers_schema(record: logging.LogRecord) -> bool:
    """kopf's lines carry the object they are about as `k8s_ref` (with kopf's settings beside
    it): in the workers' schema, the `namespace` and `queueconsumer` their metrics are labelled
    with, or `object` (Kind/name) for another kind. kopf has posted its Event by then (its
    handler sits on a logger below the root's)."""
    fields = record.__dict__
    fields.pop("settings", None)
    fields.pop("k8s_skip", None)
    ref = fields.pop("k8s_ref", None) or {}
    if namespace := ref.get("namespace"):
        fields.setdefault("namespace", namespace)
    if ref.get("kind") == "QueueConsumer":
        fields.setdefault("queueconsumer", ref.get("name"))
    elif ref:
        fields.setdefault("object", f"{ref.get('kind')}/{ref.get('name')}")
    return True


def _parser() -> argparse.ArgumentParser:
    parser = logs.Parser(
        prog="luaq-operator",
        description="Run the luaq operator: QueueConsumer resources become worker Deployments.",
        epilog="It needs the operator extra (pip install 'luaq[operator]'); without it, it "
        f"exits with {EXIT_CONFIG}. It logs in the workers' schema.",
        parents=[logs.options("LUAQ_OPERATOR_")],
    )
    namespaces = _env("namespace", "")
    parser.add_argument(
        "--namespace",
        action="append",
        default=[ns for ns in namespaces.split(",") if ns],
        metavar="NS",
        help="watch this namespace (repeatable; default: all namespaces)",
    )
    parser.add_argument(
        "--image",
        default=_env("image", DEFAULT_IMAGE),
        help="the worker image, unless a QueueConsumer names one (default: %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("metrics_port", 8080)),
        metavar="PORT",
        help="serve the operator's Prometheus /metrics here; 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--health-port",
        type=int,
        default=int(_env("health_port", 8081)),
        metavar="PORT",
        help="serve kopf's liveness probe on /healthz here; 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--worker-metrics-port",
        type=int,
        default=int(_env("worker_metrics_port", OperatorSettings.worker_metrics_port)),
        metavar="PORT",
        help="the workers' metrics and health port (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-name",
        default=_env("lease_name", OperatorSettings.lease_name),
        help="the leader election Lease (default: %(default)s)",
    )
    parser.add_argument(
        "--lease-namespace",
        default=_env("lease_namespace", None),
        metavar="NS",
        help="the Lease's namespace (default: the operator's own)",
    )
    parser.add_argument(
        "--lease-seconds",
        type=float,
        default=float(_env("lease_seconds", OperatorSettings.lease_seconds)),
        metavar="SECONDS",
        help="the Lease's duration: a holder that cannot renew it stops acting after 2/3 of it, "
        "another replica takes over after all of it (default: %(default)s)",
    )
    parser.add_argument(
        "--watch-seconds",
        type=int,
        default=int(_env("watch_seconds", OperatorSettings.watch_seconds)),
        metavar="SECONDS",
        help="end and restart each watch this often; liveness fails when one is not restarted "
        "for three such periods (default: %(default)s)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(_env("resync_seconds", OperatorSettings.resync_seconds)),
        metavar="SECONDS",
        help="re-check every QueueConsumer this often (default: %(default)s)",
    )
    parser.add_argument(
        "--autoscale-seconds",
        type=float,
        default=float(_env("autoscale_seconds", OperatorSettings.autoscale_seconds)),
        metavar="SECONDS",
        help="read autoscaled queues' backlog this often (default: %(default)s)",
    )
    policy = parser.add_argument_group(
        "what a QueueConsumer may ask for",
        "Creating a QueueConsumer creates pods in its namespace; on a cluster shared by teams, "
        "bound what they run. A QueueConsumer beyond these is Degraded (NotAllowed), nothing "
        "of it applied.",
    )
    policy.add_argument(
        "--allow-image",
        action="append",
        default=_list("allow_image"),
        metavar="GLOB",
        help="an image pattern the workers may run, as registry.example/luaq:* (repeatable; "
        "default: any)",
    )
    policy.add_argument(
        "--allow-service-account",
        action="append",
        default=_list("allow_service_account"),
        metavar="GLOB",
        help="a service account the workers may run as (repeatable; default: any)",
    )
    policy.add_argument(
        "--secret-env",
        action=argparse.BooleanOptionalAction,
        default=_env("secret_env", "true").lower() in ("1", "true", "yes"),
        help="whether a QueueConsumer's env and volumes may take values from its namespace's "
        "Secrets (default: yes)",
    )
    for name, default, what in (
        ("replicas", Policy.max_replicas, "replicas (or autoscaling's maxReplicas)"),
        ("processes", Policy.max_processes, "worker processes per pod"),
    ):
        policy.add_argument(
            f"--max-{name}",
            type=int,
            default=int(_env(f"max_{name}", default)),
            metavar="N",
            help=f"the most {what} (default: %(default)s)",
        )
    for name in ("cpu", "memory"):
        policy.add_argument(
            f"--max-{name}",
            type=_quantity,
            default=_env(f"max_{name}", None),
            metavar="QUANTITY",
            help=f"the most {name} a worker may request or be limited to (default: no bound)",
        )
    parser.add_argument(
        "--check-concurrency",
        type=int,
        default=int(_env("check_concurrency", OperatorSettings.check_concurrency)),
        metavar="N",
        help="QueueConsumers' Lua sources checked at once, each in a child process "
        "(default: %(default)s)",
    )
    return parser


def settings_from(args: argparse.Namespace) -> OperatorSettings:
    # The pod's name, else the host's: never the user's, which a container's uid may not have.
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
    return OperatorSettings(
        image=args.image,
        namespaces=tuple(args.namespace),
        worker_metrics_port=args.worker_metrics_port,
        metrics_port=args.metrics_port,
        resync_seconds=args.resync_seconds,
        autoscale_seconds=args.autoscale_seconds,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace or _own_namespace(),
        lease_seconds=args.lease_seconds,
        identity=identity,
        check_concurrency=args.check_concurrency,
        policy=Policy(
            images=tuple(args.allow_image or ("*",)),
            service_accounts=tuple(args.allow_service_account or ("*",)),
            secret_env=args.secret_env,
            max_replicas=args.max_replicas,
            max_processes=args.max_processes,
            max_cpu=args.max_cpu,
            max_memory=args.max_memory,
        ),
        watch_seconds=args.watch_seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logs.configure_from(argv, "LUAQ_OPERATOR_", service=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_in_workers_schema)
    args = _parser().parse_args(argv)
    try:
        import kopf
        from kopf._core.engines.peering import Identity  # kopf.run's type, not exported

        from .handlers import registry
        from .manager import Operator
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _OPERATOR_EXTRA:
            raise
        logs.report(
            f"{exc.name} is not installed; install the operator with pip install 'luaq[operator]'",
            prefix="luaq-operator: ",
        )
        return EXIT_CONFIG
    settings = settings_from(args)
    if args.log_level != "debug":  # a line per probe of the kubelet's says nothing
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    operator = Operator(settings)
    if settings.metrics_port:  # before kopf, which would try a failed start-up again each minute
        try:
            operator.metrics.serve(settings.metrics_port)
        except OSError as exc:
            logs.report(f"--metrics-port {settings.metrics_port}: {exc.strerror or exc}")
            return EXIT_FAILURE
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    kopf.run(
        registry=registry(operator),
        standalone=True,  # one replica acts at a time through the leader Lease, not kopf peering
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
        # else kopf names itself after the user from the passwd database, which has no entry
        # for the image's uid (KeyError at start-up)
        identity=Identity(settings.identity),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
