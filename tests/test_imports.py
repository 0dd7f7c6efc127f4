"""keel's modules import each other without cycles, and the entry points stay light.

A cycle between modules works only as long as every import in it is deferred (inside a function)
or happens in just the right order; one refactor that moves an import to the top turns it into
an ImportError at start-up. So every import statement counts here, the deferred ones included.
"""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import keel

SRC = Path(keel.__file__).resolve().parent.parent     # the directory holding the keel package


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()                                    # a package's __init__ is the package
    return ".".join(parts)


def known_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "keel").rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The keel modules that module ``name`` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()

    def add(target: str) -> None:
        # `import keel.a.b` loads keel.a.b; a name that is no module (an attribute, or something
        # the tests cannot see) is attributed to the nearest module above it
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "keel" or alias.name.startswith("keel."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source != "keel" and not source.startswith("keel."):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source)   # `from keel.models import vit` is keel.models.vit
    return found


def import_graph() -> dict[str, set[str]]:
    modules = known_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One closed path through each component of :func:`components`."""
    return [closed_path(c, graph) for c in components(graph)]


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, and the modules importing
    themselves (Tarjan's algorithm, iterative: no recursion limit)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            strongconnect(name)
    return sorted(components)


def closed_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component (a
    breadth-first search back to the start), so the report shows real import edges."""
    start, members = component[0], set(component)
    if start in graph[start]:
        return [start, start]
    came_from, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while came_from[path[-1]] is not None:
                        path.append(came_from[path[-1]])
                    return path[::-1] + [start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    return component + [start]


def test_no_import_cycles():
    graph = import_graph()
    found = []
    for component in components(graph):
        path = closed_path(component, graph)
        rest = sorted(set(component) - set(path))   # one path is shown; name who else takes part
        found.append(" -> ".join(path) + (f"  (same cycle group: {', '.join(rest)})" if rest else ""))
    assert not found, "import cycles between keel modules:\n" + "\n".join(found)


def test_the_cycle_finder_sees_deferred_relative_and_submodule_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["d", "d"]]
    fake = tmp_path / "fake.py"
    fake.write_text("from . import vit\nfrom .registry import create_model\n"
                    "def build():\n    import keel.models.resnet\n    from keel.models import swin, create_model\n"
                    "    from ..data import sources\n")
    assert imports_of("keel.models.fake", fake, known_modules()) == {
        "keel.models.vit", "keel.models.registry", "keel.models.resnet", "keel.models.swin", "keel.models",
        "keel.data.sources"}


HEAVY = ("matplotlib", "timm", "lightly")


def heavy_imports(*args: str) -> list[str]:
    """The HEAVY packages ``python -X importtime ARGS`` loads (importtime names every module a
    run imports, on stderr, whatever the run prints or how it exits)."""
    run = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True)
    names = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "keel" in names, run.stderr[-2000:]
    return sorted(n for n in HEAVY if n in names)


def test_import_keel_stays_light():
    assert heavy_imports("-c", "import keel") == []


def test_keel_help_stays_light():
    assert heavy_imports("-m", "keel", "--help") == []
