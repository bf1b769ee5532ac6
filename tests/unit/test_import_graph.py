"""The package import graph of megassm: the layering the architecture promises (docs/architecture.md §1).

Nodes are megassm's subpackages (``models``, ``parallel``, ``train``, ...) and its top-level modules (``cli``,
``sample``, ``plan``, ``runtime``). Imports are read with ``ast`` from every file, without importing anything.

Every import is counted, also those inside functions (a deferred import is still a dependency: it only
hides a cycle from the interpreter, not from a reader):
- the layer rules (``models`` never imports ``parallel`` / ``train``, ``config`` imports no other package, ...);
- the cycle check: no two packages depend on each other, directly or around a circle, by any import. Command
  wiring lives above what it wires (``cli.py`` adds ``convert to-diffusers``; ``evaluate.py`` is ``megassm
  eval``), and a rule that needs a package's knowledge lives in that package (``models/rules.py``; the gate
  ``run_config.py`` passes them to ``config/validate.py``). Imports of optional heavy dependencies (mamba_ssm,
  diffusers, av, deepspeed) may stay inside functions: they are no edges between megassm's packages.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "megassm"
# the graph's nodes: megassm's subpackages and top-level modules
NODES = sorted(p.name.removesuffix(".py") for p in ROOT.iterdir()
               if (p / "__init__.py").is_file() or (p.suffix == ".py" and p.name != "__init__.py"))

# (importer, imported): never, by any import
FORBIDDEN = [
    ("models", "parallel"), ("models", "train"),
    ("parallel", "train"),
    ("checkpoint", "train"),
    ("ops", "models"), ("ops", "parallel"), ("ops", "train"),
    ("diffusion", "models"), ("diffusion", "parallel"), ("diffusion", "train"),
    *[("config", n) for n in NODES if n != "config"],  # the schema and its rules: the bottom layer
]


def _node(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "megassm" or len(parts) == 1:
        return None
    return parts[1]


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported megassm module, line, at module level) for every import in ``path`` (function bodies too)."""
    package = list(path.relative_to(root.parent).parts[:-1])  # megassm/a/b.py and megassm/a/__init__.py: a
    tree = ast.parse(path.read_text(), str(path))
    top = set()
    for node in tree.body:  # module level, and the bodies of module-level if / try (TYPE_CHECKING, guards)
        top.add(id(node))
        for child in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else ():
            top.add(id(child))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            if names[0] == "megassm":  # from megassm import X
                names = [f"megassm.{a.name}" for a in node.names]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names]
    return out


@cache  # parsed once for the tests
def import_graph(root: Path = ROOT) -> tuple[dict, dict]:
    """(every import, module-level imports): {importer node: {imported node: ["file:line", ...]}}."""
    every: dict = defaultdict(lambda: defaultdict(list))
    module_level: dict = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        src = path.relative_to(root).parts[0].removesuffix(".py")
        for module, line, at_top in _imports(path, root):
            dst = _node(module)
            if dst is None or dst == src:
                continue
            where = f"{path.relative_to(root.parent)}:{line}"
            every[src][dst].append(where)
            if at_top:
                module_level[src][dst].append(where)
    return every, module_level


def find_cycle(graph: dict) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(v: str):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, {})):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_layers_never_import_upwards():
    every, _ = import_graph()
    bad = [f"{a} imports {b}: {', '.join(every[a][b][:3])}" for a, b in FORBIDDEN if every[a].get(b)]
    assert not bad, "\n".join(bad)


def _cycle_message(graph: dict, cycle: list[str]) -> str:
    return "import cycle " + " -> ".join(cycle) + "\n" + "\n".join(
        f"  {a} -> {b}: {', '.join(graph[a][b][:3])}" for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycle_between_packages():
    """By any import, function-local ones included (module doc)."""
    every, _ = import_graph()
    cycle = find_cycle(every)
    assert cycle is None, _cycle_message(every, cycle)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """Teeth: the graph reader finds imports of each form, and the search finds a planted cycle."""
    every, module_level = import_graph()
    assert "megassm/train/loop.py" in " ".join(every["train"]["models"])  # from megassm.models import ...
    assert module_level["train"]["parallel"]  # the strategies import parallel/ at module level
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_a_function_local_import_closes_a_cycle(tmp_path):
    """Teeth for function bodies: a package importing another at module level, which imports it back only
    inside a method, is a cycle (the form the config gate, eval <-> train and convert's wiring had)."""
    root = tmp_path / "megassm"
    (root / "low").mkdir(parents=True)
    (root / "high").mkdir()
    (root / "__init__.py").write_text("")
    (root / "low" / "__init__.py").write_text(
        "class Rules:\n    def check(self):\n        if True:\n            from megassm.high.models import spec\n"
        "            return spec\n")
    (root / "high" / "__init__.py").write_text("")
    (root / "high" / "models.py").write_text("from megassm.low import Rules\n\nspec = Rules\n")
    every, module_level = import_graph(root)
    assert "megassm/low/__init__.py:4" in every["low"]["high"] and not module_level["low"]
    assert find_cycle(every) == ["high", "low", "high"]
    assert find_cycle(module_level) is None  # what the module-level graph alone would have missed
