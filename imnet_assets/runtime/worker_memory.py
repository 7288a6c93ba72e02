"""Pool workers keep the memory they free for the next image, instead of handing it back to the
kernel and faulting it in again.

glibc's malloc returns a freed block larger than M_MMAP_THRESHOLD (128 KiB at first, raised as such
blocks are freed) to the kernel at once (munmap), and trims the heap's free top past
M_TRIM_THRESHOLD (twice that). An encode worker allocates and frees, per image, a source (~100 KB
to a few MB), its stored image, the sample's bytes and its share of a reply (~1 MB a job of 8): so
each image's buffers were fresh pages, zeroed by the kernel on their first touch, ~100 page faults
an image beyond the codec's own, and the workers spent 1.3-1.9% of their CPU in the kernel against
the bare chain's 1% (bench/malloc_faults.py measures both sides: faults and CPU per image with
and without this tuning, in the same run). Fixed thresholds (setting either also stops glibc's
dynamic adjustment) keep blocks up to MMAP_THRESHOLD in the heap and up to TRIM_THRESHOLD of
free heap top in the process (in each malloc arena: a thread that allocates may have its own); a
larger block still goes back at once. Pillow holds a decoded image in blocks of at most 16 MiB
(Image.core.get_block_size), so a 100-megapixel one lies in the heap, and goes back when freed
because its blocks free more than TRIM_THRESHOLD of heap top (glibc's default thresholds, raised
by the first such block freed, kept it in the heap too). A worker's peak memory is the same (what
it holds at once: measured equal with and without, big JPEGs decoded by 1 and 2 threads).

Hand-written (a call through ctypes): no library sets malloc's parameters; the environment
variables (MALLOC_TRIM_THRESHOLD_) would have to be set before the forkserver starts, and a
variable set in os.environ is seen by every thread and inherited by every process started
meanwhile (runtime/procpool.py). Where there is no glibc mallopt (macOS; musl's is a no-op) it
does nothing.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 16 << 20  # blocks up to this stay in the heap when freed
TRIM_THRESHOLD = 64 << 20  # free heap top kept before it is given back


def keep_freed_memory() -> bool:
    """Set this process's malloc thresholds (see the module's docstring); whether they were set."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to ask, or no mallopt in it
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
