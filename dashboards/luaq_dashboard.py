"""The luaq Grafana dashboard as code: `make dashboards` writes charts/luaq/dashboards/luaq.json.

Built with Grafana's own foundation SDK, so the JSON follows the schema of the Grafana version
the SDK is pinned to (pyproject.toml). Edit this file, never the JSON: tests/chart/test_dashboard.py
fails when the committed JSON is not what this file builds, and evaluates every query below on
a real Prometheus scraping a real worker.

Every selector filters on the `namespace`, `queueconsumer`, `consumer` and `queue` variables
with regex matchers whose "All" value is `.*`, which also matches a series without that label:
the same dashboard works where the Prometheus Operator adds `namespace` (and the chart's
monitors `queueconsumer`) and on a plain Prometheus scraping a laptop. Every graph draws a line
per namespace and QueueConsumer, since the same QueueConsumer name may run in two namespaces and
the entries of two QueueConsumers share ids (every one's driver is `app:broker`); the numbers of
the overview add them up. The metrics are those of `luaq run --metrics-port` (the README's
metrics table), and in the Operator row those of `luaq-operator --metrics-port`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboards
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common, units
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableOption,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).resolve().parents[1] / "charts" / "luaq" / "dashboards" / "luaq.json"
UID = "luaq"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# label matchers of each scope: what a series of that family can be filtered on
WORKER = ('namespace=~"$namespace"', 'queueconsumer=~"$queueconsumer"')
QUEUE = (*WORKER, 'queue=~"$queue"')
CONSUMER = (*QUEUE, 'consumer=~"$consumer"')
DENIALS = (*WORKER, 'consumer=~"$consumer"')

# what tells one QueueConsumer's workers from another's
OWNER = ("namespace", "queueconsumer")

# colours of the settlement outcomes (luaq_messages_settled_total{outcome})
OUTCOME_COLORS = {
    "ack": "green",
    "retry": "yellow",
    "requeue": "blue",
    "dead_letter": "red",
    "reject": "dark-red",
    "stale": "purple",
}


def per(*labels: str) -> str:
    """A grouping that keeps the QueueConsumers apart."""
    return ", ".join((*OWNER, *labels))


def line(legend: str) -> str:
    """A line's name: its namespace and QueueConsumer first."""
    return "{{namespace}}/{{queueconsumer}} " + legend


def series(metric: str, scope: tuple[str, ...], *matchers: str) -> str:
    return f"{metric}{{{', '.join((*scope, *matchers))}}}"


def rate(metric: str, scope: tuple[str, ...], *matchers: str) -> str:
    return f"rate({series(metric, scope, *matchers)}[$__rate_interval])"


def quantile(q: float, histogram: str, scope: tuple[str, ...], by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(f'{histogram}_bucket', scope)}))"


def error_ratio(by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    errors = f"sum{grouping} ({rate('luaq_handler_errors_total', CONSUMER)})"
    invocations = f"sum{grouping} ({rate('luaq_handler_duration_seconds_count', CONSUMER)})"
    return f"{errors}\n/\n{invocations}"


# A queue a consumer reads has a luaq_consumer_concurrency series; a dead-letter queue has only
# its backlog. Every replica of a QueueConsumer reports the same broker queue, hence `max`; two
# QueueConsumers' queues are two, even of one name.
QUEUES = per("queue")
CONSUMED = f"group by ({QUEUES}) ({series('luaq_consumer_concurrency', QUEUE)})"
BACKLOG = f"max by ({QUEUES}) ({series('luaq_queue_backlog', QUEUE)})"
CONSUMED_BACKLOG = f"{BACKLOG}\nand on ({QUEUES})\n{CONSUMED}"
DELAYED = (
    f"max by ({QUEUES}) ({series('luaq_queue_delayed', QUEUE)})\nand on ({QUEUES})\n{CONSUMED}"
)
DEAD_LETTER_BACKLOG = f"{BACKLOG}\nunless on ({QUEUES})\n{CONSUMED}"


def query(expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend)


Panel = TypeVar("Panel", timeseries.Panel, stat.Panel, statetimeline.Panel)


def with_targets(panel: Panel, targets: tuple[prometheus.Dataquery, ...]) -> Panel:
    for n, target in enumerate(targets):
        panel.with_target(target.ref_id(chr(ord("A") + n)))
    return panel


def thresholds(*steps: tuple[float | None, str]) -> dashboards.ThresholdsConfig:
    return (
        dashboards.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=value, color=color) for value, color in steps])
    )


