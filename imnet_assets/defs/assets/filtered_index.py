from dagster import AssetExecutionContext, MaterializeResult, TableColumn, TableSchema, asset

from imnet_assets.defs.assets.common import GROUP, logger, table
from imnet_assets.settings import Settings
from imnet_assets.stages.filtered_index import build_filtered_index
from imnet_assets.stages.fingerprints import INDEX_VERSION
from imnet_assets.stages.staged_encodes import StagedCodec

REASONS_SCHEMA = TableSchema(columns=[TableColumn("reason", "string"), TableColumn("images", "int")])
DUPLICATES_SCHEMA = TableSchema(columns=[
    TableColumn("first_key", "string"), TableColumn("copies", "int"), TableColumn("kept", "int"),
    TableColumn("sha256", "string"), TableColumn("keys", "string"),
])


def make(settings: Settings, marker_roots: list[str] | None = None, codecs: tuple[StagedCodec, ...] = ()):
    """`marker_roots`: every release's out root, where shard runs mark changed sources (default: the
    out root); `codecs`: what the scan encodes each kept image for (staged_encodes.staging_plan)."""

    @asset(
        name="filtered_index",
        group_name=GROUP,
        deps=["synset_manifest"],
        code_version=INDEX_VERSION,
        description=(
            "One row per raw member (catalog table `images`): key, synset, tar, data offset and size, "
            "sha256, width/height/format/mode from the image header, and status with reason. Images "
            "under 32 px and undecodable files are excluded with their reason; truncated ones are "
            "kept and marked for repair. One sequential pass per tar, tars in parallel; unchanged "
            "tars are not rescanned. Then, before the plan: raw images identical or near-identical "
            "(64-bit pHash) to an image of IMNET_EVAL_EXCLUDE are excluded ('eval overlap: <file>'), "
            "`duplicate_of` names the first key with the same bytes (view `duplicate_groups`), and "
            "IMNET_DEDUP=exact excludes the later copies."
        ),
    )
    def filtered_index(context: AssetExecutionContext) -> MaterializeResult:
        facts = build_filtered_index(settings, context.run.run_id, logger(context), marker_roots=marker_roots,
                                     codecs=codecs)
        reasons = facts.pop("reasons")
        duplicates = facts.pop("duplicate_groups_top", [])
        return MaterializeResult(
            metadata={
                **{k: v for k, v in facts.items() if v is not None},
                "exclusion_reasons": table([{"reason": r, "images": int(n)} for r, n in reasons], REASONS_SCHEMA),
                "largest_duplicate_groups": table(duplicates, DUPLICATES_SCHEMA),
            }
        )

    return filtered_index
