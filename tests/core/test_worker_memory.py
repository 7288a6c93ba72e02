"""Pool workers keep the memory they free (runtime/worker_memory.py): an image's buffers of ~100 KB
to a few MB, allocated and freed again and again, are not faulted in from the kernel each time."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from imnet_assets.runtime import procpool, workerpool

JOB = (256 << 10,) * 8 + (2 << 20,)  # a job's eight sources and its reply: 4 MiB, 1024 pages
ROUNDS = 40


def faults_per_job(sizes: tuple[int, ...] = JOB, rounds: int = ROUNDS) -> float:
    """Minor page faults per round of allocating `sizes` fresh bytes at once (every page written),
    then freeing them all, as a worker does per job."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(rounds):
        alive = [bytes([i % 256]) * size for size in sizes]
        del alive
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


@dataclasses.dataclass
class FaultsJob:
    """A workerpool job measuring faults_per_job in the encode worker that runs it."""

    def prefetch(self, readers):
        return None

    def run(self, state, mark):
        return faults_per_job()


def test_without_the_tuning_a_job_s_memory_is_faulted_in_again_each_time():
    """The baseline the tuning removes: a plain process (glibc's default thresholds) gives the
    freed job's memory back (the heap's top trimmed) and faults it in again: ~1000 faults a job."""
    script = f"import sys; sys.path[:0] = {sys.path!r}\nfrom tests.core.test_worker_memory import faults_per_job\n" \
             "print(faults_per_job())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert float(out.stdout) > 500


def test_encode_workers_reuse_what_they_freed():
    pool = workerpool.WorkerPool(1)
    try:
        assert pool.submit(FaultsJob()).result(timeout=120) < 100  # ~1000 without the tuning
    finally:
        pool.resize(0)


def test_process_pool_workers_reuse_what_they_freed():
    with procpool.process_pool(1) as pool:
        assert pool.submit(faults_per_job).result(timeout=120) < 100
