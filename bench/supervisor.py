"""What `luaq run` costs as a supervisor and its worker process, against another build of luaq
(say, one without a supervisor), in one alternating run on the same RabbitMQ.

    python bench/supervisor.py --luaq BEFORE/bin/luaq --luaq AFTER/bin/luaq [--rounds 3]
        [--messages 50000] [--url amqp://guest:guest@127.0.0.1:5672/]

Each round runs every build once, in turn, on N small JSON messages pre-published to a fresh
queue, with a no-op Lua handler: `luaq run --until-idle`. Per run: the consume rate the worker
reports in its summary (msg/s, start-up excluded) and the peak memory of the whole process tree,
as RSS and as PSS (shared pages counted once: a forked worker shares its parent's). Prints one
JSON object: the median of each build, and the ratios of the last build to the first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiormq
import psutil
import yaml

BODY = json.dumps({"to": "ada@example.com", "template": "welcome", "user_id": 456}).encode()


async def fill(url: str, queue: str, count: int) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_declare(queue, durable=True)
    for start in range(0, count, 1000):
        await asyncio.gather(
            *(
                channel.basic_publish(BODY, routing_key=queue)
                for _ in range(start, min(start + 1000, count))
            )
        )
    await connection.close()


async def delete(url: str, queue: str) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_delete(queue)
    await connection.close()


def tree_memory(pid: int) -> tuple[int, int]:
    """RSS and PSS of a process and its children, in bytes (0, 0 once it is gone)."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for process in processes:
        try:
            full = process.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss += full.rss
        pss += full.pss
    return rss, pss


def one_run(luaq: str, url: str, messages: int) -> dict[str, float]:
    queue = f"bench-sup-{uuid.uuid4().hex[:8]}"
    asyncio.run(fill(url, queue, messages))
    document = {
        "version": "1.0",
        "namespace": "bench",
        "entries": [
            {"name": "broker", "kind": "queue.driver.amqp", "url": url},
            {"name": "in", "kind": "queue.queue", "driver": "broker", "queue_name": queue},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle",
             "source": "function handle(p) end", "concurrency": 32, "prefetch": 200},
        ],
    }  # fmt: skip
    peak = [0, 0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "app.yaml"
            path.write_text(yaml.safe_dump(document))
            process = subprocess.Popen(
                [luaq, "--log-level", "warning", "run", str(path), "--until-idle"],
                stdout=subprocess.PIPE,
                text=True,
            )
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    rss, pss = tree_memory(process.pid)
                    peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample)
            sampler.start()
            out, _ = process.communicate(timeout=600)
            done.set()
            sampler.join()
            if process.returncode != 0:
                raise SystemExit(f"{luaq} exited with {process.returncode}")
    finally:
        asyncio.run(delete(url, queue))
    row = next(line.split() for line in out.splitlines() if line.startswith("bench:worker"))
    return {"msg_per_s": float(row[-1]), "rss_mib": peak[0] / 2**20, "pss_mib": peak[1] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--luaq", action="append", required=True, help="a luaq executable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {luaq: [] for luaq in args.luaq}
    for round_ in range(args.rounds):
        for luaq in args.luaq:
            result = one_run(luaq, args.url, args.messages)
            runs[luaq].append(result)
            sys.stderr.write(f"round {round_ + 1} {luaq}: {result}\n")
    medians = {
        luaq: {key: round(statistics.median(r[key] for r in results), 1) for key in results[0]}
        for luaq, results in runs.items()
    }
    first, last = medians[args.luaq[0]], medians[args.luaq[-1]]
    report: dict[str, Any] = {
        "benchmark": "supervisor",
        "messages": args.messages,
        "rounds": args.rounds,
        "median": medians,
        "last/first": {
            "msg_per_s": round(last["msg_per_s"] / first["msg_per_s"], 3),
            "rss_mib_more": round(last["rss_mib"] - first["rss_mib"], 1),
            "pss_mib_more": round(last["pss_mib"] - first["pss_mib"], 1),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
