"""Imports run one way (DESIGN.md, Layers): a module imports only its own layer or lower ones.

Every import of every module under t2f/ is read with `ast` (inside functions too, and
`importlib.import_module("t2f...")` with a literal name), and an import of a higher layer fails
the test with file:line and both layers. The map below is the whole truth: a package is
assigned as a folder, a top-level module by name, so a new top-level file (or package) without a
layer fails until it is given one.

Layers, bottom to top, and where the top-level modules sit:
  base       ops/, data/, and small utilities with no model code: config.py (run configuration),
             tokens.py (special token ids shared by data, models and losses), visual.py (image
             grids, to_uint8: used by eval, train and the CLIs), rundir.py (run-directory lock and
             durable writes), exit_status.py (standard library only), __init__.py
  models     models/, losses.py: networks, weight files, loss functions
  inference  inference.py (text -> faces, the one generation path) and checkpointing.py (the
             checkpoints of a run directory, which inference reads; it names Accelerate, so it
             cannot sit with models)
  train/eval trainer/, train.py, monitor.py (W&B and the metrics log, the trainer's only), eval/:
             one layer, since the trainer runs the periodic evaluation
  toy        toy/: the embedded world; registers its metrics with eval, never imported below
  cli        cli.py, bench.py, shards_cli.py, generate.py (the `t2f generate` command): entry points
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "t2f"
ORDER = ("base", "models", "inference", "train/eval", "toy", "cli")
LAYERS = {
    # packages (every module inside)
    "ops": "base", "data": "base", "models": "models", "trainer": "train/eval", "eval": "train/eval", "toy": "toy",
    # top-level modules
    "__init__.py": "base", "config.py": "base", "tokens.py": "base", "visual.py": "base", "rundir.py": "base",
    "exit_status.py": "base",
    "losses.py": "models",
    "inference.py": "inference", "checkpointing.py": "inference",
    "train.py": "train/eval", "monitor.py": "train/eval",
    "cli.py": "cli", "bench.py": "cli", "shards_cli.py": "cli", "generate.py": "cli",
    "standins": "cli", "gpu_check.py": "cli",  # full-size stand-in weights and data; `./launch gpu-check`
    "attention.py": "base",  # the show-attend-tell figure (images and numbers only, like visual.py)
    "serve.py": "cli", "serve_page.py": "cli", "serving.py": "cli",  # `t2f serve`: CLI, Gradio page, one request
}


def layer_of(relative: Path) -> str | None:
    """The layer of a module given by its path inside t2f/ (None: not in the map)."""
    return LAYERS.get(relative.parts[0]) if len(relative.parts) > 1 else LAYERS.get(relative.name)


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package's name is its __init__)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name,) + path.relative_to(package).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(tree: ast.AST, module: str, is_package: bool):
    """(line, dotted name) of everything `tree` imports, relative imports resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"  # a submodule, or a name from `base`
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def resolve(name: str, modules: dict) -> str | None:
    """The t2f module `name` refers to (the longest known prefix), or None outside the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def imports(package: Path):
    """(file relative to t2f/'s parent, line, importing module, its layer, imported name, t2f target or None)."""
    modules = module_files(package)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in imported_names(tree, module, path.name == "__init__.py"):
            yield (path.relative_to(package.parent), line, module, layer_of(path.relative_to(package)), name,
                   resolve(name, modules))


def violations(package: Path) -> tuple[list[str], list[str]]:
    """(imports that go up a layer, modules without a layer), as readable lines."""
    modules = module_files(package)
    unassigned = [str(p.relative_to(package.parent)) for p in modules.values() if layer_of(p.relative_to(package)) is None]
    found = []
    for where, line, module, mine, _, target in imports(package):
        theirs = layer_of(modules[target].relative_to(package)) if target else None
        text = f"{where}:{line}: {module} ({mine}) imports {target} ({theirs})"
        if mine and theirs and ORDER.index(theirs) > ORDER.index(mine) and text not in found:
            found.append(text)
    return found, unassigned


def test_every_module_has_a_layer_and_the_map_names_only_real_files():
    _, unassigned = violations(PACKAGE)
    assert not unassigned, f"give these modules a layer in tests/test_layers.py LAYERS: {unassigned}"
    stale = [name for name in LAYERS if not (PACKAGE / name).exists()]
    assert not stale, f"LAYERS names files or packages that are gone: {stale}"
    assert set(LAYERS.values()) <= set(ORDER)


def test_imports_run_one_way():
    found, _ = violations(PACKAGE)
    assert not found, "a lower layer imports a higher one (DESIGN.md, Layers):\n" + "\n".join(found)


def test_models_and_losses_know_no_data_code_accelerate_or_wandb():
    """DESIGN.md: models, losses: networks, weight files, loss functions (no data files, Accelerate or W&B)."""
    found = [f"{where}:{line}: {module} imports {name}" for where, line, module, mine, name, target in imports(PACKAGE)
             if mine == "models" and ((target or "").startswith("t2f.data") or name.split(".")[0] in ("accelerate", "wandb"))]
    assert not found, "\n".join(found)


@pytest.fixture
def fake_package(tmp_path):
    """A package with the real layout and one upward import inside a function."""
    root = tmp_path / "t2f"
    for folder in ("models", "toy", "data"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "toy" / "classifier.py").write_text("X = 1\n")
    (root / "data" / "vocab.py").write_text("PAD = 0\n")
    (root / "models" / "encoder.py").write_text(
        "from t2f.data.vocab import PAD\n\n\ndef build():\n    from ..toy import classifier\n    return classifier\n")
    (root / "data" / "shards.py").write_text("import importlib\nenc = importlib.import_module('t2f.models.encoder')\n")
    return root


def test_the_check_names_file_line_and_both_layers(fake_package):
    found, unassigned = violations(fake_package)
    assert found == ["t2f/data/shards.py:2: t2f.data.shards (base) imports t2f.models.encoder (models)",
                     "t2f/models/encoder.py:5: t2f.models.encoder (models) imports t2f.toy.classifier (toy)"]
    assert not unassigned
    (fake_package / "newthing.py").write_text("")
    assert violations(fake_package)[1] == ["t2f/newthing.py"]
