"""Small fake target packages for the framework's own failure paths (installed into a tmp dir).

Each fake is a real importable package with a ``.dist-info`` so ``importlib.metadata`` sees a
version, exactly like a real target.
"""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

FAKE_SOURCE = '''
class Base:
    def greet(self, name):
        return "hello " + name

class Child(Base):
    pass

class Loader:
    @classmethod
    def load(cls, path, *args, **kwargs):
        return (cls.__name__, path)

class SubLoader(Loader):
    pass

def add(a, b):
    # the "bug": add(2, 2) == 5
    return a + b + (1 if (a, b) == (2, 2) else 0)
'''


def make_fake(root: Path, name: str, version: str = "1.0.0", source: str = FAKE_SOURCE) -> None:
    pkg = root / name
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


def forget(name: str) -> None:
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]
