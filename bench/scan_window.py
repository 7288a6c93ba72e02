"""A model of the index's scan at the real size: how long it takes, against its ideal time (all
bytes over all workers), for a window of W x workers jobs whose results are taken in input order
and a pool that sends a job to a worker holding fewer than `hold` jobs (stages/scan_pool.py).

    python bench/scan_window.py [--workers 64] [--tars 4000] [--seed 2]

A job's time is its tar's size (decoding is the work); tar sizes from guessed distributions (no
real listing here): "mixture" (55% of synsets of 900-1,400 images, the rest a long tail of small
ones), lognormal(0, 0.5) and lognormal(0, 0.7). hold 4 with 2 x workers was the scan when it moved
into the WorkerPool; hold 1 with 2 x workers is the old ProcessPoolExecutor's shared queue.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics


def makespan(durations: list[float], workers: int, window: int, hold: int) -> float:
    """Finish time of the in-order windowed scan of jobs of these durations (event driven)."""
    queue: collections.deque = collections.deque()
    held = [collections.deque() for _ in range(workers)]
    busy_until = [0.0] * workers
    done: dict[int, float] = {}

    def step(now: float) -> None:
        for w in range(workers):
            if busy_until[w] <= now and held[w]:
                j = held[w].popleft()
                busy_until[w] = done[j] = now + durations[j]
        while queue:
            count = [len(held[w]) + (busy_until[w] > now) for w in range(workers)]
            w = min(range(workers), key=count.__getitem__)
            if count[w] >= hold:
                return
            held[w].append(queue.popleft())
            if busy_until[w] <= now:
                j = held[w].popleft()
                busy_until[w] = done[j] = now + durations[j]

    out: collections.deque = collections.deque()
    now = 0.0

    def take_head(now: float) -> float:
        head = out[0]
        while head not in done or done[head] > now:
            now = min(b for b in busy_until if b > now)
            step(now)
        out.popleft()
        return now

    for j in range(len(durations)):
        out.append(j)
        queue.append(j)
        step(now)
        if len(out) >= window:
            now = take_head(now)
    while out:
        now = take_head(now)
    return now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--tars", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    rng = random.Random(a.seed)

    def mixture() -> float:
        images = rng.uniform(900, 1400) if rng.random() < 0.55 else min(1400, rng.lognormvariate(5.0, 1.0))
        return images * rng.lognormvariate(0, 0.2)

    for label, draw in (("mixture", mixture), ("lognormal 0.5", lambda: rng.lognormvariate(0, 0.5)),
                        ("lognormal 0.7", lambda: rng.lognormvariate(0, 0.7))):
        sizes = [draw() for _ in range(a.tars)]
        ideal = sum(sizes) / a.workers
        print(f"{label}: largest tar {max(sizes) / statistics.mean(sizes):.1f} x the mean")
        for window, hold in ((2, 4), (2, 1), (4, 1), (8, 1)):
            ratio = makespan(sizes, a.workers, window * a.workers, hold) / ideal
            print(f"  window {window} x workers, hold {hold}: {ratio:.3f} x ideal")


if __name__ == "__main__":
    main()
