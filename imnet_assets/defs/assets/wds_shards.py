import os

from dagster import (
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from imnet_assets.defs.assets.common import human_bytes, logger, reason_counts
from imnet_assets.defs.checks import SHARD_COMPLETE, result, wds_shards_checks
from imnet_assets.defs.release_keys import RELEASE_TAG, asset_key, group, key_prefix
from imnet_assets.defs.schedules import HOST_TAG, worker_place
from imnet_assets.release.lease import RUN_PREFIX, LeaseHeld, acquire_waiting, shard_lease_name, writes_shard
from imnet_assets.settings import Settings
from imnet_assets.stages import shard_ahead
from imnet_assets.stages.audit import encode_settings, require_current_plan
from imnet_assets.stages.shard import build_shard, code_version

SHARD_POOL = "imnet_shards"
NO_RETRY_TAG = "dagster/retry_on_asset_or_op_failure"  # "false": run_retries (dagster.yaml) leave the run alone


class ShardBusy(RuntimeError):
    """Another holder has this shard partition's lease: a run building the shard now, or something
    else that holds it for a moment (`imnet verify` removing the commit record of a shard it failed,
    the audit forgetting one whose manifest is damaged: a run waits that out, up to lease.MOMENT_SECONDS,
    before it gives up); the message names which (its `what`)."""


def busy_message(key: str, e: LeaseHeld) -> str:
    """Why a run of shard `key` wrote nothing: who holds its lease, as the holder names itself."""
    what = str(e.holder.get("what", "")) if isinstance(e.holder, dict) else ""
    if what.startswith(RUN_PREFIX):
        return f"shard {key} is being built by another run: {e}; this run wrote nothing"
    if e.holder.get("damaged"):  # no one known: what it says is in `e`
        return f"shard {key} is busy: {e}; this run wrote nothing"
    return (f"shard {key} is held by another holder, not a run building it: {e}; this run wrote nothing "
            "(run the partition again once it lets go)")


def make(settings: Settings):
    enc = encode_settings(settings)
    partitions = StaticPartitionsDefinition(settings.partition_keys)

    @asset(
        name="wds_shards",
        key_prefix=key_prefix(settings),
        group_name=group(settings),
        deps=[asset_key(settings, "shuffled_plan")],
        partitions_def=partitions,
        code_version=code_version(enc),
        check_specs=wds_shards_checks(partitions, asset_key(settings, "wds_shards")),
        pool=SHARD_POOL,
        description=(
            "One WebDataset tar per partition (IMNET_SHARD_PATTERN under IMNET_OUT_ROOT). Reads the "
            "partition's plan slice, range-reads each source straight from its raw tar, encodes "
            f"{enc.codec_name} (short side capped at {enc.max_short}, colour-space EXIF and RGB ICC kept, everything else "
            "stripped, truncated images repaired) in IMNET_WORKERS processes, and commits the tar "
            "and its manifest atomically. Never writes the catalog."
        ),
    )
    def wds_shards(context: AssetExecutionContext) -> MaterializeResult:
        key = context.partition_key
        name = settings.shard_name(key)
        if context.run.tags.get(HOST_TAG) is None:  # lets a rerun see this run's worker die (schedules)
            context.instance.add_run_tags(context.run.run_id, worker_place())
        if settings.release and context.run.tags.get(RELEASE_TAG) is None:  # whose partition "0000" it is
            context.instance.add_run_tags(context.run.run_id, {RELEASE_TAG: settings.release})
        # One run of a partition at a time, however each was launched (CLI, UI, schedule, sensor,
        # a retry): the lease is taken before anything is written, and a second run fails at once
        # naming the holder, without a retry (the run holding it builds the shard). A holder that
        # writes no shard (`imnet verify`, the audit: removing its commit record, for a moment) is
        # waited out, up to lease.MOMENT_SECONDS; one holding it longer fails the run naming it.
        try:
            lease = acquire_waiting(settings.out_root, shard_lease_name(key), f"{RUN_PREFIX}{context.run.run_id}",
                                    waits_for=lambda holder: not writes_shard(holder), waiting=context.log.info)
        except LeaseHeld as e:
            context.instance.add_run_tags(context.run.run_id, {NO_RETRY_TAG: "false"})
            raise ShardBusy(busy_message(key, e)) from None
        with lease:
            index = require_current_plan(settings)  # a clear error, not a shard cut from another layout's plan
            res = build_shard(
                out_root=settings.out_root, raw_root=settings.raw_root, shard_key=key, shard_name=name,
                settings=enc, workers=settings.workers, run_id=context.run.run_id, log=logger(context),
                decode_every=settings.check_decode_every,
                ahead=shard_ahead.take(settings.out_root, key),  # `imnet build`'s first jobs, if any
                plan_index=index,  # its slice's digest checked against it, not read again
            )
        # The check ran inside build_shard, against the committed tar, before the commit record
        # (what freshness reads) was written: a failed check leaves the shard not fresh.
        problems = res.problems
        reasons: dict[str, int] = {}
        for e in res.excluded:
            reasons[e["reason"].split(":")[0]] = reasons.get(e["reason"].split(":")[0], 0) + 1
        # Dagster keeps this metadata per partition: the partition's page in the UI shows its own
        # shard's (the asset's overview shows the latest partition's). Readable first: sizes
        # humanized next to the exact count, exclusion reasons as text only when there are any.
        metadata = {
            "shard": MetadataValue.text(f"{key} ({name})"),
            "path": MetadataValue.path(res.path),
            "samples": MetadataValue.int(res.num_samples),
            "planned": MetadataValue.int(res.planned),
            "size": MetadataValue.text(human_bytes(res.bytes)),
            "bytes": MetadataValue.int(res.bytes),
            "seconds": MetadataValue.float(round(res.seconds, 3)),
            "check_seconds": MetadataValue.float(round(res.check_seconds, 3)),
            "images_per_s": MetadataValue.float(round(res.images_per_second, 2)),
            "repaired": MetadataValue.int(res.repaired),
            **({"staged": MetadataValue.int(res.staged)} if res.staged else {}),  # from the index's staged encodes
            "excluded": MetadataValue.int(len(res.excluded)),
            **({"excluded_reasons": MetadataValue.text(reason_counts(reasons))} if reasons else {}),
            "sha256": MetadataValue.text(res.sha256),
            "workers": MetadataValue.int(settings.workers),
            "pid": MetadataValue.int(os.getpid()),
        }
        return MaterializeResult(
            metadata=metadata,
            data_version=DataVersion(res.fingerprint[:16]),
            # The check is partitioned like the asset: its result carries this partition's key
            # (and, for readers of the metadata alone, names the shard).
            check_results=[result(SHARD_COMPLETE, asset_key(settings, "wds_shards"), problems, shard=key, samples=res.num_samples,
                                  decoded_every=settings.check_decode_every)],
        )

    return wds_shards, partitions
