"""What a busy Python thread does to the policy's JPEG round trip in the same process (the GIL), and what
a shorter GIL switch interval buys back.

In the asynchronous rollout pool (``srpo_rl.rollout``, ``overlap=True``) the policy runs on a thread of its
own while the loop thread takes in the returning chunks (unpickling, bookkeeping: pure Python, holding the
GIL). The policy's preprocessing starts with a JPEG round trip per frame on a thread pool
(``srpo_rl.policy._jpeg_roundtrip``): PIL releases the GIL inside the codec, but every image also needs the
GIL for its Python steps, and a thread that asks for the GIL waits up to ``sys.getswitchinterval()``
(5 ms by default) while another thread holds it. This script measures that cost on the machine it runs on:

- ``alone``: the round trip of a batch of frames, nothing else running (the baseline);
- ``busy loop, switch S ms``: the same, beside a thread doing pure-Python work in slices of ``--slice-ms``
  with a short wait between them (the shape of the rollout loop), with the switch interval at S;
- ``busy process``: the same work in another process (the CPU taken, but no GIL shared): the control
  that separates the cost of the GIL from that of a busy core;
- for each thread case, the busy thread's work rate against its rate alone (what a shorter interval
  costs it).

    python benchmarks/gil_contention.py                 # batch 8, switch intervals 5, 1 and 0.5 ms
    python benchmarks/gil_contention.py --batch 16 --repeats 60

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import threading
import time

import numpy as np
import torch

from _common import command, machine, versions

from srpo_rl.jpeg import JPEG_QUALITY
from srpo_rl.policy import _jpeg_roundtrip


def frames(batch: int) -> torch.Tensor:
    """uint8 ``[batch, 3, 256, 256]`` smooth gradients: they compress like a LIBERO render (about 0.8 ms a
    round trip on one core), where noise would cost more."""
    y, x = np.mgrid[0:256, 0:256]
    image = np.stack([(x + y) % 256, (2 * x) % 256, (3 * y) % 256]).astype(np.uint8)
    return torch.from_numpy(np.stack([np.roll(image, i, axis=-1) for i in range(batch)]))


class BusyLoop:
    """A thread doing pure-Python work in slices of ``slice_s`` with ``wait_s`` of waiting between them."""

    def __init__(self, slice_s: float, wait_s: float):
        self.slice_s, self.wait_s, self.slices = slice_s, wait_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < self.slice_s:
                sum(range(200))
            self.slices += 1
            time.sleep(self.wait_s)

    def __enter__(self) -> BusyLoop:
        self.start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.rate = self.slices / (time.perf_counter() - self.start)


def round_trip_ms(batch: torch.Tensor, repeats: int) -> float:
    """Median wall time of one round trip of ``batch`` (ms)."""
    _jpeg_roundtrip(batch, JPEG_QUALITY)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _jpeg_roundtrip(batch, JPEG_QUALITY)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _busy_process(slice_s: float, wait_s: float, stop) -> None:
    with BusyLoop(slice_s, wait_s):
        stop.wait()


def busy_rate_alone(slice_s: float, wait_s: float, seconds: float) -> float:
    with BusyLoop(slice_s, wait_s) as loop:
        time.sleep(seconds)
    return loop.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="frames per round trip (the policy's batch)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--slice-ms", type=float, default=4.0, help="the busy thread's GIL-holding slice")
    parser.add_argument("--wait-ms", type=float, default=0.3, help="its wait between slices (GIL released)")
    parser.add_argument("--intervals-ms", default="5,1,0.5", help="GIL switch intervals to try, comma-separated")
    args = parser.parse_args()
    batch = frames(args.batch)
    slice_s, wait_s = args.slice_ms / 1e3, args.wait_ms / 1e3
    default_interval = sys.getswitchinterval()

    alone = round_trip_ms(batch, args.repeats)
    rows = [{"case": "alone", "switch_interval_ms": 1e3 * default_interval, "round_trip_ms": alone,
             "vs_alone": 1.0, "busy_rate_vs_alone": None}]
    try:
        for interval_ms in (float(v) for v in args.intervals_ms.split(",")):
            sys.setswitchinterval(interval_ms / 1e3)
            reference = busy_rate_alone(slice_s, wait_s, seconds=1.0)
            with BusyLoop(slice_s, wait_s) as loop:
                ms = round_trip_ms(batch, args.repeats)
            rows.append({"case": f"busy loop, switch {interval_ms:g} ms", "switch_interval_ms": interval_ms,
                         "round_trip_ms": ms, "vs_alone": ms / alone, "busy_rate_vs_alone": loop.rate / reference})
    finally:
        sys.setswitchinterval(default_interval)
    stop = multiprocessing.Event()
    child = multiprocessing.Process(target=_busy_process, args=(slice_s, wait_s, stop), daemon=True)
    child.start()
    time.sleep(0.5)  # started and busy
    ms = round_trip_ms(batch, args.repeats)
    stop.set()
    child.join()
    rows.append({"case": "busy process (no GIL)", "switch_interval_ms": 1e3 * default_interval,
                 "round_trip_ms": ms, "vs_alone": ms / alone, "busy_rate_vs_alone": None})

    print(f"\nJPEG round trip of {args.batch} frames (256x256, quality 95, the policy's thread pool); busy thread: "
          f"{args.slice_ms:g} ms slices of Python, {args.wait_ms:g} ms waits")
    print(f"{'case':<26} {'ms':>7} {'vs alone':>9} {'busy thread rate vs alone':>26}")
    for row in rows:
        rate = "" if row["busy_rate_vs_alone"] is None else f"{row['busy_rate_vs_alone']:.2f}"
        print(f"{row['case']:<26} {row['round_trip_ms']:>7.1f} {row['vs_alone']:>8.2f}x {rate:>26}")
    print(json.dumps({"benchmark": "gil_contention", "batch": args.batch, "slice_ms": args.slice_ms,
                      "wait_ms": args.wait_ms, "results": rows, "machine": machine(), "versions": versions(),
                      "command": command()}))


if __name__ == "__main__":
    main()
