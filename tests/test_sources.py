"""Every source of the project compiles with warnings as errors.

Under ``python -W error`` or pytest's ``filterwarnings = error`` (flair's own test configuration
uses it), a source whose compilation warns (an invalid escape sequence such as ``"\\ "`` in a
docstring: DeprecationWarning on Python 3.11, SyntaxWarning from 3.12) is a SyntaxError when
there is no bytecode cache, so importing it fails and the patch that needs it ends FAILED.
"""
from __future__ import annotations

import os
import warnings

import pytest
from conftest import ROOT

# everything that is Python source of the project (virtualenvs, caches and build outputs are not)
_DIRS = ("hfpatches", "tests", "gpu_tests", "benchmarks", "scripts")
_SKIP = {"__pycache__", ".venvs", ".cache", "build", "dist", ".git"}


def sources() -> list[str]:
    out = [str(p) for p in sorted(ROOT.glob("*.py"))]
    for d in _DIRS:
        for here, dirs, files in os.walk(ROOT / d):
            dirs[:] = sorted(x for x in dirs if x not in _SKIP and not x.endswith(".egg-info"))
            out.extend(os.path.join(here, f) for f in sorted(files) if f.endswith(".py"))
    return out


def test_the_package_is_found():
    assert any(p.endswith(os.path.join("hfpatches", "flair.py")) for p in sources())


@pytest.mark.parametrize("path", sources(), ids=lambda p: os.path.relpath(p, ROOT))
def test_compiles_with_warnings_as_errors(path):
    with open(path, "rb") as fh:
        src = fh.read()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(src, path, "exec", dont_inherit=True)  # SyntaxError (naming file and line) if it warns


def test_helpers_import_under_W_error_without_bytecode_cache(py, tmp_path):
    """The reported failure: ``python -W error`` importing ``hfpatches.flair`` and every patch
    module with no bytecode cache (an empty ``PYTHONPYCACHEPREFIX``: nothing cached to hide it)."""
    code = """
import importlib, pkgutil
import hfpatches, hfpatches.patches
names = ["hfpatches.flair", "hfpatches.loading", "hfpatches.peft_keys", "hfpatches.errors"]
names += [f"hfpatches.patches.{m.name}" for m in pkgutil.iter_modules(hfpatches.patches.__path__)]
for n in names:
    importlib.import_module(n)
print("OK", len(names))
"""
    proc = py(code, env={"PYTHONPYCACHEPREFIX": str(tmp_path), "PYTHONWARNINGS": "error",
                         "PYTHONDONTWRITEBYTECODE": None}, check=False)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
