"""Soak: concurrent SDK clients on mixed transports for a bounded time, every result checked.

Each client streams distinct synthetic canvases (faces at known places; ``detect_stream`` with
its overload backpressure) and checks that the faces that come back are that image's. Reports requests sent, answered, lost, mismatched, errors,
the server's resident memory (process and children) after warm-up and at the end, and the
shared-memory regions registered on the server over time.

    python -m tools.operations.soak --url 127.0.0.1:8001 --seconds 120 --clients 8 --server-pid PID
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tritonclient.grpc as grpcclient
from rtface_client import Client, RtfaceError
from rtface_client.transport import cuda_unavailable_reason

from tools.matching import match_boxes
from tools.sample_images import face_canvas

__all__ = ["SoakReport", "run_soak", "process_tree_rss"]

TRANSPORT_CYCLE = ("grpc", "system_shm") + (("cuda_shm",) if cuda_unavailable_reason() is None else ())
CHECK_THRESHOLD = 0.9  # synthetic faces score > 0.99; background false positives stay below


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        stack += [int(child) for child in children]
    return total


@dataclass
class SoakReport:
    """What a soak run saw; ``lost`` counts requests that ended in neither a result nor an error."""

    seconds: float
    clients: int
    sent: int = 0
    answered: int = 0
    mismatched: int = 0
    errors: list[str] = field(default_factory=list)
    rss_after_warmup: int = 0
    rss_end: int = 0
    regions: list[int] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - self.answered - len(self.errors)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_after_warmup) / self.rss_after_warmup if self.rss_after_warmup else 0.0

    def summary(self) -> dict:
        regions = {"regions_min": min(self.regions, default=0), "regions_max": max(self.regions, default=0),
                   "region_samples": len(self.regions)}
        return {**{k: v for k, v in asdict(self).items() if k not in ("errors", "regions")}, **regions,
                "errors": len(self.errors),
                "first_errors": self.errors[:3], "lost": self.lost, "rss_growth": round(self.rss_growth, 4)}


def _client_loop(index: int, url: str, stop: threading.Event, report: SoakReport, lock: threading.Lock) -> None:
    """One client: a stream of distinct canvases (with the stream's backpressure), each checked."""
    transport = TRANSPORT_CYCLE[index % len(TRANSPORT_CYCLE)]
    sent: list = []

    def canvases():
        n = 0
        while not stop.is_set():
            canvas = face_canvas(index * 1_000_000 + n, 640, 480, count=1 + n % 3)
            n += 1
            sent.append(canvas.faces)
            with lock:
                report.sent += 1
            yield canvas.image

    try:
        with Client(url, transport=transport, timeout=60, score_threshold=CHECK_THRESHOLD) as client:
            for n, faces in enumerate(client.detect_stream(canvases(), concurrency=2)):
                truth, boxes = sent[n], [face.box for face in faces]
                ok = len(boxes) == len(truth) and (match_boxes(truth, boxes, 0.5) >= 0).all()
                with lock:
                    report.answered += 1
                    report.mismatched += 0 if ok else 1
    except RtfaceError as exc:
        with lock:
            report.errors.append(f"{transport}: {exc}")


def _region_count(url: str) -> int:
    status = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return len(status.get("regions", {}))


def run_soak(url: str, seconds: float, clients: int = 8, server_pid: int | None = None) -> SoakReport:
    """Run ``clients`` concurrent clients for ``seconds``; memory is sampled after a quarter of it."""
    report, lock, stop = SoakReport(seconds, clients), threading.Lock(), threading.Event()
    threads = [threading.Thread(target=_client_loop, args=(i, url, stop, report, lock), daemon=True)
               for i in range(clients)]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    warm_up = start + seconds / 4
    while time.monotonic() < start + seconds:
        time.sleep(min(1.0, seconds / 20))
        report.regions.append(_region_count(url))
        if server_pid and not report.rss_after_warmup and time.monotonic() >= warm_up:
            report.rss_after_warmup = process_tree_rss(server_pid)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    if server_pid:
        report.rss_end = process_tree_rss(server_pid)
    return report


def main() -> int:
    """CLI: run a soak against a running server and print the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001")
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--server-pid", type=int, default=None, help="tritonserver's pid, for RSS")
    args = parser.parse_args()
    report = run_soak(args.url, args.seconds, args.clients, args.server_pid)
    print(json.dumps(report.summary(), indent=2))
    return 0 if report.lost == 0 and report.mismatched == 0 and not report.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
