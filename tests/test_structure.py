"""The shape of the code base: layers, no import circle, files a reader can hold in their head.

Every import is read from the source with `ast` (function-level imports included: a lazy
import still ties two modules together), so a new circle or an arrow that points up fails
here before a reader trips over it.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lower numbers are closer to the ground. A module may import its own package and any package
# of a lower layer; packages on the same layer are peers and stay independent of each other.
LAYERS = {
    "kernels": 0,
    "eeyore.model": 0,
    "eeyore.profile": 0,
    "eeyore.accel": 1,
    "eeyore.serve": 2,
    "eeyore.train": 2,
    "eeyore.eval": 3,
    "eeyore.data": 3,
    "eeyore.chat": 4,
    "eeyore.studio": 4,
    "eeyore.demo": 5,
    "bench": 6,
}
MAX_LINES = 400


def _modules():
    """Yield (module name, path) for every Python file of the packages and the benchmarks."""
    for top in ("eeyore", "kernels", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _package(module: str) -> str:
    """The entry of LAYERS a module belongs to (the longest matching prefix)."""
    best = ""
    for name in LAYERS:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` (imports there only name types for
    annotations: nothing is imported when the program runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path) -> set[str]:
    """Every project module named by an import statement anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from eeyore.model import weights` names a module too
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("eeyore", "kernels", "bench")}


@pytest.fixture(scope="module")
def graph():
    modules = dict(_modules())
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in _imports(name, path) if m in modules and m != name}
    return modules, edges


def test_every_package_has_a_layer(graph):
    modules, _ = graph
    orphans = sorted(m for m in modules if m not in ("eeyore", "eeyore.__main__") and not _package(m))
    assert not orphans, f"give these a layer in tests/test_structure.py LAYERS: {orphans}"


def test_no_import_runs_up_or_sideways(graph):
    _, edges = graph
    bad = []
    for src, targets in edges.items():
        src_pkg = _package(src)
        if not src_pkg:
            continue
        for dst in targets:
            dst_pkg = _package(dst)
            if not dst_pkg or dst_pkg == src_pkg:
                continue
            if LAYERS[dst_pkg] >= LAYERS[src_pkg]:
                bad.append(f"{src} -> {dst} (layer {LAYERS[src_pkg]} -> {LAYERS[dst_pkg]})")
    assert not bad, "imports that run up or across a layer:\n" + "\n".join(sorted(bad))


def _find_cycle(edges):
    """One import circle as a list of modules, or None (iterative DFS, white/grey/black)."""
    colour = {m: 0 for m in edges}
    for start in edges:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(edges[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child) == 0:
                colour[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges[child]))))
    return None


def test_no_import_circle(graph):
    _, edges = graph
    # a package's __init__ re-exporting its own modules is not a circle a reader follows
    def is_reexport(src, dst):
        return dst.startswith(src + ".")
    pruned = {src: {d for d in dsts if not is_reexport(src, d)} for src, dsts in edges.items()}
    cycle = _find_cycle(pruned)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_circle_finder_finds_circles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_relative_imports_resolve(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from . import weights\nfrom ..serve.engine import Engine\n"
                 "if TYPE_CHECKING:\n    from eeyore.eval import runner\n")
    found = _imports("eeyore.model.x", f)
    assert found >= {"eeyore.model.weights", "eeyore.serve.engine"}
    assert "eeyore.eval.runner" not in found


def test_source_files_stay_short(graph):
    modules, _ = graph
    long = {m: n for m, p in modules.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"
