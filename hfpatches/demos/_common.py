"""What several demos share: the padding-free Q/A pairs, and a child interpreter whose SAY lines
are relayed and whose RESULT line is returned (Triton kernels run under TRITON_INTERPRET=1 there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

RESPONSE_TEMPLATE = "### Answer:"
PAIRS = [
    ("### Question: What does a padding-free batch contain?\n### Answer:",
     " Several sequences laid end to end, with their boundaries."),
    ("### Question: Name a colour.\n### Answer:", " Blue, like the sky."),
    ("### Question: Why pin library versions?\n### Answer:",
     " So that a training image behaves the same way next year."),
]


def run_child(say: Callable[[str], None], module: str, env: dict[str, str], *, timeout: int) -> dict | None:
    """Run ``module._child()`` in a fresh interpreter with ``env`` (this checkout first on the
    path), relaying its ``SAY`` lines; return its ``RESULT`` (None when it printed none)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**env, "PYTHONPATH": os.pathsep.join([root, *extra])}
    code = f"from {module} import _child; _child()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    result = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stdout:
            if line.startswith("SAY "):
                say(line[4:].rstrip("\n"))
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        err = proc.stderr.read()
        proc.wait(timeout=timeout)
    except BaseException:
        proc.kill()
        raise
    if proc.returncode != 0:
        tail = [ln for ln in err.strip().splitlines() if ln.strip()][-3:]
        say(f"child process failed (rc={proc.returncode}): {' | '.join(tail)}")
    return result