def graph(
    title: str, description: str, unit: str, *targets: prometheus.Dataquery, width: int = 12
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .span(width)
        .height(8)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            common_builders.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(
            common_builders.VizTooltipOptions()
            .mode(common.TooltipDisplayMode.MULTI)
            .sort(common.SortOrder.DESCENDING)
        )
    )
    return with_targets(panel, targets)


def single(
    title: str,
    description: str,
    unit: str,
    *targets: prometheus.Dataquery,
    steps: tuple[tuple[float | None, str], ...] = ((None, "text"),),
) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(3)
        .height(4)
        .thresholds(thresholds(*steps))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    return with_targets(panel, targets)


def variable(name: str, label: str, query_text: str, description: str) -> dashboards.QueryVariable:
    return (
        dashboards.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query_text)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
    )


def overview() -> list[stat.Panel]:
    received = rate("luaq_messages_received_total", CONSUMER)
    return [
        single(
            "Throughput",
            "Messages taken from the selected queues per second, all selected consumers and "
            "replicas together.",
            units.MessagesPerSecond,
            query(f"sum({received})", "received"),
        ),
        single(
            "Error ratio",
            "Share of handler invocations that failed: returned nil, err, raised an error or "
            "ran past their budget. The LuaqErrorRatioHigh alert fires above 5%.",
            units.PercentUnit,
            query(error_ratio(), "failed"),
            steps=((None, "green"), (0.01, "orange"), (0.05, "red")),
        ),
        single(
            "Handler p95",
            "95% of handler invocations finished within this time (all selected consumers).",
            units.Seconds,
            query(quantile(0.95, "luaq_handler_duration_seconds", CONSUMER), "p95"),
            steps=((None, "green"), (1, "orange"), (5, "red")),
        ),
        single(
            "Handler slots busy",
            "Handlers running now as a share of the configured concurrency. Near 100%, "
            "messages wait for a free slot: add concurrency or replicas.",
            units.PercentUnit,
            query(
                f"sum({series('luaq_handlers_in_flight', CONSUMER)})\n/\n"
                f"sum({series('luaq_consumer_concurrency', CONSUMER)})",
                "busy",
            ),
            steps=((None, "green"), (0.8, "orange"), (0.95, "red")),
        ),
        single(
            "Backlog",
            "Messages ready in the selected queues that consumers read, and beside them those "
            "waiting out a retry's delay (no consumer can take them yet), as the broker last "
            "reported them.",
            units.Short,
            query(f"sum(\n{CONSUMED_BACKLOG}\n)", "ready"),
            query(f"sum(\n{DELAYED}\n)", "delayed"),
        ),
        single(
            "Dead letters waiting",
            "Messages in the dead-letter queues of the selected queues. `luaq dlq list` shows "
            "why each failed; `luaq dlq replay` sends them back.",
            units.Short,
            query(f"sum(\n{DEAD_LETTER_BACKLOG}\n)", "dead letters"),
            steps=((None, "green"), (1, "red")),
        ),
        single(
            "Replicas",
            "Workers that are ready, and all those Prometheus scrapes (one per pod, whatever "
            "its --processes). A worker is ready when every driver is connected and every "
            "consumer attached.",
            units.Short,
            query(f"sum({series('luaq_worker_ready', WORKER)})", "ready"),
            query(f"count({series('luaq_build_info', WORKER)})", "running"),
        ),
        single(
            "Brokers",
            "Whether every driver of every selected worker is connected to its broker.",
            units.NoUnit,
            query(f"min({series('luaq_driver_connected', WORKER)})", "connected"),
            steps=((None, "red"), (1, "green")),
        ).mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="disconnected", color="red", index=0),
                        "1": ValueMappingResult(text="connected", color="green", index=1),
                    }
                )
            ]
        ),
    ]


