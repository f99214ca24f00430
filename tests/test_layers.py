"""The package's layering (README "Layout", `posttrain/__init__.py`): every import, at module level or inside a
function, goes to the same layer or one below it, and no modules import each other in a circle.

Plain `ast` over the source files, no external tool: the built-in verifiers in `rewards/` count as
`posttrain.rewards` (that is how they install)."""

import ast
from pathlib import Path

from posttrain import LAYERS

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    if path.is_relative_to(REPO / "rewards"):
        parts = ["posttrain", "rewards", *path.relative_to(REPO / "rewards").with_suffix("").parts]
    else:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [*(REPO / "posttrain").rglob("*.py"), *(REPO / "rewards").rglob("*.py")]
    return {_module_name(p): p for p in files}


def _known(name: str, modules: dict) -> str | None:
    """The longest prefix of the dotted `name` that is one of the package's modules."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (`from pkg import sub` counts as importing `pkg.sub`)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for target in targets:
                found = _known(target, modules) if target.startswith("posttrain") else None
                if found and found != module and found != "posttrain":
                    graph[module].add(found)
    return graph


def layer_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), i
    assert level is not None, f"{module} is in no layer of posttrain.LAYERS: add it where it belongs"
    return level


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_below():
    graph = import_graph()
    assert len(graph) > 40
    upward = []
    for module, targets in sorted(graph.items()):
        if module == "posttrain":
            continue
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that go up the layer order:\n" + "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    circles = _cycles(import_graph())
    assert not circles, "modules that import each other in a circle:\n" + "\n".join(" ↔ ".join(c) for c in circles)


def test_the_checker_sees_circles_and_upward_imports():
    """The checks above would fail on a circle or an upward import (so a green run means something)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert layer_of("posttrain.errors") < layer_of("posttrain.recipe.schema") < layer_of("posttrain.stages.rl")
    assert layer_of("posttrain.stages.rl") < layer_of("posttrain.cli")


def test_the_recipe_layer_learns_the_stage_kinds_from_the_stages_layer(tmp_path):
    """The schema does not import the stages: until `posttrain.stages` registers its kinds the loader says so."""
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: t\nmodel: {path: m}\nstages:\n  sft: {data: {path: d.jsonl}, args: {lr: 1.0e-4}}\n")
    code = ("import sys; from posttrain.errors import UserError; from posttrain.recipe import load_recipe\n"
            "try:\n    load_recipe(sys.argv[1])\nexcept UserError as err:\n    print(err)\n"
            "import posttrain.stages\nprint(load_recipe(sys.argv[1]).stages[0].kind)")
    out = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["no stage kinds are registered: `import posttrain.stages` (the CLI and the pipeline "
                                "do) before loading a recipe", "sft"]
