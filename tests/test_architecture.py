"""The module structure of ldm/ (docs/architecture.md): no import cycle, nothing above the package imported.

Imports inside functions count as edges too, so a clean graph also means no function-level import is there to
dodge a cycle. The graph is read from the source (ast), so modules with optional dependencies count as well.
"""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABOVE_LDM = ("evaluation", "scripts", "main", "merge_embeddings", "tests")


def ldm_modules():
    for path in sorted((ROOT / "ldm").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imported_names(path, module):
    """Every module `path` imports (anywhere in it), as absolute dotted names."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`


def import_graph():
    modules = dict(ldm_modules())
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(path, module):
            while name and name not in modules and name.startswith("ldm"):
                name = name.rpartition(".")[0]  # `from ldm.x import f`: the module is ldm.x
            if name in modules and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for succ in sorted(graph[node]):
            if state.get(succ) == "open":
                return stack[stack.index(succ):] + [succ]
            if succ not in state:
                found = visit(succ)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_ldm_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["ldm.models.diffusion.ddpm"]  # the walk found the package and its edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_ldm_imports_nothing_above_the_package():
    upward = [(module, name) for module, path in ldm_modules() for name in imported_names(path, module)
              if name.split(".")[0] in ABOVE_LDM]
    assert upward == []


def test_the_unet_and_the_samplers_do_not_import_textual_inversion():
    graph = import_graph()

    def reaches(start):
        seen, todo = set(), [start]
        while todo:
            for succ in graph[todo.pop()] - seen:
                seen.add(succ)
                todo.append(succ)
        return seen

    for module in ("ldm.modules.diffusionmodules.openaimodel", "ldm.models.diffusion.ddim",
                   "ldm.models.diffusion.plms", "ldm.models.diffusion.sampling"):
        assert not reaches(module) & {"ldm.modules.xti", "ldm.modules.embedding_manager",
                                      "ldm.modules.embedding_io"}, module


@pytest.mark.parametrize("module", [m for m, _ in ldm_modules()])
def test_every_ldm_module_imports(module):
    importlib.import_module(module)
