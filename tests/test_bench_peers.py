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


def test_a_target_over_a_peer_is_5x_or_what_the_broker_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """5x a peer that comes close to the broker's limit would ask luaq for more than the broker
    delivers to anyone: then 0.8x the minimal consumer of the same run is the target."""
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from peers import missed

    rates = {
        "consume": {"luaq": 24_000, "minimal": 29_000, "dramatiq": 5_000, "celery": 7_000},
        "publish": {"luaq": 11_700, "minimal": 11_750, "dramatiq": 2_960, "celery": 1_250},
    }
    # 5x Dramatiq (25,000) and 5x Celery (35,000) ask more than 0.8 x minimal (23,200)
    assert missed(rates, 10.0) == {}
    slow = {"publish": {"luaq": 9_000, "minimal": 11_750, "dramatiq": 2_960}}
    assert missed(slow, 60.0) == {
        "publish luaq/minimal": 0.77,
        "publish luaq/dramatiq": 3.04,  # needs min(14,800, 9,400)
        "latency luaq p99_ms": 60.0,
    }
    without_minimal = {"publish": {"luaq": 10, "dramatiq": 3}}
    assert missed(without_minimal, 1.0) == {"publish luaq/dramatiq": 3.33}


def test_a_profile_line_py_spy_cut_short_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from peers import hot_spots

    raw = "main (app.py:1);work (app.py:9) 3\nmain (app.py:1);idle (app.py:4) 1\nmain (app.py:1);wo"
    found = hot_spots(raw)
    assert found["samples"] == 4
    assert found["self_percent_by_function"] == {"work (app.py)": 75.0, "idle (app.py)": 25.0}