def throughput_and_errors() -> list[timeseries.Panel]:
    settled = graph(
        "Messages settled, by outcome",
        "What became of the messages per second: ack (done), retry (given back, delivered "
        "again after a backoff), requeue (given back at shutdown), dead_letter (moved to the "
        "dead-letter queue), reject (dropped), stale (received on a connection lost before "
        "the settlement: the broker delivers them again).",
        units.MessagesPerSecond,
        query(
            f"sum by ({per('outcome')}) ({rate('luaq_messages_settled_total', CONSUMER)})",
            line("{{outcome}}"),
        ),
    ).stacking(common_builders.StackingConfig().mode(common.StackingMode.NORMAL))
    for outcome, color in OUTCOME_COLORS.items():
        settled.override_by_regexp(
            f".* {outcome}$", [DynamicConfigValue("color", {"mode": "fixed", "fixedColor": color})]
        )
    return [
        settled,
        graph(
            "Messages received, by consumer",
            "Deliveries each consumer took from its queue per second (redeliveries included).",
            units.MessagesPerSecond,
            query(
                f"sum by ({per('consumer')}) ({rate('luaq_messages_received_total', CONSUMER)})",
                line("{{consumer}}"),
            ),
        ),
        graph(
            "Error ratio, by consumer",
            "Share of each consumer's handler invocations that failed. The dashed line is the "
            "LuaqErrorRatioHigh alert's threshold (5% for 10 minutes).",
            units.PercentUnit,
            query(error_ratio(per("consumer")), line("{{consumer}}")),
        )
        .thresholds(thresholds((None, "transparent"), (0.05, "red")))
        .thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        ),
        graph(
            "Handler errors, by consumer and kind",
            "Failed handler invocations per second, by error kind (the Lua errors kinds: "
            "UNKNOWN for a plain error string or a raised error, TIMEOUT, INVALID, ...).",
            "errors/s",
            query(
                f"sum by ({per('consumer', 'kind')}) "
                f"({rate('luaq_handler_errors_total', CONSUMER)})",
                line("{{consumer}} {{kind}}"),
            ),
        ),
    ]


def latency_and_concurrency() -> list[timeseries.Panel]:
    duration = "luaq_handler_duration_seconds"
    return [
        graph(
            "Handler duration, by consumer",
            "How long handler invocations take: half finish within p50, 95% within p95, 99% "
            "within p99. Interpolated within histogram buckets (1 µs to 60 s). The "
            "LuaqHandlerLatencyHigh alert fires when p95 stays above 5 s.",
            units.Seconds,
            *(
                query(
                    quantile(q, duration, CONSUMER, per("consumer")),
                    line("{{consumer}} " + name),
                )
                for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))
            ),
            width=8,
        ),
        graph(
            "Handlers in flight against concurrency",
            "Invocations running now (solid) and the configured concurrency (dashed), summed "
            "over processes and replicas. In flight at the concurrency means messages wait for "
            "a slot.",
            units.Short,
            query(
                f"sum by ({per('consumer')}) ({series('luaq_handlers_in_flight', CONSUMER)})",
                line("{{consumer}} in flight"),
            ),
            query(
                f"sum by ({per('consumer')}) ({series('luaq_consumer_concurrency', CONSUMER)})",
                line("{{consumer}} concurrency"),
            ),
            width=8,
        ).override_by_regexp(
            ".* concurrency$",
            [
                DynamicConfigValue("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
                DynamicConfigValue("custom.fillOpacity", 0),
            ],
        ),
        graph(
            "Message size, by consumer",
            "Body sizes of the messages received: half are at most p50, 95% at most p95.",
            units.BytesIEC,
            *(
                query(
                    quantile(q, "luaq_message_size_bytes", CONSUMER, per("consumer")),
                    line("{{consumer}} " + name),
                )
                for q, name in ((0.5, "p50"), (0.95, "p95"))
            ),
            width=8,
        ),
    ]


def queues_and_replicas() -> list[timeseries.Panel]:
    return [
        graph(
            "Backlog, by queue",
            "Messages ready in each queue that consumers read, and those waiting out a retry's "
            "delay (`<queue> delayed`), sampled from the broker every few seconds. A backlog "
            "that keeps growing means the consumers do not keep up (LuaqBacklogGrowing); "
            "delayed ones are not work a consumer could take now.",
            units.Short,
            query(CONSUMED_BACKLOG, line("{{queue}}")),
            query(DELAYED, line("{{queue}} delayed")),
        ),
        graph(
            "Replicas, by QueueConsumer",
            "Workers Prometheus scrapes (running: one per pod, whatever its --processes) and "
            "those ready, per namespace and QueueConsumer.",
            units.Short,
            query(f"count by ({per()}) ({series('luaq_build_info', WORKER)})", line("running")),
            query(f"sum by ({per()}) ({series('luaq_worker_ready', WORKER)})", line("ready")),
        ).decimals(0),
    ]


def dead_letters() -> list[timeseries.Panel]:
    return [
        graph(
            "Dead-lettered, by consumer",
            "Messages moved to a dead-letter queue per second: they failed max_attempts times, "
            "could not be handled at all (undecodable, too large) or killed worker processes.",
            units.MessagesPerSecond,
            query(
                f"sum by ({per('consumer')}) ("
                + rate("luaq_messages_settled_total", CONSUMER, 'outcome="dead_letter"')
                + ")",
                line("{{consumer}}"),
            ),
        ),
        graph(
            "Dead letters waiting, by queue",
            "Messages in each dead-letter queue (LuaqDeadLetterQueueNotEmpty). `luaq dlq list "
            "QUEUE` shows their reasons and last errors, `luaq dlq replay QUEUE` sends them "
            "back, `luaq dlq purge QUEUE` drops them.",
            units.Short,
            query(DEAD_LETTER_BACKLOG, line("{{queue}}")),
        ).decimals(0),
    ]


