"""A worker's metrics served and scraped while a benchmark runs, as Prometheus would (more
often than it would: every 0.5 s), so that "metrics on" costs what it costs in a pod."""

from __future__ import annotations

import contextlib
import threading
import urllib.request
from collections.abc import Iterator

from luaq.runtime.assembly import Loaded, build
from luaq.runtime.metrics import Server
from luaq.runtime.worker import Worker

INTERVAL = 0.5


@contextlib.contextmanager
def scraped(loaded: Loaded) -> Iterator[Worker]:
    """The worker for what was loaded, as `luaq run --metrics-port` builds it, scraped."""
    server = Server("127.0.0.1", 0)
    worker = build(loaded, sample_backlog=True, metrics_address=server.address)
    server.start(worker.telemetry.source())
    done = threading.Event()

    def scrape() -> None:
        while not done.wait(INTERVAL):
            with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as page:
                page.read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        yield worker
    finally:
        done.set()
        scraper.join()
        server.stop()
