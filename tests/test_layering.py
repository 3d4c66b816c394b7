"""The layering of design.md §2: lower layers never import upper ones; ``import wanx`` loads nothing heavy.

``model``, ``vae``, ``text`` and ``sampling`` import only torch, ``configs`` and the other
stdlib-only leaf modules of the package root (``atomic``, ...); ``loading`` (and ``testing``,
which writes checkpoints with it) sits above them; ``pipelines`` above those; ``cli``, ``serve``,
``batch`` and ``train`` on top. Checked twice: by importing each module in a fresh interpreter
(what really gets loaded), and by reading every import statement, including the lazy ones inside
functions that a plain import does not run.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import wanx

PACKAGE = Path(wanx.__file__).resolve().parent
UPPER = ("wanx.pipelines", "wanx.cli", "wanx.train", "wanx.serve", "wanx.batch")
LOWER = ("wanx.model", "wanx.vae", "wanx.text", "wanx.sampling")
LOADING = ("wanx.loading", *(f"wanx.loading.{p.stem}" for p in sorted((PACKAGE / "loading").glob("[!_]*.py"))))


def _top_imports(path: Path) -> set[str]:
    """Top-level names of everything a file imports (relative imports as "wanx")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("wanx" if node.level else (node.module or "").split(".")[0])
    return names


# Top-level modules that import only the standard library sit below every layer.
LEAVES = {"wanx"} | {f"wanx.{p.stem}" for p in PACKAGE.glob("[!_]*.py")
                     if _top_imports(p) <= set(sys.stdlib_module_names) | {"__future__"}}
HEAVY = ("torch", "numpy", "PIL", "safetensors", "tokenizers", "av")


def _in(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _loaded_after(code: str) -> list[str]:
    """Names in ``sys.modules`` after running ``code`` in a fresh interpreter that sees this ``wanx``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]))
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_leaves_are_found():
    assert {"wanx.configs", "wanx.atomic"} <= LEAVES and "wanx.device" not in LEAVES  # device imports torch


def test_import_wanx_loads_no_heavy_module():
    loaded = _loaded_after("import wanx")
    assert set(m for m in loaded if m.startswith("wanx")) <= LEAVES
    assert not [m for m in loaded if _in(m, HEAVY)]


@pytest.mark.parametrize("module", ["wanx.configs", *LOWER, *LOADING, "wanx.testing"])
def test_importing_a_lower_layer_loads_no_upper_layer(module):
    loaded = _loaded_after(f"import {module}")
    assert module in loaded
    assert not [m for m in loaded if _in(m, UPPER)], module
    if _in(module, LOWER):
        own = module.split(".")[:2]
        strays = [m for m in loaded if m.startswith("wanx") and m not in LEAVES and m.split(".")[:2] != own]
        assert not strays, f"{module} pulled in {strays}"


def test_building_a_tiny_checkpoint_loads_no_upper_layer(tmp_path):
    """``wanx.testing`` imports its writers lazily; running it is what would pull in an upper layer."""
    loaded = _loaded_after(f"from wanx.testing import build_tiny_checkpoint\n"
                           f"build_tiny_checkpoint({str(tmp_path / 'ckpt')!r})")
    assert not [m for m in loaded if _in(m, UPPER)]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _wanx_imports(path: Path) -> set[str]:
    """Every ``wanx...`` module a file imports, at top level or inside functions (relative ones resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from . import x` / `from wanx import x` may name submodules: count them too
            found |= {base} | {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
    return {m for m in found if m == "wanx" or m.startswith("wanx.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def _files(packages) -> list[Path]:
    out = []
    for pkg in packages:
        target = PACKAGE.parent / pkg.replace(".", "/")
        out += sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    return out


@pytest.mark.parametrize("path", _files(LOWER), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_lower_layer_files_import_only_configs_and_their_own_package(path):
    own = _module_name(path).split(".")[:2]
    strays = [m for m in _wanx_imports(path) if m not in LEAVES and m.split(".")[:2] != own]
    assert not strays, f"{path.relative_to(PACKAGE.parent)} imports {strays}"


@pytest.mark.parametrize("path", _files(("wanx.loading", "wanx.testing")),
                         ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_loading_and_testing_never_import_an_upper_layer(path):
    upward = [m for m in _wanx_imports(path) if _in(m, UPPER)]
    assert not upward, f"{path.relative_to(PACKAGE.parent)} imports {upward}"


TOP = ("wanx.cli", "wanx.train", "wanx.serve", "wanx.batch")
MIDDLE = [m for m in ("wanx.pipelines", "wanx.request", "wanx.residency", "wanx.device", "wanx.images",
                      "wanx.geometry", "wanx.media", "wanx.lora", "wanx.cache", "wanx.quant") if _is_module(m)]


@pytest.mark.parametrize("path", _files(MIDDLE), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_middle_layers_never_import_the_top(path):
    upward = [m for m in _wanx_imports(path) if _in(m, TOP) and not _in(_module_name(path), TOP)]
    assert not upward, f"{path.relative_to(PACKAGE.parent)} imports {upward}"


def test_nothing_imports_the_cli():
    importers = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if p.name != "cli.py" and "wanx.cli" in _wanx_imports(p)]
    assert not importers


def test_importing_the_pipelines_loads_no_top_layer():
    loaded = _loaded_after("import wanx.pipelines")
    assert not [m for m in loaded if _in(m, TOP)]
