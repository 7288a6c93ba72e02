"""The package's shape (issue 23): its import graph has no circles (each module imports only modules
that do not import it back, directly or through others, whether at the top or inside a function),
no module imports from a layer above its own, and no module outgrows what one reader holds."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "imnet_assets"


def import_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in found if t in modules and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports_it_should():
    graph = import_graph()
    assert "imnet_assets.storage.fs" in graph["imnet_assets.storage.prefetch"]
    assert "imnet_assets.release.outroot" in graph["imnet_assets.stages.shard"]


def test_the_package_has_no_import_circles():
    assert circles(import_graph()) == []


def test_storage_does_not_import_the_process_pool():
    graph = import_graph()
    assert "imnet_assets.runtime.procpool" not in graph["imnet_assets.storage.fs"]


# Low to high: a module may import its own layer and the ones below it, never one above.
LAYERS = [
    ("settings", "runtime"),  # what every layer reads: the configuration, processes and hosts
    ("storage",),  # files local and on S3, ranged reads, the raw tar walk and listing, the catalog
    ("image",),  # one image: probe, the encode chain, perceptual hash
    ("release",),  # the out root: paths, commit records, plan slices, _info.json, card, checks, leases
    ("sample", "stages"),  # the synthetic raw release; one plain module per stage
    ("defs",),  # the thin Dagster layer
    ("definitions", "orchestrate"),  # the Definitions object; how `imnet build` drives Dagster
    ("cli", "read"),  # the commands; the reader users import
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for number, names in enumerate(LAYERS):
        if top in names:
            return number
    raise AssertionError(f"{module} belongs to no layer: add its folder to LAYERS")


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    graph = import_graph()
    upward = [f"{m} -> {t}" for m in graph if m != "imnet_assets" for t in sorted(graph[m])
              if t != "imnet_assets" and layer_of(t) > layer_of(m)]
    assert upward == []


def test_plain_layers_know_nothing_of_dagster():
    # settings is left out on purpose: it checks a cron string with the schedule's own parser
    plain = {"runtime", "storage", "image", "release", "sample", "stages"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if parts[0].removesuffix(".py") not in plain:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0].startswith("dagster")]
    assert offenders == []


MAX_LINES = 500  # what one reader holds: a module past it has two ideas in it


def test_no_module_is_over_500_lines():
    big = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_the_command_starts_without_dagster():
    """`imnet`'s module imports no Dagster: its forkserver imports the main script's modules for
    every encode worker (runtime/procpool.py), and `imnet build` imports Dagster beside its first
    look, which starts the encoders meanwhile (orchestrate/build.py)."""
    import subprocess
    import sys

    code = "import sys, imnet_assets.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
