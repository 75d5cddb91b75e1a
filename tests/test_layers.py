"""The package's folders are its layers: a module imports only from its own layer or the layers below it
(function-local imports included), no modules import each other in a circle, and the method core imports
nothing but torch, numpy, triton and the standard library. Read from the source, nothing is imported."""
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distributed_ebm"
# from the ground up; a layer may import itself and the ones before it
LAYERS = ["errors", "method", "config", "store", "progress", "results", "recipes", "local", "distributed", "cli",
          "quickstart"]
TOP = {"cli": LAYERS.index("cli"), "quickstart": LAYERS.index("cli")}  # the entry points share the top floor
METHOD_MAY_IMPORT = {"torch", "numpy", "triton"}


def layer(module: str) -> int:
    """`distributed_ebm.store.data` -> the index of `store`."""
    head = module.split(".")[1] if "." in module else ""
    return TOP.get(head, LAYERS.index(head) if head in LAYERS else -1)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(module: str, path: Path, modules: dict) -> tuple[set[str], set[str]]:
    """(project modules imported, third-party top-level names imported), wherever the import stands."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    ours, theirs = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("distributed_ebm") else theirs).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif node.module.startswith("distributed_ebm"):
                target = node.module
            else:
                theirs.add(node.module)
                continue
            for alias in node.names:  # `from pkg import submodule` depends on the submodule
                ours.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return ours, {t.split(".")[0] for t in theirs}


def test_every_module_stands_in_a_layer():
    assert not [m for m in _modules() if m != "distributed_ebm" and layer(m) < 0]


def test_imports_run_downward_only():
    modules = _modules()
    upward = []
    for module, path in modules.items():
        if module == "distributed_ebm":
            continue
        for target in _imports(module, path, modules)[0]:
            if layer(target) > layer(module):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_no_modules_import_each_other_in_a_circle():
    modules = _modules()
    graph = {m: {t for t in _imports(m, p, modules)[0] if t in modules and t != m} for m, p in modules.items()}
    state, circles = {}, []

    def visit(m, trail):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                circles.append(trail[trail.index(t):] + [t])
            elif t not in state:
                visit(t, trail + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, circles


def test_the_method_core_imports_only_torch_numpy_triton_and_the_standard_library():
    modules = _modules()
    foreign = {}
    for module, path in modules.items():
        if layer(module) <= LAYERS.index("method") and module != "distributed_ebm":
            extra = {n for n in _imports(module, path, modules)[1]
                     if n not in METHOD_MAY_IMPORT and n not in sys.stdlib_module_names and n != "__future__"}
            if extra:
                foreign[module] = sorted(extra)
    assert not foreign, foreign


def test_ray_code_imports_nothing_of_the_one_process_executors():
    """`local` (one process, no Ray) and `distributed` (Ray) are two executors side by side: what both need
    lives below them, in `recipes`."""
    modules = _modules()
    crossing = [f"{m} -> {t}" for m, p in modules.items() if m.split(".")[1:2] == ["distributed"]
                for t in _imports(m, p, modules)[0] if t.split(".")[1:2] == ["local"]]
    assert not crossing, crossing
