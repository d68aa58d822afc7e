"""Start-up cost of ``import hfpatches; hfpatches.apply()`` vs ``python -c pass``.

Median of N runs of each, interleaved, same interpreter, one run of this script. Target: <= 5 ms
added and no heavy module imported. Usage: python benchmarks/startup.py [N]
"""
import os
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "peft", "flash_attn", "liger_kernel", "flair", "accelerate", "trl", "triton")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
APPLY = "import hfpatches; hfpatches.apply()"


def timed(code: str) -> float:
    """CPU time (user + sys) of one interpreter running ``code``: unlike wall time, it does not
    grow when other processes share the cores (wall time is printed too, for reference)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{code!r} exited {proc.returncode}")
    WALL.append(time.perf_counter() - t0)
    return usage.ru_utime + usage.ru_stime


WALL: list[float] = []


def main() -> int:
    # byte-compile the package as a wheel install does (this repo sets PYTHONDONTWRITEBYTECODE)
    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hfpatches")
    subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], check=True)
    timed("pass"), timed(APPLY)  # warm the file cache
    base, patched = [], []
    for _ in range(N):
        base.append(timed("pass"))
        patched.append(timed(APPLY))
    mb, mp = statistics.median(base), statistics.median(patched)
    check = "import sys, hfpatches; hfpatches.apply(); print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    heavy = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True).stdout.strip()
    added = (mp - mb) * 1000
    wall = statistics.median(WALL[3::2]) - statistics.median(WALL[2::2])
    print(f"startup (CPU time, median of {N}): python -c pass {mb * 1000:.1f} ms, + import hfpatches; apply() "
          f"{mp * 1000:.1f} ms; added {added:.1f} ms, ratio {mp / mb:.2f}x (wall: added {wall * 1000:.1f} ms); "
          f"heavy modules imported: {heavy or 'none'}")
    ok = added <= 5 and not heavy
    print("target (<= 5 ms added, nothing heavy):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
