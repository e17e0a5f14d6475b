"""bench/ and methods/ import each other without a circle, in layers (tests/import_graph.py)."""
from tests.import_graph import BENCH_LAYERS, cycles, graph, layer_of


def test_no_import_circle():
    assert cycles(graph()) == []


def test_the_circle_check_finds_a_planted_circle():
    edges = graph()
    edges["bench.data"] = edges["bench.data"] | {"bench.report"}  # data -> report -> metrics -> data
    assert any({"bench.data", "bench.report"} <= set(circle) for circle in cycles(edges))


def test_every_module_sits_in_a_layer_and_imports_only_its_layer_or_below():
    edges = graph()
    placed = set().union(*(members for _, members in BENCH_LAYERS))
    assert {name for name in edges if name.startswith("bench")} == placed
    upward = [(source, target) for source, targets in edges.items() for target in targets
              if layer_of(target) > layer_of(source)]
    assert upward == []


def test_methods_never_import_bench():
    assert [(s, t) for s, ts in graph().items() if s.startswith("methods") for t in ts if t.startswith("bench")] == []
