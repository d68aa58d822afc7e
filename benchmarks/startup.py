"""Start-up cost of ``import hfpatches; hfpatches.apply()`` vs ``python -c pass``.

Median of N runs of each, interleaved, same interpreter, one run of this script. Target: <= 15 ms
added and no heavy module imported. Usage: python benchmarks/startup.py [N]
"""
import statistics
import subprocess
import sys
import time

HEAVY = ("torch", "transformers", "peft", "flash_attn", "liger_kernel", "flair", "accelerate", "trl", "triton")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 30
APPLY = "import hfpatches; hfpatches.apply()"


def timed(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> int:
    import os

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
    print(f"startup: python -c pass {mb * 1000:.1f} ms, + import hfpatches; apply() {mp * 1000:.1f} ms "
          f"(median of {N}); added {added:.1f} ms, ratio {mp / mb:.2f}x; heavy modules imported: {heavy or 'none'}")
    ok = added <= 15 and not heavy
    print("target (<= 15 ms added, nothing heavy):", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
