"""bench/peers.py, small, on the real broker: every peer runs both workloads through its own
worker, the latency runs report, luaq is profiled, the JSON has what the README's table is made
from, and the run's vhost is gone afterwards. Figures are not checked: speed is the bench's
business, not the suite's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from broker import rabbitmqctl

BENCH = Path(__file__).resolve().parents[1] / "bench" / "peers.py"
PEERS = ["luaq", "minimal", "aio_pika", "faststream", "dramatiq", "celery"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=180
    )


def bench_vhosts() -> set[str]:
    return {name for name in rabbitmqctl("list_vhosts").split() if name.startswith("luaq-bench-")}


def test_every_peer_runs_both_workloads_and_the_report_has_it_all() -> None:
    before = bench_vhosts()
    result = bench("--messages", "300", "--rounds", "1", "--latency-seconds", "0.1")
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)

    assert list(report["settings"]) == PEERS
    for workload in ("consume", "publish"):
        rates = report["msg_per_s"][workload]
        assert list(rates) == PEERS
        assert all(rate > 0 for rate in rates.values()), rates
        assert list(report["ratios"][workload]) == [f"luaq/{peer}" for peer in PEERS[1:]]
        assert all(len(rounds) == 1 for rounds in report["msg_per_s_by_round"][workload].values())
        cpu = report["cpu_us_per_msg"][workload]
        assert list(cpu) == PEERS
        assert all(figures["consumer"] >= 0 for figures in cpu.values()), cpu

    latency = report["latency"]
    assert latency["luaq_end_to_end_max"] > 0
    assert abs(latency["rate"] - latency["luaq_end_to_end_max"] / 2) <= 1
    for peer in ("luaq", "aio_pika"):
        figures = latency[peer]
        assert abs(figures["published"] - latency["rate"] * 0.1) <= 1
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], figures
        assert figures["end_to_end_rate"] > 0, figures

    assert set(report["targets"]) >= {"consume luaq/minimal", "latency luaq p99_ms"}
    assert set(report["missed"]) <= set(report["targets"])
    beyond = {
        f"{workload} luaq/{peer}": 5.0 * rates[peer]
        for workload, rates in report["msg_per_s"].items()
        for peer in ("faststream", "dramatiq", "celery")
        if f"{workload} luaq/{peer}" in report["missed"] and 5.0 * rates[peer] > rates["minimal"]
    }
    assert set(report["missed_beyond_minimal"]) == set(beyond), report
    for name, figures in report["missed_beyond_minimal"].items():
        assert figures["needs_msg_per_s"] == round(beyond[name]), figures
        assert figures["needs_msg_per_s"] > figures["minimal_msg_per_s"], figures
    assert set(report["profile"]) == {"luaq consume", "luaq publish"}
    for profile in report["profile"].values():
        shares = profile["self_percent_by_file"].values()
        assert sum(shares) <= 100 + 0.05 * len(shares), shares  # each share is rounded to 0.1
    assert report["machine"]["rabbitmq"]
    assert bench_vhosts() <= before


def test_an_unknown_peer_is_refused_before_anything_runs() -> None:
    before = bench_vhosts()
    result = bench("--peers", "luaq,kafka")
    assert result.returncode == 2
    assert "--peers: no kafka among luaq, minimal, aio_pika" in result.stderr
    assert bench_vhosts() <= before


def test_a_missed_target_beyond_the_minimal_consumer_says_what_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from peers import beyond_minimal

    rates = {
        "consume": {"luaq": 24_000, "minimal": 29_000, "dramatiq": 5_000, "celery": 7_000},
        "publish": {"luaq": 11_700, "minimal": 11_750, "dramatiq": 2_960, "celery": 1_250},
    }
    found = {
        "consume luaq/dramatiq": 4.8,  # 5 x 5,000 is under the minimal consumer's rate
        "consume luaq/celery": 3.43,
        "publish luaq/dramatiq": 3.95,
    }
    assert beyond_minimal(rates, found) == {
        "consume luaq/celery": {
            "needs_msg_per_s": 35_000, "minimal_msg_per_s": 29_000, "needs/minimal": 1.21,
        },
        "publish luaq/dramatiq": {
            "needs_msg_per_s": 14_800, "minimal_msg_per_s": 11_750, "needs/minimal": 1.26,
        },
    }  # fmt: skip
    without_minimal = {"publish": {"luaq": 1, "dramatiq": 1}}
    assert beyond_minimal(without_minimal, {"publish luaq/dramatiq": 1.0}) == {}