def publishing() -> list[timeseries.Panel]:
    return [
        graph(
            "Messages published, by target queue",
            "Publishes the broker confirmed, per second, by the queue they went to: from "
            "handlers and `--input` (retries and dead letters are not counted here).",
            units.MessagesPerSecond,
            query(
                f"sum by ({QUEUES}) ({rate('luaq_messages_published_total', QUEUE)})",
                line("{{queue}}"),
            ),
        ),
        graph(
            "Publish failures, by target queue and kind",
            "Publishes that failed, per second, by target queue and error kind: UNAVAILABLE "
            "(no connection, a blocking broker, no confirm in time), INVALID (too big), "
            "PERMISSION_DENIED (refused by a security policy: see Permission denials), ...",
            "failures/s",
            query(
                f"sum by ({per('queue', 'kind')}) ({rate('luaq_publish_failures_total', QUEUE)})",
                line("{{queue}} {{kind}}"),
            ),
        ),
        graph(
            "Publish duration, by target queue",
            "How long a publish takes until the broker confirms it: 95% within p95, 99% "
            "within p99.",
            units.Seconds,
            *(
                query(
                    quantile(q, "luaq_publish_duration_seconds", QUEUE, QUEUES),
                    line("{{queue}} " + name),
                )
                for q, name in ((0.95, "p95"), (0.99, "p99"))
            ),
        ),
        graph(
            "Permission denials, by consumer and action",
            "Publishes a security policy refused, per second: the handler got "
            "PERMISSION_DENIED and nothing was published (LuaqPermissionDenied). The action "
            "says which check refused: queue.publish (publishing at all) or "
            "queue.publish.queue (that queue).",
            "denials/s",
            query(
                f"sum by ({per('consumer', 'action')}) "
                f"({rate('luaq_permission_denials_total', DENIALS)})",
                line("{{consumer}} {{action}}"),
            ),
        ),
    ]


def broker_connections() -> list[timeseries.Panel | statetimeline.Panel]:
    state = with_targets(
        statetimeline.Panel()
        .title("Broker connection, by driver")
        .description(
            "Whether each driver's connections are up, the worst over processes and replicas "
            "(LuaqBrokerDisconnected fires after 2 minutes down)."
        )
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .show_value(common.VisibilityMode.NEVER)
        .thresholds(thresholds((None, "red"), (1, "green")))
        .mappings(
            [
                ValueMap(
                    {
                        "0": ValueMappingResult(text="disconnected", color="red", index=0),
                        "1": ValueMappingResult(text="connected", color="green", index=1),
                    }
                )
            ]
        ),
        (
            query(
                f"min by ({per('driver')}) ({series('luaq_driver_connected', WORKER)})",
                line("{{driver}}"),
            ),
        ),
    )
    reconnects = graph(
        "Reconnects, by driver",
        "Connections re-established after a loss, counted over each point's rate interval, "
        "summed over replicas. Any reconnect means the broker was lost for a moment; the "
        "worker's logs say why.",
        units.Short,
        query(
            f"sum by ({per('driver')}) (increase("
            f"{series('luaq_driver_reconnects_total', WORKER)}[$__rate_interval]))",
            line("{{driver}}"),
        ),
    )
    return [state, reconnects]


