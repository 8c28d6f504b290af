"""Overload: bursts far beyond what the server holds, against its unloaded latency.

The CPU detector runs at most ``overload_keep`` requests at once and answers the older ones it is
handed "overloaded" (a queue policy's ``max_queue_size``, where one is built in, also rejects on
arrival). This measures, in one run: the unloaded latency (one request at a time), then
``--rounds`` bursts of ``--burst`` requests fired at once (default: 10 x what the server holds),
reporting accepted-request latency percentiles, rejections, and the slowest request of all
against the client timeout.

    python -m tools.operations.overload --url 127.0.0.1:8001 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from rtface_client import Client, RtfaceError, ServerOverloadedError

from tools.engine.repository import ENSEMBLE
from tools.sample_images import face_canvas
from tools.server_info import admitted_queue

__all__ = ["BurstReport", "run_overload"]


@dataclass
class BurstReport:
    """Latencies in seconds; ``other_errors`` are failures that are not overload rejections."""

    timeout: float
    unloaded: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        p = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None  # noqa: E731
        everything = self.accepted + self.rejected
        return {
            "unloaded_p50_ms": p(self.unloaded, 50), "unloaded_p99_ms": p(self.unloaded, 99),
            "accepted": len(self.accepted), "accepted_p50_ms": p(self.accepted, 50),
            "accepted_p99_ms": p(self.accepted, 99),
            "p99_ratio": round(p(self.accepted, 99) / p(self.unloaded, 99), 2) if self.accepted else None,
            "rejected": len(self.rejected), "rejected_p99_ms": p(self.rejected, 99),
            "other_errors": len(self.other_errors), "first_errors": self.other_errors[:3],
            "slowest_ms": round(max(everything) * 1000, 1) if everything else None,
            "timeout_ms": self.timeout * 1000,
        }


def _timed(client: Client, image: np.ndarray, start: threading.Barrier, report: BurstReport,
           lock: threading.Lock) -> None:
    start.wait()
    began = time.perf_counter()
    try:
        client.detect(image)
        outcome = report.accepted
    except ServerOverloadedError:
        outcome = report.rejected
    except RtfaceError as exc:
        with lock:
            report.other_errors.append(str(exc))
        return
    with lock:
        outcome.append(time.perf_counter() - began)


def run_overload(url: str, burst: int = 30, rounds: int = 5, unloaded: int = 30,
                 timeout: float = 10.0) -> BurstReport:
    """Measure unloaded latency, then fire ``rounds`` bursts of ``burst`` simultaneous requests."""
    report, lock = BurstReport(timeout), threading.Lock()
    images = [face_canvas(seed, count=3).image for seed in range(burst)]  # engine-sized: no resize
    with Client(url, transport="system_shm", timeout=timeout) as client:
        client.detect(images[0])  # warm-up
        for i in range(unloaded):
            began = time.perf_counter()
            client.detect(images[i % burst])
            report.unloaded.append(time.perf_counter() - began)
        with ThreadPoolExecutor(burst) as pool:
            for _ in range(rounds):
                barrier = threading.Barrier(burst)
                list(pool.map(lambda image: _timed(client, image, barrier, report, lock), images))
                time.sleep(0.5)  # let the queue drain between bursts
    return report


def main() -> int:
    """CLI: run against a server and print the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--burst", type=int, default=None,
                        help="requests per burst (default: 10 x the requests the server holds at once)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    burst = args.burst or 10 * (admitted_queue(args.url, ENSEMBLE) or 3)
    report = run_overload(args.url, burst, args.rounds, timeout=args.timeout)
    print(json.dumps({"burst": burst, **report.summary()}, indent=2))
    return 0 if not report.other_errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
