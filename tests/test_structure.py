"""The package's shape, read from its source with ``ast`` (no model, nothing imported but policyopt's root).

* No import cycle between the package's parts (its top-level folders and modules: algorithms, data,
  models, rewards, rollout, runtime, recipes, evaluation, cli), counting imports inside functions too.
* algorithms/ is pure math: it imports torch and the standard library, nothing else of policyopt.
* Recipes stay readable: no function over 80 lines, grpo.py and ppo.py at most 300 lines each.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import policyopt

PACKAGE = Path(policyopt.__file__).resolve().parent
ROOT = PACKAGE.name  # "policyopt"
MAX_FUNCTION_LINES = 80
MAX_RECIPE_LINES = {"grpo.py": 300, "ppo.py": 300}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> list[str]:
    """policyopt/data/preferences.py -> [policyopt, data, preferences]; a package's __init__ -> the package."""
    parts = [ROOT, *path.relative_to(PACKAGE).with_suffix("").parts]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything ``path`` imports, anywhere in the file.

    ``from X import a, b`` yields X.a and X.b (a and b may be modules or names in X; the part they
    belong to is the same either way, except for ``from policyopt import data``). Relative imports are
    resolved against the file's package.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path)[:-1]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                assert len(base) == len(package) - (node.level - 1), f"{path}:{node.lineno}: import above the package"
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names += [(node.lineno, f"{module}.{alias.name}" if alias.name != "*" else module) for alias in node.names]
    return names


def _part(dotted: str) -> str | None:
    """The package part a dotted name belongs to (policyopt.data.x -> data); None outside policyopt or at its root."""
    pieces = dotted.split(".")
    if pieces[0] != ROOT or len(pieces) < 2:
        return None
    part = pieces[1]
    return part if (PACKAGE / part).is_dir() or (PACKAGE / f"{part}.py").is_file() else None


def _part_graph() -> dict[str, dict[str, list[str]]]:
    """part -> imported part -> ["file:line", ...] where the import is."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in _modules():
        source = _part(".".join(_dotted(path)))
        if source is None:
            continue  # policyopt/__init__.py: the root, not a part
        for line, name in _imported(path):
            target = _part(name)
            if target is not None and target != source:
                graph[source][target].append(f"{path.relative_to(PACKAGE.parent)}:{line}")
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """One cycle (a closed path of parts) for every back edge a depth-first search meets."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_import_walk_sees_relative_and_in_function_imports_and_finds_cycles():
    # the checks below rely on these: relative imports resolved, imports inside functions read
    names = {name for _, name in _imported(PACKAGE / "models" / "reward_model.py")}
    assert f"{ROOT}.algorithms.last_token_index" in names
    assert _part(f"{ROOT}.algorithms.last_token_index") == "algorithms" and _part("torch.nn") is None
    inline = [n for n in ast.walk(ast.parse((PACKAGE / "cli.py").read_text()))
              if isinstance(n, ast.FunctionDef) and any(isinstance(m, ast.ImportFrom) for m in ast.walk(n))]
    if inline:  # the CLI imports its recipes lazily: those edges must be in the graph
        assert "recipes" in _part_graph()["cli"]
    assert _cycles({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": []}, "b": {"c": []}, "c": {}}) == []


def test_no_import_cycle_between_the_package_parts():
    graph = _part_graph()
    cycles = _cycles(graph)
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            lines.append(f"    {a} -> {b}: {', '.join(dict.fromkeys(graph[a][b]))}")
    assert not cycles, "import cycles between policyopt's parts:\n" + "\n".join(lines)


def test_algorithms_import_torch_and_the_standard_library_only():
    allowed_outside = {"torch", "__future__"} | set(sys.stdlib_module_names)
    offenders = []
    for path in sorted((PACKAGE / "algorithms").rglob("*.py")):
        for line, name in _imported(path):
            top = name.split(".")[0]
            if top == ROOT:
                if _part(name) != "algorithms":
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
            elif top not in allowed_outside:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not offenders, "algorithms/ must import only torch and itself:\n" + "\n".join(offenders)


def test_recipe_functions_are_at_most_80_lines():
    offenders = []
    for path in sorted((PACKAGE / "recipes").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # the def line to the last line of its body
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"recipes/{path.name}:{node.lineno} {node.name}: {length} lines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_grpo_and_ppo_recipes_are_at_most_300_lines():
    offenders = []
    for name, limit in MAX_RECIPE_LINES.items():
        lines = len((PACKAGE / "recipes" / name).read_text().splitlines())
        if lines > limit:
            offenders.append(f"recipes/{name}: {lines} lines (at most {limit})")
    assert not offenders, "\n".join(offenders)
