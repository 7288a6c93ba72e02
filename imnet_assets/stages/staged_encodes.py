"""Staged encodes (issue 25): the raw release is read once for every release built from it.

The index's pass over a tar holds every member's bytes in hand (for its sha256, probe and pHash).
With more than one release (IMNET_STAGE_ENCODES=auto; `on`: always, `off`: never), that pass also
encodes each kept image once for each codec identity the releases ask for
(image/encode.codec_identity: the codec's settings, the encoder version, Pillow's and the codec
library's versions), and commits the tar's encoded images as one file under the out root of the
first release with that identity, `<out_root>/_staged/<identity>/<tar>.bin`, with one catalog row
per image (`staged_images`: file, offset, size, sha256, sizes, repaired; or the encoder's reason
to refuse it). Releases that share an identity (the full release and a class subset in WebP, say)
share the staged images.

Each release's plan then publishes, beside each shard's slice, where its rows' encoded images are
(`_plan/<shard>.staged.json`, publish_lookups), and the shard run takes an image's stored bytes from
there instead of reading and encoding its source (shard_jobs). The stored bytes are the same
either way: encoding is deterministic under one identity, and the lookup is used only for the
identity the release encodes with now. A staged image is checked by its size and sha256 when it
is read; one that is missing, short, changed or unreadable is not an error of the run: the run
reads and encodes the image's source as before (the staged files are a cache, never an authority).
The shard check is the same on both paths (every sample's hash and header, a decode of every 16th
and of every repaired sample).

Cost (README "Releases"): the staged files hold one release's stored images per identity (about
the size of its shards) until the tar is indexed again; removing `_staged/` only makes shard runs
read their sources again. The encode CPU moves from the shard runs to the index's pass; it is not
spent twice. A release added later with an identity no release had when its tars were indexed
reads its sources (its pixels can come from nowhere else), as one without staging does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

from imnet_assets.image.encode import (
    Encoded,
    EncodeSettings,
    codec_identity,
    encode_or_refusal,
    encode_settings,
)
from imnet_assets.image.guard import MachineryFault
from imnet_assets.release.plan import PLAN_DIR
from imnet_assets.settings import Settings, crash_hook_hits, test_crash_sha256
from imnet_assets.storage import atomic, fs

STAGED_DIR = "_staged"
LOOKUP_SUFFIX = ".staged.json"
LOOKUP_BATCH = 32  # shards per lookup query at plan time (~13k rows each at the real size)
LOOKUP_WRITERS = 32  # lookup files committed at once (each a few requests on S3)
# A lookup holds at most one row per slice row (~200 bytes: numbers, a sha256, a refusal's reason)
# and at most one file URL per row (an S3 key is at most 1,024 bytes): LOOKUP_ROW_MAX_BYTES a row,
# LOOKUP_BASE_BYTES for the rest, is the most one can hold (read_lookup reads no further)
LOOKUP_ROW_MAX_BYTES = 2048
LOOKUP_BASE_BYTES = 64 << 10
STAGED_FIELDS = ["codec", "key", "tar", "source_sha256", "url", "offset", "size", "sha256", "width", "height",
                 "orig_width", "orig_height", "repaired", "reason"]


@dataclass(frozen=True)
class StagedCodec:
    """One codec identity the index encodes for, and the folder its tars' files go to."""

    identity: str
    settings: EncodeSettings
    root: str

    def file_url(self, tar: str) -> str:
        """The file of one tar's encoded images (a synset folder `<wnid>/`: `<wnid>.bin`)."""
        return fs.join(self.root, f"{tar.rstrip('/')}.bin")


def staging_plan(releases: list[Settings]) -> tuple[StagedCodec, ...]:
    """The codec identities the index encodes for: one per distinct identity among `releases`,
    under the first such release's out root. None with IMNET_STAGE_ENCODES=off, or =auto with one
    release (where staging would only move the encoding, and cost the staged files' space)."""
    mode = releases[0].stage_encodes if releases else "off"
    if mode == "off" or (mode == "auto" and len(releases) < 2):
        return ()
    codecs: dict[str, StagedCodec] = {}
    for release in releases:
        enc = encode_settings(release)
        ident = codec_identity(enc)
        if ident not in codecs:
            codecs[ident] = StagedCodec(ident, enc, fs.join(release.out_root, STAGED_DIR, ident))
    return tuple(codecs.values())


