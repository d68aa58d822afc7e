"""The package as a platform team installs it: sdist + wheel build, a fresh venv from the wheel,
``hfpatches doctor`` there, and ``HFPATCHES_AUTO=1`` end to end through the installed .pth hook.

Runs on the affected stack only (the wheel is pure Python and the same for both stacks).
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, current_stack

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(current_stack() != "affected",
                                 reason="packaging is stack-independent: checked once, on the affected stack")]


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory):
    """A fresh venv with hfpatches installed from its wheel. The heavy stack (torch, wrapt, ...)
    is borrowed from this test's venv through a path-only .pth (its own .pth files, including the
    editable hfpatches, are not processed), so nothing is downloaded."""
    d = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(d)], check=True)  # bundled pip, offline
    py = d / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    wheel = next(dist.glob("*.whl"))
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    assert (site / "hfpatches_auto.pth").exists(), sorted(p.name for p in site.iterdir())
    (site / "zz_borrow_stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def test_wheel_and_sdist_contents(dist):
    wheel = next(dist.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hfpatches_auto.pth" in names and "hfpatches/py.typed" in names
    assert any(n.startswith("hfpatches/patches/") and n.endswith(".py") for n in names)
    assert not any(n.startswith("tests/") for n in names), "test stubs must never ship in the wheel"
    assert list(dist.glob("*.tar.gz")), "no sdist"


def _run(py, code, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HFPATCHES_") and k != "PYTHONPATH"}
    e.update(env)
    return subprocess.run([str(py), "-c", textwrap.dedent(code)], env=e, capture_output=True, text=True,
                          timeout=300, cwd="/")


def test_doctor_runs_from_the_wheel(venv):
    proc = subprocess.run([str(venv.parent / "hfpatches"), "doctor"], capture_output=True, text=True,
                          timeout=600, cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "meta_buffers" in proc.stdout and "transformers" in proc.stdout


SCRIPT = """
    import json, sys
    import torch
    # this script never imports hfpatches; the bug scenario of meta_buffers:
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(1, 4097, dtype=torch.float32), persistent=False)
    m = M().to_empty(device="cpu")
    kept = bool(torch.equal(m.table, torch.arange(1, 4097, dtype=torch.float32)))
    hp = sys.modules.get("hfpatches")
    st = hp.status()["meta_buffers"].outcome.value if hp else None
    print(json.dumps({"imported": hp is not None, "kept": kept, "status": st, "file": getattr(hp, "__file__", None)}))
"""


def test_auto_makes_fixes_live_without_code_change(venv):
    import json

    on = _run(venv, SCRIPT, HFPATCHES_AUTO="1")
    assert on.returncode == 0, on.stderr
    r = json.loads(on.stdout.strip().splitlines()[-1])
    assert r["imported"] and r["status"] == "APPLIED" and r["kept"], r
    assert str(ROOT) not in r["file"], f"hfpatches came from the work tree, not the wheel: {r['file']}"
    off = _run(venv, SCRIPT)
    r = json.loads(off.stdout.strip().splitlines()[-1])
    assert not r["imported"], "without HFPATCHES_AUTO nothing of hfpatches may be imported"
    assert not r["kept"], "the bug should show without the patch (to_empty left the buffer uninitialised)"
    for off_value in ("0", "false", "OFF", "no", " "):   # the .pth used to treat only '' and '0' as off
        zero = _run(venv, SCRIPT, HFPATCHES_AUTO=off_value)
        r = json.loads(zero.stdout.strip().splitlines()[-1])
        assert not r["imported"] and not r["kept"], (off_value, r)
    for on_value in ("true", "YES", "on"):
        r = json.loads(_run(venv, SCRIPT, HFPATCHES_AUTO=on_value).stdout.strip().splitlines()[-1])
        assert r["imported"] and r["kept"], (on_value, r)
    bad = _run(venv, SCRIPT, HFPATCHES_AUTO="maybe")
    r = json.loads(bad.stdout.strip().splitlines()[-1])
    assert not r["kept"] and "HFPATCHES_AUTO='maybe' is not a boolean" in bad.stderr, (r, bad.stderr)


def test_pth_false_values_are_envs():
    """The .pth decides "off" without importing hfpatches; its set must be _env's."""
    from hfpatches import _env

    text = (ROOT / "hfpatches_auto.pth").read_text()
    inside = text.split("not in (", 1)[1].split(")", 1)[0]
    assert {v.strip().strip("'") for v in inside.split(",")} == _env._FALSE


def test_auto_with_a_bad_setting_does_not_break_startup(venv):
    proc = _run(venv, "print('alive')", HFPATCHES_AUTO="1", HFPATCHES_ONLY="no_such_patch")
    assert proc.returncode == 0 and "alive" in proc.stdout
    assert "unknown patch id 'no_such_patch'" in proc.stderr
    strict = _run(venv, "print('alive')", HFPATCHES_AUTO="1", HFPATCHES_ONLY="no_such_patch", HFPATCHES_STRICT="1")
    assert strict.returncode != 0 and "no_such_patch" in strict.stderr
