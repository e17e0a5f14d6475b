"""The import graph of bench/ and methods/, read with the standard library's `ast`.

Every `import` counts, at the top of a module or inside a function, so that no circle can hide
behind an import inside a function. `python -m tests.import_graph [PNG]` prints the edges and the
layers, and draws the picture (default docs/import-graph.png).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("methods", "bench")
# bench/ from bottom to top: a module imports only from its own layer or below (DESIGN.md §11).
BENCH_LAYERS = [
    ("errors, devices, tiny models", {"bench", "bench.errors", "bench.device", "bench.tiny"}),
    ("data", {"bench.data", "bench.drafts"}),
    ("models", {"bench.models"}),
    ("around one model", {"bench.specs", "bench.lossless", "bench.selftest", "bench.profile", "bench.distill",
                          "bench.training"}),
    ("runner", {"bench.runner"}),
    ("launcher", {"bench.launch"}),
    ("metrics", {"bench.metrics"}),
    ("report", {"bench.report"}),
    ("commands", {"bench.compare", "bench.gpu_check"}),
    ("CLI", {"bench.__main__"}),
]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a package's submodule when `from pkg import submodule`)."""
    package = path.parent.name
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = package + ("." + base if base else "")
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, set(known)) - {name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary circle found by a depth-first search (empty when the graph has none)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def layer_of(name: str) -> int:
    if name.startswith("methods"):
        return -1  # below every bench module
    return next(i for i, (_, members) in enumerate(BENCH_LAYERS) if name in members)


def draw(edges: dict[str, set[str]], png: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows: dict[int, list[str]] = {}
    method_modules = sorted(n for n in edges if n.startswith("methods"))
    for name in sorted(edges):
        if name.startswith("bench"):
            rows.setdefault(layer_of(name), []).append(name)
    position = {}
    for layer, names in rows.items():
        for i, name in enumerate(names):
            position[name] = (i - (len(names) - 1) / 2, layer + 2)
    base = ["methods", "methods.runtime", "methods.products", "methods.cache", "methods.kernels"]
    lower = [n for n in method_modules if n in base]
    upper = [n for n in method_modules if n not in base]
    for row, names in ((0, lower), (1, upper)):
        for i, name in enumerate(names):
            position[name] = (i - (len(names) - 1) / 2, row - 0.6)
    figure, axes = plt.subplots(figsize=(14, 11))
    for source, targets in edges.items():
        for target in targets:
            (x0, y0), (x1, y1) = position[source], position[target]
            axes.annotate("", xy=(x1, y1), xytext=(x0, y0),
                          arrowprops=dict(arrowstyle="->", color="0.6", lw=0.6, shrinkA=9, shrinkB=9))
    for name, (x, y) in position.items():
        color = "#dbe9f6" if name.startswith("methods") else "#fde2c4"
        axes.text(x, y, name.split(".", 1)[-1] if "." in name else name + "/", ha="center", va="center",
                  fontsize=8, bbox=dict(boxstyle="round", facecolor=color, edgecolor="0.4"))
    for layer, (title, _) in enumerate(BENCH_LAYERS):
        axes.text(-5.6, layer + 2, title, ha="left", va="center", fontsize=8, color="0.3")
    axes.text(-5.6, 0.0, "methods/ (no bench import)", ha="left", va="center", fontsize=8, color="0.3")
    axes.set_xlim(-5.8, 5.2)
    axes.set_ylim(-1.3, len(BENCH_LAYERS) + 2.6)
    axes.axis("off")
    count = sum(map(len, edges.values()))
    axes.set_title(f"Imports of bench/ and methods/ ({len(edges)} modules, {count} edges, "
                   f"{len(cycles(edges))} circles); arrows point at the imported module", fontsize=10)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return png


if __name__ == "__main__":
    edges = graph()
    for source in sorted(edges):
        print(f"{source:22} -> {', '.join(sorted(edges[source])) or '-'}")
    print(f"circles: {cycles(edges) or 'none'}")
    print(draw(edges, Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "import-graph.png"))