class Stager:
    """Encodes one tar's kept members as the index walks it (`add`), writing each codec identity's
    file as it goes (atomic.atomic_open: the file appears at its name only once the walk ended
    well; an error or a kill leaves none). Use it as a context manager; `rows` are then the tar's
    `staged_images` rows. Memory: one encoded image at a time, not the tar's."""

    def __init__(self, codecs: tuple[StagedCodec, ...], tar: str):
        self.codecs = codecs
        self.tar = tar
        self.urls = [codec.file_url(tar) for codec in codecs]
        self.files: list = [None] * len(codecs)
        self.sizes = [0] * len(codecs)
        self.rows: list[tuple] = []
        self.skip = test_crash_sha256()  # the crash test hook's image is left to the shard run's encoder
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Stager:
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)  # commits the files, or (an error) discards them

    def add(self, key: str, source_sha256: str, data) -> None:
        if crash_hook_hits(self.skip, source_sha256):
            return
        data = bytes(data)  # a view into the walked tar: the decoder takes bytes (one copy, not one per codec)
        for i, codec in enumerate(self.codecs):
            try:
                got = encode_or_refusal(data, codec.settings)
            except MemoryError:
                continue  # memory is no property of the image: the shard run encodes it
            except MachineryFault as e:  # the codec fails a known-good image too: the index fails
                raise MachineryFault(f"{e} (met on {key} in {self.tar}, encoding for {codec.identity})") from e
            if isinstance(got, str):
                self.rows.append((codec.identity, key, self.tar, source_sha256, self.urls[i], 0, 0, None, None, None,
                                  None, None, None, got))
                continue
            if self.files[i] is None:
                if fs.is_remote(self.urls[i]):
                    # a killed pass's upload of this file. Local temporaries are swept once per index
                    # run instead (filtered_index): remove_partials lists the whole folder, which holds
                    # a file per tar (19,167 listings of 19,167 names per identity at the real size)
                    atomic.remove_partials(self.urls[i])
                self.files[i] = self._stack.enter_context(atomic.atomic_open(self.urls[i]))
            self.files[i].write(got.webp)
            self.rows.append((codec.identity, key, self.tar, source_sha256, self.urls[i], self.sizes[i],
                              len(got.webp), _sha256(got.webp), got.width, got.height, got.orig_width,
                              got.orig_height, got.repaired, None))
            self.sizes[i] += len(got.webp)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ plan time


def lookup_url(out_root: str, shard_key: str) -> str:
    return fs.join(out_root, PLAN_DIR, f"{shard_key}{LOOKUP_SUFFIX}")


def publish_lookups(cat, settings: Settings, shard_keys: list[str], log=lambda _m: None) -> int:
    """Commit each shard's lookup of staged encodes (its rows' encoded images under the codec
    identity the release encodes with now), and remove the lookups of shards that have none (or
    all, with IMNET_STAGE_ENCODES=off); returns the rows found. Lookups of shards the layout no
    longer has are removed with their slices (shuffled_plan)."""
    ident = codec_identity(encode_settings(settings))
    staged = settings.stage_encodes != "off" and cat.one("staged_count", {"codec": ident})["images"] > 0
    present = {e["name"] for e in fs.listdir(fs.join(settings.out_root, PLAN_DIR)) if e["name"].endswith(LOOKUP_SUFFIX)}
    found = 0
    if staged:
        cat.run("staged_lookup_prepare", {"codec": ident, "release": settings.release})
    with ThreadPoolExecutor(LOOKUP_WRITERS) as writers:
        for i in range(0, len(shard_keys), LOOKUP_BATCH) if staged else ():
            keys = shard_keys[i:i + LOOKUP_BATCH]
            per_shard: dict[str, list[tuple]] = {k: [] for k in keys}
            for row in cat.rows("staged_lookup", {"first": keys[0], "last": keys[-1]}):
                per_shard[row[0]].append(row[1:])
            found += sum(len(rows) for rows in per_shard.values())
            list(writers.map(lambda kv: _commit_lookup(settings.out_root, ident, *kv), per_shard.items()))
        stale = [k for k in shard_keys if f"{k}{LOOKUP_SUFFIX}" in present] if not staged else []
        list(writers.map(lambda k: fs.remove(lookup_url(settings.out_root, k)), stale))
    if found:
        log(f"{found} planned images are staged ({ident}): the shard runs read those, not the raw release")
    return found


