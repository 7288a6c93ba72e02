"""`imnet`: sample-raw, build, demo, status, lineage, verify (SPEC: Command line)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import sys
import time

from .core.fs import StorageError
from .settings import Settings, SettingsError, shard_key

DEMO_SHARDS = 8


_SHARD_NUMBER = re.compile(r"[0-9]{1,4}")  # ASCII digits only (int() also takes "+3", "0_1", "٣")


def parse_shards(spec: str | None, keys: list[str]) -> list[str]:
    """`0000-0015,0042` -> those partition keys (all when spec is empty or 'all'; none for 'none')."""
    if not spec or spec == "all":
        return list(keys)
    if spec == "none":
        return []
    known = set(keys)
    chosen: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, sep, hi = (p.strip() for p in part.partition("-"))
        if not _SHARD_NUMBER.fullmatch(lo) or (sep and not _SHARD_NUMBER.fullmatch(hi)):
            raise SettingsError(f"--shards: {part!r} is not a shard number or range like 0000-0015")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise SettingsError(f"--shards: {part!r} is a backwards range (write the lower shard first)")
        for i in range(a, b + 1):
            k = shard_key(i)
            if k not in known:
                raise SettingsError(f"--shards: shard {k} does not exist (IMNET_NUM_SHARDS={len(keys)})")
            if k not in chosen:
                chosen.append(k)
    if not chosen:
        raise SettingsError(f"--shards: {spec!r} selects no shard")
    return chosen


class Build:
    """Materializes stages through Dagster, in this process, recording into the instance."""

    def __init__(self, settings: Settings, out=sys.stdout, verbose: bool = False):
        from dagster import DagsterInstance

        from .definitions import build_definitions

        self.settings = settings
        self.defs = build_definitions(settings)
        self.assets = list(self.defs.assets)
        self.instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()
        self.out = out
        # Dagster's console logger prints each failed step's whole stack trace; this command names
        # the failure itself (`fail`), so by default only -v shows them (the instance keeps them all)
        self.log_level = "WARNING" if verbose else "CRITICAL"

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    def materialize(self, selection: list[str], partition_key: str | None = None):
        from dagster import materialize

        from .schedules import HOST_TAG

        result = materialize(
            self.assets, selection=selection, partition_key=partition_key, instance=self.instance,
            raise_on_error=False, tags={"imnet/launched_by": "imnet build", HOST_TAG: socket.gethostname()},
            run_config={"loggers": {"console": {"config": {"log_level": self.log_level}}}},
        )
        failures = []
        for ev in result.get_step_failure_events():
            err = ev.step_failure_data.error
            if err is not None and err.cls_name == "DagsterExecutionInterruptedError":
                raise KeyboardInterrupt  # Ctrl-C inside the run: say so, not "FAILED" (main)
            while err is not None and err.cause is not None:
                err = err.cause  # the user code's own error, not Dagster's wrapper
            failures.append(f"{ev.step_key} failed: {err.message.strip() if err else 'unknown error'}")
        for ev in result.get_asset_check_evaluations():
            if not ev.passed:
                failures.append(f"check {ev.asset_key.to_user_string()}:{ev.check_name} failed: {ev.description}")
        if not result.success and not failures:
            failures.append(f"run {result.run_id} failed")
        return result, failures

    def run(self, shards_spec: str | None) -> int:
        from .core.audit import audit_fingerprint
        from .core.stages import stale_stages
        from .schedules import fail_dead_runs, shard_partition_status

        s = self.settings
        self.say(f"imnet build: raw {s.raw_root} -> out {s.out_root}, catalog {s.catalog}, "
                 f"{s.num_shards} shards, {s.workers} workers, instance "
                 f"{os.environ.get('DAGSTER_HOME') or '(ephemeral)'}")
        wanted = parse_shards(shards_spec, s.partition_keys)
        for stage in ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan"]:
            if stage not in stale_stages(s, log=self.say):
                self.say(f"  {stage:16s} fresh, skipped")
                continue
            t0 = time.perf_counter()
            result, failures = self.materialize([stage])
            if failures:
                return self.fail(stage, failures)
            self.say(f"  {stage:16s} materialized in {time.perf_counter() - t0:.1f}s  {self._facts(result, stage)}")
        if self.instance is not None:
            fail_dead_runs(self.instance, log=lambda m: self.say(f"  wds_shards: {m}"))
        status = shard_partition_status(s, self.instance)
        todo = [k for k in wanted if status[k] != "fresh"]
        busy = [k for k in todo if status[k] == "in_flight"]
        todo = [k for k in todo if k not in busy]
        if busy:
            self.say(f"  wds_shards: {len(busy)} shards have a run in flight elsewhere, left to it: {busy[:8]}")
        self.say(f"  wds_shards: {len(wanted) - len(todo) - len(busy)} of {len(wanted)} selected shards fresh, "
                 f"{len(todo)} to build")
        started, images = time.perf_counter(), 0
        for i, key in enumerate(todo, 1):
            result, failures = self.materialize(["wds_shards"], partition_key=key)
            if failures:
                return self.fail(f"wds_shards[{key}]", failures)
            md = self._metadata(result, "wds_shards")
            images += int(md.get("samples", 0))
            elapsed = time.perf_counter() - started
            eta = elapsed / i * (len(todo) - i)
            self.say(f"  [{i}/{len(todo)}] shard {key}: {md.get('samples')} samples "
                     f"({md.get('excluded')} excluded, {md.get('repaired')} repaired), "
                     f"{md.get('images_per_s')} img/s; overall {images / elapsed:.1f} img/s, eta {eta:.0f}s")
        if not wanted:
            self.say("  shards and audit: skipped (--shards none: the catalog stages and the plan only)")
            return 0
        if set(wanted) != set(s.partition_keys):
            self.say("  shard_audit: skipped (only some shards were selected; run `imnet build` for all)")
            return 0
        fp = audit_fingerprint(s)
        if not todo and fp is not None and self._stage_fp("shard_audit") == fp:
            self.say("  shard_audit      fresh, skipped")
        else:
            result, failures = self.materialize(["shard_audit"])
            if failures:
                return self.fail("shard_audit", failures)
            md = self._metadata(result, "shard_audit")
            self.say(f"  shard_audit      ok: {md.get('samples')} samples in {md.get('shards')} shards, "
                     f"{md.get('excluded')} excluded, {md.get('repaired')} repaired")
        self.say(f"shards: {s.out_root}  (_info.json beside them); catalog: {s.catalog}")
        return 0

    def _stage_fp(self, stage: str) -> str | None:
        from .catalog import Catalog

        if not os.path.exists(self.settings.catalog):
            return None
        with Catalog(self.settings.catalog, read_only=True) as cat:
            return cat.stage_fingerprint(stage)

    def _metadata(self, result, asset: str) -> dict:
        for ev in result.get_asset_materialization_events():
            mat = ev.event_specific_data.materialization
            if mat.asset_key.to_user_string() == asset:
                return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
        return {}

    def _facts(self, result, asset: str) -> str:
        md = self._metadata(result, asset)
        shown = {k: v for k, v in md.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return ", ".join(f"{k}={v}" for k, v in list(shown.items())[:6])

    def fail(self, stage: str, failures: list[str]) -> int:
        from .core.fs import redact

        self.say(f"imnet build: {stage} FAILED")
        for f in failures:
            self.say("  " + redact(f))
        if self.log_level == "CRITICAL":
            self.say("  (the full error with its stack trace: run again with -v, or see the run in the Dagster UI"
                     " when DAGSTER_HOME is set)")
        return 1


def cmd_sample_raw(args) -> int:
    from .core.sample_raw import write_sample_raw

    summary = write_sample_raw(args.dir, synsets=args.synsets, images=args.images, seed=args.seed)
    print(f"wrote {len(summary.wnids)} synset tars with {summary.total_members} files to {args.dir}")
    print("quirks: " + ", ".join(f"{k} ({len(v)})" for k, v in sorted(summary.quirks.items())))
    return 0


def cmd_build(args) -> int:
    return Build(Settings.from_env(), verbose=args.verbose).run(args.shards)


def cmd_demo(args) -> int:
    from .core import fs
    from .core.sample_raw import write_sample_raw

    chosen = not os.environ.get("IMNET_NUM_SHARDS")
    if chosen:
        os.environ["IMNET_NUM_SHARDS"] = str(DEMO_SHARDS)
        print(f"imnet demo: IMNET_NUM_SHARDS not set, using {DEMO_SHARDS} shards for the sample release")
    s = Settings.from_env()
    if not any(e["name"].endswith(".tar") for e in fs.listdir(s.raw_root)):
        summary = write_sample_raw(s.raw_root, synsets=args.synsets, images=args.images, seed=0)
        print(f"imnet demo: wrote a sample raw release ({len(summary.wnids)} synsets, "
              f"{summary.total_members} files with ImageNet's quirks) to {s.raw_root}")
    code = Build(s, verbose=args.verbose).run(None)
    if code == 0:
        # the other commands read the layout from the environment too: name it when the demo chose it
        env = f"IMNET_NUM_SHARDS={s.num_shards} " if chosen else ""
        print(f"demo done: shards and _info.json in {s.out_root}; try `imnet lineage <key>`, `imnet verify`,")
        print(f"`{env}imnet status`, or `{env}dagster dev -w workspace.yaml` to see the assets (with "
              "DAGSTER_HOME set to keep history).")
    return code


def cmd_status(args) -> int:
    from collections import Counter

    from dagster import DagsterInstance

    from .core.audit import plan_mismatch
    from .core.plan import read_index
    from .core.stages import stale_stages
    from .schedules import shard_partition_status

    s = Settings.from_env()
    if why := plan_mismatch(s, read_index(s.out_root)):
        print(f"note: {why}")
    if os.path.exists(s.catalog):
        stale = stale_stages(s, log=lambda _m: None)
        for stage in ["raw_tars", "synset_manifest", "filtered_index", "shuffled_plan"]:
            print(f"{stage:16s} {'stale' if stage in stale else 'fresh'}")
    else:
        print(f"catalog stages   unknown here: no catalog at {s.catalog} (IMNET_CATALOG; it lives on the "
              "machine that builds the stages and runs the audit)")
    inst = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else None
    status = shard_partition_status(s, inst)
    counts = Counter(status.values())
    print("wds_shards       " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    not_fresh = [k for k, v in status.items() if v != "fresh"]
    if not_fresh:
        print("  not fresh: " + ", ".join(not_fresh[:32]) + (" ..." if len(not_fresh) > 32 else ""))
    return 0


def cmd_lineage(args) -> int:
    from .catalog import Catalog
    from .core import fs

    s = Settings.from_env()
    with Catalog(s.catalog, read_only=True) as cat:
        rows = cat.dicts("lineage", {"key": args.key})
    if not rows:
        print(f"no image with key {args.key!r} in {s.catalog}", file=sys.stderr)
        return 1
    for r in rows:
        print(f"key          {r['key']}  ({r['wnid']})")
        print(f"source       {fs.join(s.raw_root, r['tar'])} member {r['member'] or '(none: tar damage)'}")
        print(f"             offset {r['offset']}  size {r['size']}  sha256 {r['sha256'] or '(unreadable)'}")
        print(f"status       {r['status']}" + (f"  ({r['reason']})" if r["reason"] else ""))
        if r["shard"] is not None:
            where = fs.join(s.out_root, r["path"] or s.shard_name(r["shard"]))
            if r["position"] is None:  # planned there; not written (yet, or refused by the encoder)
                print(f"shard        {r['shard']}  plan position {r['plan_position']}  file {where}")
            else:
                moved = f" (plan position {r['plan_position']})" if r["position"] != r["plan_position"] else ""
                print(f"shard        {r['shard']}  position {r['position']}{moved}  file {where}")
            if not r["run_id"]:
                print("written by   (not written yet: run `imnet build`)")
            elif r["webp_sha256"] is None:
                print(f"written by   run {r['run_id']}  code version {r['code_version']}  at {r['written_at']}"
                      "  (this image is not in the shard: excluded when encoding)")
            else:
                print(f"written by   run {r['run_id']}  code version {r['code_version']}  at {r['written_at']}")
                print(f"webp sha256  {r['webp_sha256']}  repaired {r['repaired']}")
        print()
    return 0


VERIFY_SHOWN = 20  # problems printed per shard; the rest are counted


def _verify_shard(url: str, shard: dict, want: list[dict], decode: bool) -> list[str]:
    """Problems of one shard file against its catalog rows (empty when it matches exactly)."""
    import io
    import json

    from PIL import Image

    from .core import fs
    from .core.rawtar import Damage, iter_tar

    # Group consecutive members into samples the way webdataset does (key = name up to the first
    # dot); the tar's sha256 comes from the same read.
    samples: list[tuple[str, list[tuple[str, bytes]]]] = []
    damage: list[str] = []
    digests: list[str] = []
    for item in iter_tar(url, what="shard", digest=digests):
        if isinstance(item, Damage):
            after = f" (after sample {samples[-1][0]})" if samples else " (before the first sample)"
            damage.append(f"tar structure damaged at byte {item.offset}{after}: {item.reason}")
            continue
        key, _, ext = item.name.partition(".")
        if not samples or samples[-1][0] != key:
            samples.append((key, []))
        samples[-1][1].append((ext, item.data))

    problems: list[str] = []
    size = fs.size(url)
    if size != shard["bytes"]:
        problems.append(f"{size} bytes, catalog says {shard['bytes']}")
    if digests[0] != shard["sha256"]:
        problems.append(f"tar sha256 {digests[0][:16]} != catalog {shard['sha256'][:16]}")
    tar_differs = bool(problems)
    problems += damage

    by_key = {w["key"]: w for w in want}
    for key, parts in samples:
        exp = by_key.get(key)
        if exp is None:
            problems.append(f"sample {key}: in the tar but not in the catalog for this shard")
            continue
        exts = [e for e, _ in parts]
        if exts != ["cls", "json", "webp"]:
            problems.append(f"sample {key}: members {exts}, expected ['cls', 'json', 'webp']")
        payload = dict(parts)
        webp = payload.get("webp", b"")
        if len(webp) != exp["webp_bytes"] or hashlib.sha256(webp).hexdigest() != exp["webp_sha256"]:
            problems.append(f"sample {key}: webp payload sha256 differs from the catalog")
        elif decode:
            try:
                with Image.open(io.BytesIO(webp)) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001
                problems.append(f"sample {key}: webp does not decode ({e})")
        if payload.get("cls") != str(exp["label"]).encode("ascii"):
            problems.append(f"sample {key}: .cls {payload.get('cls')!r} != label {exp['label']}")
        try:
            meta = json.loads(payload.get("json", b""))
        except ValueError as e:
            problems.append(f"sample {key}: .json does not parse ({e})")
            continue
        fields = {
            "filename": f"{exp['wnid']}/{key}.JPEG", "label": exp["label"], "class_name": exp["wnid"],
            "width": exp["width"], "height": exp["height"],
            "orig_width": exp["orig_width"], "orig_height": exp["orig_height"],
        }
        if "source_sha256" in meta:
            fields["source_sha256"] = exp["source_sha256"]
        wrong = sorted(k for k, v in fields.items() if not isinstance(meta, dict) or meta.get(k) != v)
        if wrong:
            problems.append(f"sample {key}: .json fields {wrong} differ from the catalog")

    got = [k for k, _ in samples]
    expected = [w["key"] for w in want]
    if got != expected:
        missing = [k for k in expected if k not in set(got)]
        dups = sorted({k for k in got if got.count(k) > 1})
        detail = f"{len(got)} samples, catalog says {len(expected)}"
        if missing:
            detail += f"; missing {missing[:5]}" + (" ..." if len(missing) > 5 else "")
        if dups:
            detail += f"; duplicated {dups[:5]}"
        if not missing and not dups and sorted(got) == sorted(expected):
            detail += "; samples out of catalog order"
        problems.append(detail)
    if tar_differs and len(problems) == 1 + (size != shard["bytes"]):
        problems.append("every sample's payload matches: the difference is in tar headers or padding")
    return problems


def _verify_info(s: Settings, shards: list[dict]) -> list[str]:
    """`_info.json` is exactly the document the catalog's shards give: the same shards, in order,
    in the same splits, with their sample counts and totals."""
    import json

    from .core import fs
    from .core.audit import info_differences, info_document

    url = fs.join(s.out_root, "_info.json")
    if not fs.exists(url):
        return [f"{url} is missing"]
    try:
        doc = json.loads(fs.read_bytes(url))
    except ValueError as e:
        return [f"{url} is not JSON ({e})"]
    lengths = {sh["shard"]: sh["num_samples"] for sh in shards}
    if sorted(lengths) != s.partition_keys:
        return [f"the catalog records {len(lengths)} shards, the plan under {s.out_root} has "
                f"{s.num_shards}: run `imnet build`"]
    return info_differences(doc, info_document(s, lengths))


def _as_built(s: Settings) -> Settings:
    """`s` with the shard layout the out root was built with (its plan index: shard count and
    holdout), which `imnet demo` chooses itself when IMNET_NUM_SHARDS is not set."""
    import dataclasses

    from .core.plan import read_index

    index = read_index(s.out_root)
    if index is None:
        return s
    return dataclasses.replace(s, num_shards=index["num_shards"],
                               holdout=tuple((name, n) for name, n in index["holdout"]))


def cmd_verify(args) -> int:
    from .catalog import Catalog
    from .core import fs
    from .core.audit import stray_problem, stray_shards

    s = _as_built(Settings.from_env())
    with Catalog(s.catalog, read_only=True) as cat:
        shards = cat.dicts("verify_shards")
        expected = {sh["shard"]: cat.dicts("verify_samples", {"shard": sh["shard"]}) for sh in shards}
    if not shards:
        print(f"no shards recorded in {s.catalog}: run `imnet build` first", file=sys.stderr)
        return 1
    bad = 0
    for sh in shards:
        url = fs.join(s.out_root, sh["path"])
        label = f"shard {sh['shard']} ({sh['path']})"
        if not fs.exists(url):
            print(f"FAIL {label}: missing from {s.out_root}")
            bad += 1
            continue
        try:
            problems = _verify_shard(url, sh, expected[sh["shard"]], args.decode)
        except Exception as e:  # noqa: BLE001 - an unreadable shard is a failure, not a crash
            problems = [f"unreadable: {type(e).__name__}: {fs.redact(str(e))}"]
        for p in problems[:VERIFY_SHOWN]:
            print(f"FAIL {label}: {p}")
        if len(problems) > VERIFY_SHOWN:
            print(f"FAIL {label}: ... and {len(problems) - VERIFY_SHOWN} more problems")
        bad += bool(problems)
        if not problems and args.verbose:
            print(f"ok   {label}: {len(expected[sh['shard']])} samples")
    info_problems = _verify_info(s, shards)
    for p in info_problems:
        print(f"FAIL _info.json: {p}")
    stray = stray_shards(s)
    if stray:
        print(f"FAIL {stray_problem(stray)}")
    print(f"verify: {len(shards) - bad} of {len(shards)} shards ok" + (f", {bad} FAILED" if bad else "")
          + (", _info.json FAILED" if info_problems else "")
          + (f", {len(stray)} stray shard files" if stray else ""))
    return 1 if bad or info_problems or stray else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="imnet", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("sample-raw", help="write a small synthetic raw release with ImageNet's quirks")
    sp.add_argument("dir")
    sp.add_argument("--synsets", type=int, default=6)
    sp.add_argument("--images", type=int, default=40)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_sample_raw)
    sp = sub.add_parser("build", help="materialize every stage through Dagster, then shards, then the audit")
    sp.add_argument("--shards", help="shard partitions to build, e.g. 0000-0015,0042 (default all; 'none' "
                    "builds only the catalog stages and the plan)")
    sp.add_argument("-v", "--verbose", action="store_true", help="also print Dagster's warnings and errors "
                    "(with stack traces)")
    sp.set_defaults(func=cmd_build)
    sp = sub.add_parser("demo", help="sample-raw into the raw root when empty, then build")
    sp.add_argument("--synsets", type=int, default=6)
    sp.add_argument("--images", type=int, default=40)
    sp.add_argument("-v", "--verbose", action="store_true", help="as for build")
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser("status", help="which stages and shard partitions are fresh")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("lineage", help="where a sample came from and where it went")
    sp.add_argument("key")
    sp.set_defaults(func=cmd_lineage)
    sp = sub.add_parser("verify", help="re-read every shard and check it against the catalog")
    sp.add_argument("--decode", action="store_true", help="also decode every WebP")
    sp.add_argument("-v", "--verbose", action="store_true")
    sp.set_defaults(func=cmd_verify)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except SettingsError as e:
        print(f"imnet: configuration error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except StorageError as e:
        print(f"imnet: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `imnet status | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("imnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
