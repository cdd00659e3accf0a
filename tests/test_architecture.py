"""The house's shape: no import cycles, and imports point down the layers only.

    base, naming, redact, destination, quiet        what every layer shares
    config, schema, devices, distributed, data      configs and data
    evaluation                                      metrics, thresholds, reports (no training)
    models                                          detectors, bundles, predictors, export formats
    explain, tracking, reports, monitoring          maps, MLflow, report.html, the prediction log
    pipeline, auto                                  one job each
    api                                             fit, evaluate, Inspector, ...
    train, evaluate, predict, ... (entry points)    parse, print, exit codes
    defect_detection (__init__)                     the package's public face

Imports under `if TYPE_CHECKING:` do not run and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    **dict.fromkeys(("base", "naming", "redact", "destination", "quiet"), 0),
    **dict.fromkeys(("config", "schema", "devices", "distributed", "data"), 1),
    "evaluation": 2,
    **dict.fromkeys(("models", "runtime_speed"), 3),
    **dict.fromkeys(("explain", "tracking", "reports", "monitoring"), 4),
    **dict.fromkeys(("pipeline", "auto"), 5),
    "api": 6,
    **dict.fromkeys(("train", "evaluate", "predict", "export", "compare", "promote", "data_cmd",
                     "explain_cmd", "monitor", "review_cmd", "challenge_cmd"), 7),
    "": 8,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "defect_detection").rglob("*.py"):
        if "conf" in path.relative_to(SRC).parts:
            continue
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at module level or inside functions)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        hidden = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                  and getattr(block.test, "id", "") == "TYPE_CHECKING" for stmt in block.body
                  for node in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            targets = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("defect_detection"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("defect_detection")]
            graph[module] |= {t for t in map(resolve, targets) if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    if room not in LAYERS:
        pytest.fail(f"{module} is in no layer: add '{room}' to tests/test_architecture.py's LAYERS")
    return LAYERS[room]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_point_down_only():
    upward = [f"{m} -> {t}" for m, targets in sorted(import_graph().items()) for t in sorted(targets)
              if layer(t) > layer(m)]
    assert upward == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