def _commit_lookup(out_root: str, ident: str, shard_key: str, rows: list[tuple]) -> None:
    url = lookup_url(out_root, shard_key)
    if not rows:
        fs.remove(url)
        return
    files: dict[str, int] = {}
    packed = [[pos, key, files.setdefault(u, len(files)), off, size, sha, w, h, ow, oh, rep, reason]
              for pos, key, u, off, size, sha, w, h, ow, oh, rep, reason in rows]
    atomic.write_atomic(url, json.dumps({"codec": ident, "files": list(files), "rows": packed},
                                        separators=(",", ":")).encode())


# ------------------------------------------------------------------------------------------ shard time


class StagedRef(NamedTuple):
    """Where a plan row's encoded image is staged (or why the encoder refused it)."""

    url: str
    offset: int
    size: int
    sha256: str | None
    width: int
    height: int
    orig_width: int
    orig_height: int
    repaired: bool
    reason: str | None


def read_lookup(out_root: str, shard_key: str, rows, settings: EncodeSettings,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> tuple | None:
    """Per slice row its StagedRef, or None where it has none; None for a shard without a lookup,
    or one made for another codec identity than `settings` have (the release's codec changed).
    A lookup larger than one for `rows` can be (`lookup_limit`) is read no further and counts as
    absent, with a line to `log` naming it: the run encodes its images from their sources."""
    url, limit = lookup_url(out_root, shard_key), lookup_limit(len(rows))
    try:
        doc = fs.read_json(url, limit=limit, kind="a lookup of staged encodes")  # None: absent (or torn)
    except fs.TooLarge:
        log(fs.redact(f"warning: {url} holds more than {limit:,} bytes, more than the lookup of staged encodes "
                      f"for {len(rows):,} rows can: not used, shard {shard_key}'s images are encoded from their "
                      "sources"))
        return None
    if not isinstance(doc, dict) or doc.get("codec") != codec_identity(settings):
        return None
    files = doc["files"]
    by_position = {r[0]: r for r in doc["rows"]}
    refs = []
    for row in rows:
        r = by_position.get(row.position)
        refs.append(None if r is None or r[1] != row.key
                    else StagedRef(files[r[2]], r[3], r[4], r[5], r[6], r[7], r[8], r[9], bool(r[10]), r[11]))
    return tuple(refs) if any(refs) else None


def lookup_limit(rows: int) -> int:
    """The most bytes a shard's lookup of staged encodes can hold for a slice of `rows` rows."""
    return LOOKUP_BASE_BYTES + LOOKUP_ROW_MAX_BYTES * rows


def read_staged(reader, ref: StagedRef) -> Encoded | None:
    """The staged image as the encoder's result, or None when its bytes cannot be had exactly
    (gone, short, another sha256, a read error after the reader's retries): the caller encodes
    the source instead."""
    try:
        data = reader.read(ref.url, ref.offset, ref.size)
    except Exception:  # noqa: BLE001 - a cache miss, whatever the cause: the source is read instead
        return None
    if len(data) != ref.size or _sha256(data) != ref.sha256:
        return None
    return Encoded(data, ref.width, ref.height, ref.orig_width, ref.orig_height, ref.repaired)
