"""What `imnet build` looks at first, in a thread beside Dagster's imports and the instance's set-up
(about 2 s of one core): whether the catalog stages are fresh, and, when they all are, which
shard it will build first, whose first jobs then go to the encoders at once (stages.shard_ahead).
So the cores encode from the build's first second, and the stages' freshness is looked at once
(one listing of the raw root) instead of once per stage.

Plain modules only (no Dagster). The look decides nothing for the build: `Build` says what it
found, takes the lease, asks the instance which shards are in flight elsewhere and runs the shards
as always; a shard run takes over only jobs equal to its own (shard_ahead), and the rest are
cancelled when the build ends.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from imnet_assets.settings import Settings


def process_age() -> float:
    """Seconds since this process started (/proc/self/stat; 0 where there is none)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


class FirstLook(threading.Thread):
    """The catalog stages' staleness (`stale_stages` of the base settings, one listing), then, for
    a build of one `release`, the jobs of the first of its shards `wanted` that is not fresh
    submitted ahead of its run to the encode workers (one or more: IMNET_WORKERS=1 is a pool of
    one), when every stage and its plan are fresh and no other build holds its out root."""

    def __init__(self, settings: Settings, lease_name: str, marker_roots: list[str] | None = None,
                 release: Settings | None = None, wanted: list[str] = ()):
        super().__init__(name="imnet-first-look", daemon=True)
        self.settings, self.lease_name = settings, lease_name
        self.marker_roots = marker_roots  # as Build looks (every release's out root)
        self.release, self.wanted = release, list(wanted)  # the one release built, and its shards wanted
        self.logged: list[str] = []
        self.stale: list[str] | None = None  # None: the look failed (the build looks again and says why)
        self.ahead_key: str | None = None
        self.ahead_images = 0
        self.ahead_at = 0.0  # seconds after the process started
        self.start()

    def run(self) -> None:
        from imnet_assets.stages.fingerprints import stale_stages

        try:
            self.stale = stale_stages(self.settings, log=self.logged.append, marker_roots=self.marker_roots)
        except Exception:  # noqa: BLE001 - the build's own look raises it where it is handled
            return
        if not self.stale:
            try:
                self._encode_ahead()
            except Exception:  # noqa: BLE001 - a head start only: the shard runs do the work regardless
                pass

    def _encode_ahead(self) -> None:
        from imnet_assets.release.freshness import shard_states
        from imnet_assets.release.lease import holder_of
        from imnet_assets.stages import shard_ahead
        from imnet_assets.stages.audit import encode_settings, expected_shard_fingerprints
        from imnet_assets.stages.fingerprints import stale_stages

        s = self.release
        if s is None or not self.wanted or holder_of(s.out_root, self.lease_name) is not None:
            return
        if s != self.settings and "shuffled_plan" in stale_stages(s, log=lambda _m: None,
                                                                  marker_roots=self.marker_roots):
            return  # that release's plan is built first
        states = shard_states(s.out_root, self.wanted, [s.shard_name(k) for k in self.wanted],
                              expected_shard_fingerprints(s))
        first = next((k for k in self.wanted if states[k] != "fresh"), None)
        if first is None:
            return
        ahead = shard_ahead.start(s.out_root, s.raw_root, first, encode_settings(s), s.workers,
                                  s.check_decode_every)
        self.ahead_key, self.ahead_images, self.ahead_at = first, ahead.images, process_age()

    def stale_stages(self, say: Callable[[str], None]) -> list[str] | None:
        """What the look found stale (None: it failed), once it is done, with what it logged."""
        self.join()
        for msg in self.logged:
            say(msg)
        return self.stale
