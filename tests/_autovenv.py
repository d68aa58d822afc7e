"""A throwaway venv in which ``HFPATCHES_AUTO=1`` starts *this checkout's* hfpatches.

Its site-packages holds only this checkout's ``hfpatches_auto.pth`` (processed by ``site`` at
start-up, like an installed one) and a path-only .pth that borrows the running venv's packages
(torch & co.; the borrowed directory's own .pth files are not processed). With
``PYTHONPATH=<checkout>`` the start-up hook then imports this checkout, whatever hfpatches version
the shared venv has installed. ``--without-pip``: created in well under a second, nothing downloaded.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_auto_venv(directory: Path) -> Path:
    """Create the venv in ``directory``; return its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    py = directory / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shutil.copy(ROOT / "hfpatches_auto.pth", site / "hfpatches_auto.pth")
    here = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "zz_borrow_stack.pth").write_text("".join(p + "\n" for p in here))
    return py
