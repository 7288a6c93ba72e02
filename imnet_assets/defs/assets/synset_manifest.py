from dagster import AssetExecutionContext, MaterializeResult, asset

from imnet_assets.defs.assets.common import GROUP, logger
from imnet_assets.settings import Settings
from imnet_assets.stages.synset_manifest import build_synset_manifest


def make(settings: Settings):
    @asset(
        name="synset_manifest",
        group_name=GROUP,
        deps=["raw_tars"],
        code_version="1",
        description=(
            "One row per synset (catalog table `synsets`): wnid, integer label = index in the sorted "
            "wnid list, lemma and gloss from words.txt / gloss.txt when present, image counts."
        ),
    )
    def synset_manifest(context: AssetExecutionContext) -> MaterializeResult:
        facts = build_synset_manifest(settings, context.run.run_id, logger(context))
        return MaterializeResult(metadata={k: v for k, v in facts.items() if v is not None})

    return synset_manifest
