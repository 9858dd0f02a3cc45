"""The packages' allowed import directions, and no import cycle between modules.

    common          the shared definitions (wire messages, configs, model families, TLS, intensity statistics):
                    imports no other package of ours
    formats         the data layer: every format on disk (site data readers, the prepared cache, data sets, the
                    label-map bank, checkpoints, the published generator, the public start): common only
    site_agent      a hospital's side: common, formats
    central_server  the server: common, formats
    demo_data       the phantom and toy data: common
    segmentation    the downstream models: common, formats
    synthesis       generate / complete: common, formats, segmentation
    simulation      the system in one process: common, formats, central_server, site_agent
    experiments     everything above
    cli             the `asyndgan` command: everything
The command-line modules (`cli`, `*.cli`) sit on top and may import any package. Lazy imports (inside
functions) count as imports."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {
    "common": set(),
    "formats": {"common"},
    "site_agent": {"common", "formats"},
    "central_server": {"common", "formats"},
    "demo_data": {"common"},
    "segmentation": {"common", "formats"},
    "synthesis": {"common", "formats", "segmentation"},
    "simulation": {"common", "formats", "central_server", "site_agent"},
    "experiments": {"common", "formats", "site_agent", "central_server", "demo_data", "segmentation", "synthesis",
                    "simulation"},
    "cli": {"common", "formats", "site_agent", "central_server", "demo_data", "segmentation", "synthesis",
            "simulation", "experiments"},
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for package in ALLOWED:
        for path in (ROOT / package).rglob("*.py"):
            if "_generated" in path.parts or "flower_app" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(("asyndgan",) + (parts[:-1] if parts[-1] == "__init__" else parts))
            out[name] = path
    return out


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a name imported from a package counts as its submodule when
    there is one)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asyndgan"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("asyndgan")]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def test_packages_import_only_in_the_allowed_directions():
    edges = _imports(_modules())
    wrong = sorted(f"{m} -> {t}" for m, targets in edges.items() for t in targets
                   if not m.endswith(".cli") and m.split(".")[1] != t.split(".")[1]
                   and t.split(".")[1] not in ALLOWED[m.split(".")[1]])
    assert wrong == []


def test_no_module_imports_itself_through_others():
    edges = _imports(_modules())
    cycles, index, low, stack, on = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []
