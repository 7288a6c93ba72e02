"""raw_tars: the inventory of the raw root's synset tars (or folders) into the catalog."""


from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from imnet_assets.release.lease import LeaseHeld, acquire
from imnet_assets.settings import Settings
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.stages.fingerprints import Log, listing_fingerprints
from imnet_assets.storage.catalog import Catalog, check_catalog_volume
from imnet_assets.storage.inventory import WHOLE_RELEASE, RawLayoutError, inventory, list_raw

UNPACK_LEASE = "unpack"  # <raw root>/_locks/unpack/: one unpack of a raw root at a time, whatever its out roots
WAIT_POLL_S = 2.0
WAIT_NOTE_S = 600.0  # while waiting, said again this often


def build_raw_tars(settings: Settings, run_id: str, log: Log = print) -> dict:
    check_catalog_volume(settings.catalog)  # before unpacking a release into a throwaway container
    listing = list_raw(settings.raw_root, unpack=True, log=log,
                       holding=lambda: unpack_lease(settings.raw_root, run_id, log))
    if not listing.tars:
        raise RawLayoutError(listing.no_synsets(settings.raw_root))
    wanted = "<wnid>/ folders" if listing.layout == "folders" else "<wnid>.tar"
    for name in [*listing.ignored, *(f"{f}/" for f in listing.ignored_folders)]:
        log(f"ignoring {name} under the raw root (not {wanted}, words.txt or gloss.txt)")
    with Catalog(settings.catalog) as cat:
        with staged_csv(["tar", "wnid", "size", "mtime"], inventory(listing)) as path, cat.transaction():
            cat.run("raw_tars_stage", {"path": path})
            cat.run("raw_tars_replace")
            cat.set_stage("raw_tars", listing_fingerprints(listing, settings)["raw_tars"], run_id)
        facts = cat.one("raw_tars_summary")
    facts["ignored_files"] = len(listing.ignored)
    facts["layout"] = listing.layout
    facts["fingerprint"] = listing.tars_fingerprint
    return facts


@contextlib.contextmanager
def unpack_lease(raw_root: str, run_id: str, log: Log = print) -> Iterator[None]:
    """The raw root's unpack lease (release/lease.py, under the raw root), waited for while another
    build holds it: builds of other out roots share a raw root, and unpacking it takes hours."""
    noted = None
    while True:
        try:
            lease = acquire(raw_root, UNPACK_LEASE, f"run {run_id[:8]} unpacking {WHOLE_RELEASE}")
            break
        except LeaseHeld as e:
            if noted is None or time.monotonic() - noted >= WAIT_NOTE_S:
                log(f"waiting for the raw root's unpack: {e}")
                noted = time.monotonic()
            time.sleep(WAIT_POLL_S)
    with lease:
        yield
