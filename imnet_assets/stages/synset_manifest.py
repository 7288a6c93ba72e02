"""synset_manifest: every synset's label, lemma and gloss (words.txt / gloss.txt, else the shipped table)."""


from __future__ import annotations

from imnet_assets.settings import Settings
from imnet_assets.stages.csvstage import staged_csv
from imnet_assets.stages.fingerprints import Log, listing_fingerprints
from imnet_assets.stages.synsets import read_text_file
from imnet_assets.storage.catalog import Catalog
from imnet_assets.storage.inventory import list_raw


def build_synset_manifest(settings: Settings, run_id: str, log: Log = print) -> dict:
    listing = list_raw(settings.raw_root)
    words = read_text_file(settings.raw_root, "words.txt", "words.txt" in listing.texts)
    gloss = read_text_file(settings.raw_root, "gloss.txt", "gloss.txt" in listing.texts)
    with Catalog(settings.catalog) as cat, staged_csv(["wnid", "text"], sorted(words.items())) as w, \
            staged_csv(["wnid", "text"], sorted(gloss.items())) as g:
        with cat.transaction():
            cat.run("synsets_stage_text", {"words": w, "gloss": g})
            cat.run("synsets_replace")
            cat.set_stage("synset_manifest", listing_fingerprints(listing, settings)["synset_manifest"], run_id)
        return cat.one("synsets_summary")