def operator() -> list[timeseries.Panel | stat.Panel]:
    """What the operator (`luaq-operator --metrics-port`) read and wants for each QueueConsumer,
    as its leader says it (a follower drops those series), and whether a replica leads."""
    backlog = f"max by ({per()}) ({series('luaq_operator_backlog', WORKER)})"
    wanted = f"max by ({per()}) ({series('luaq_operator_desired_replicas', WORKER)})"
    read = series("luaq_operator_backlog_last_read_timestamp_seconds", WORKER)
    leader = single(
        "Operator replicas leading",
        "Operator replicas that hold the leader Lease: 1, or none reconciles or autoscales "
        "(LuaqOperatorNoLeader). The operator's own gauge, whatever the QueueConsumer variables.",
        units.Short,
        query("sum(luaq_operator_leader)", "leading"),
        steps=((None, "red"), (1, "green"), (2, "red")),
    )
    return [
        graph(
            "Backlog read and replicas wanted, by QueueConsumer",
            "Ready messages in each autoscaled QueueConsumer's queue as the operator last read "
            "them, and the replicas it wants. Messages read while it wants 0 replicas wait for "
            "nobody (LuaqScaledToZeroWithBacklog).",
            units.Short,
            query(backlog, line("backlog read")),
            query(wanted, line("replicas wanted")),
        ),
        graph(
            "Backlog reads failed, by QueueConsumer",
            "Reads of a QueueConsumer's backlog that failed, counted over each point's rate "
            "interval: the broker unreachable from the operator or refusing it; its replicas "
            "stay as they were meanwhile (LuaqBacklogReadFailing).",
            units.Short,
            query(
                f"sum by ({per()}) (increase("
                f"{series('luaq_operator_backlog_read_errors_total', WORKER)}[$__rate_interval]))",
                line("failed reads"),
            ),
            width=6,
        ),
        graph(
            "Time since the last backlog read, by QueueConsumer",
            "How old the backlog the operator scales on is: about its --autoscale-seconds while "
            "reads work, growing while they fail.",
            units.Seconds,
            query(f"time() - max by ({per()}) ({read})", line("since the last read")),
            width=6,
        ),
        graph(
            "Reconciliations, by outcome",
            "The operator's passes over each QueueConsumer, counted over each point's rate "
            "interval: ok, invalid (the spec or what it names is refused: the QueueConsumer's "
            "Degraded condition says why) or error (the API server or the broker failed; "
            "LuaqOperatorReconcileErrors when no pass succeeds).",
            units.Short,
            query(
                f"sum by ({per('outcome')}) (increase("
                f"{series('luaq_operator_reconciles_total', WORKER)}[$__rate_interval]))",
                line("{{outcome}}"),
            ),
            width=9,
        ),
        leader,
    ]


def build() -> dashboards.Dashboard:
    board = (
        dashboards.Dashboard("luaq")
        .uid(UID)
        .description(
            "Queue consumers run by luaq: throughput, errors, latency, backlog, dead letters, "
            "publishing and broker connections, from the metrics of `luaq run --metrics-port`; "
            "the operator's backlog reads, replicas wanted and reconciliations."
        )
        .tags(["luaq", "queues"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-1h", "now")
        .refresh("30s")
        .timezone(common.TimeZoneBrowser)
        .with_variable(
            dashboards.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .description("The Prometheus that scrapes the luaq workers.")
        )
        .with_variable(
            variable(
                "namespace",
                "Namespace",
                "label_values(luaq_build_info, namespace)",
                "Kubernetes namespace of the workers. Empty on a Prometheus that adds no "
                "namespace label; All then shows everything.",
            )
        )
        .with_variable(
            variable(
                "queueconsumer",
                "QueueConsumer",
                'label_values(luaq_build_info{namespace=~"$namespace"}, queueconsumer)',
                "QueueConsumers of the workers (the label the chart's monitors add). Empty on a "
                "Prometheus that adds no queueconsumer label; All then shows everything.",
            )
        )
        .with_variable(
            variable(
                "consumer",
                "Consumer",
                "label_values(luaq_consumer_concurrency{"
                'namespace=~"$namespace", queueconsumer=~"$queueconsumer"}, consumer)',
                "Consumer entries (namespace:name of the entries file).",
            )
        )
        .with_variable(
            variable(
                "queue",
                "Queue",
                'label_values({__name__=~"luaq_queue_backlog|luaq_messages_published_total", '
                'namespace=~"$namespace", queueconsumer=~"$queueconsumer"}, queue)',
                "Queue entries: those consumers read, their dead-letter queues and the queues "
                "handlers publish to.",
            )
        )
    )
    rows: list[tuple[str, Sequence[timeseries.Panel | stat.Panel | statetimeline.Panel]]] = [
        ("Overview", overview()),
        ("Throughput and errors", throughput_and_errors()),
        ("Latency and concurrency", latency_and_concurrency()),
        ("Queues and replicas", queues_and_replicas()),
        ("Dead letters", dead_letters()),
        ("Publishing and permissions", publishing()),
        ("Broker connections", broker_connections()),
        ("Operator", operator()),
    ]
    panel_id = 0
    for title, panels in rows:
        panel_id += 1
        board.with_row(dashboards.Row(title).id(panel_id))
        for panel in panels:
            panel_id += 1
            board.with_panel(panel.id(panel_id))
    return board


def render() -> str:
    """The dashboard's JSON as committed: stable key order, so diffs stay readable."""
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main() -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
