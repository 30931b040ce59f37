"""The layer order of ``tfdml/`` (docs/architecture.md), read with ``ast``.

Every ``import`` of every module under ``tfdml/`` counts, function-level
(lazy) imports included:

* the library layers import only from lower layers (never a sibling of the
  same layer): helpers -> ops, data -> mining, weighting -> losses -> memory
  -> models -> eval -> augment, meta, export;
* the library never imports the application (``tfdml.training`` and its
  compatibility modules ``train_lib``, ``config``, ``demo``, plus
  ``bench``); nothing but the application imports ``tfdml.training``;
* inside ``tfdml.training`` each module imports only the ones before it:
  config -> run_dir -> build -> checkpoint -> callbacks -> report -> loop ->
  demo;
* ``train.py`` and ``export/export.py`` are CLIs over ``tfdml.training``;
  the compatibility modules only re-export names of ``tfdml.training``.
"""

import ast
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "tfdml")

# Lowest first. A unit is ``tfdml.<name>`` (a module or a subpackage).
LAYERS = [
    {"_cpu", "version", "registry", "validation", "variables", "distribute"},
    {"ops", "data"},
    {"mining", "weighting"},
    {"losses"},
    {"memory"},
    {"models"},
    {"eval"},
    # augment (IAARefresh embeds with tfdml.eval) and meta (MMSIModel is a
    # DMLModel) sit above eval and models.
    {"augment", "meta", "export"},
]
# The application: may import every library layer.
APP = {"training", "train_lib", "config", "demo", "bench"}
# Compatibility modules: re-exports of tfdml.training (train_lib, config,
# demo) and the benchmark runner, the only app-level modules outside
# tfdml/training.
SHIMS = ("train_lib", "config", "demo")
TRAINING_ORDER = [
    "config",
    "run_dir",
    "build",
    "checkpoint",
    "callbacks",
    "report",
    "loop",
    "demo",
]

RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(rel)


def _modules():
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[_module_name(path)] = path
    return out


MODULES = _modules()


def _is_module(name):
    return name in MODULES


def imports_of(path, name):
    """Dotted ``tfdml...`` modules that the file at ``path`` imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if _is_module(full) else base)
    return {m for m in out if m == "tfdml" or m.startswith("tfdml.")}


def _unit(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


GRAPH = {name: imports_of(path, name) for name, path in MODULES.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in MODULES} - {None}
    assert units - set(RANK) - APP == set(), "add new modules to LAYERS"


def test_library_layer_order():
    bad = []
    for name, targets in GRAPH.items():
        unit = _unit(name)
        if unit is None:  # tfdml/__init__.py: only the helpers
            bad += [
                f"tfdml -> {t}"
                for t in targets
                if t != "tfdml" and RANK.get(_unit(t), 99) > 0
            ]
            continue
        if unit in APP:
            continue
        for t in targets:
            other = _unit(t)
            if other is None or other == unit:
                continue
            if other in APP:
                bad.append(f"{name} -> {t} (the library imports the app)")
            elif RANK[other] >= RANK[unit]:
                bad.append(
                    f"{name} -> {t} (layer {RANK[other]} >= {RANK[unit]})"
                )
    assert not bad, "\n".join(sorted(bad))


def test_only_the_app_imports_training():
    bad = [
        f"{name} -> {t}"
        for name, targets in GRAPH.items()
        for t in targets
        if _unit(t) == "training" and _unit(name) not in APP
    ]
    assert not bad, "\n".join(sorted(bad))


def test_training_module_order():
    rank = {m: i for i, m in enumerate(TRAINING_ORDER)}
    inside = [m for m in MODULES if m.startswith("tfdml.training.")]
    assert {m.split(".")[2] for m in inside} == set(TRAINING_ORDER)
    bad = []
    for name in inside:
        own = rank[name.split(".")[2]]
        for t in GRAPH[name]:
            if t.startswith("tfdml.training."):
                if rank[t.split(".")[2]] >= own:
                    bad.append(f"{name} -> {t}")
            elif _unit(t) in APP - {"training"}:
                bad.append(f"{name} -> {t} (a compatibility module)")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("script", ["train.py", "export/export.py"])
def test_clis_are_thin_over_training(script):
    path = os.path.join(ROOT, script)
    targets = imports_of(path, "__main__")
    assert targets, script
    assert {_unit(t) for t in targets} <= {"training", "_cpu"}, targets


@pytest.mark.parametrize("shim", SHIMS)
def test_compatibility_modules_only_reexport(shim):
    mod = importlib.import_module(f"tfdml.{shim}")
    homes = [
        importlib.import_module(m)
        for m in MODULES
        if m.startswith("tfdml.training.")
    ]
    for name in mod.__all__:
        obj = getattr(mod, name)
        assert any(getattr(h, name, None) is obj for h in homes), name
    with open(MODULES[f"tfdml.{shim}"], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        ok = isinstance(node, (ast.Import, ast.ImportFrom)) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        )
        ok = ok or (
            isinstance(node, ast.Assign)
            and [t.id for t in node.targets] == ["__all__"]
        )
        ok = ok or (
            isinstance(node, ast.If) and "__main__" in ast.unparse(node)
        )
        assert ok, f"tfdml/{shim}.py: {ast.unparse(node)[:80]}"


# Documents of the project's workspace that are not in the repository: a
# reader of a clone cannot open them, so code, tests and docs cite papers,
# official code and the repository's own docs instead (issue 14).
OUTSIDE_DOCUMENTS = (
    "seeds.md",
    "seeds §",
    "stack.md",
    "style.md",
    "quality_audit",
)


def test_no_citations_of_documents_outside_the_repository():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = []
    for top in (
        "tfdml",
        "tests",
        "docs",
        "benchmarks",
        "export",
        "tools",
        "configs",
        "train.py",
        "README.md",
        "BENCHMARKS.md",
    ):
        start = os.path.join(root, top)
        paths = (
            [start]
            if os.path.isfile(start)
            else [
                os.path.join(d, f)
                for d, _, fs in os.walk(start)
                for f in fs
                if f.endswith((".py", ".md", ".yaml"))
            ]
        )
        for path in paths:
            if os.path.abspath(path) == os.path.abspath(__file__):
                continue
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if any(d in line for d in OUTSIDE_DOCUMENTS):
                        found.append(f"{os.path.relpath(path, root)}:{n}")
    assert not found, f"cites documents not in the repository: {found}"
