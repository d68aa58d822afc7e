"""meta_buffers: what meta-device init costs and what the patch adds, in one run.

1. SmolLM2-135M (fp32 safetensors): eager ``from_pretrained`` vs ``init_empty_weights()`` ->
   ``to_empty("cpu")`` -> ``tie_weights()`` -> ``load_state_dict`` (with the patch, and without for
   reference): wall time and peak RSS, each in a fresh process (peak RSS only grows).
2. ``Module.to_empty`` with the patch vs torch's own, interleaved in one process (CPU time; min,
   and the median of the ratios of adjacent runs, which is what the target is judged on): a model with many buffers
    none of them non-persistent (the fast path; target
   <= 1.05x), the same with one non-persistent buffer per block (kept), and the SmolLM2 skeleton
   with its rotary buffer real (kept) and on meta (recomputed).

Usage: .venvs/affected/bin/python benchmarks/meta_init.py [N]
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Run as a script, this folder is sys.path[0]: a sibling named like a stdlib module
# (formerly benchmarks/inspect.py) would shadow it for torch. Import from the installed package only.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
os.environ.setdefault("HFPATCHES_CACHE", os.path.join(ROOT, ".cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
TARGET = 1.05
LOAD_RUNS = 3


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def scenario(name: str) -> dict:
    """One load in this (fresh) process: seconds and peak RSS above the post-import baseline."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import hfpatches
    from hfpatches._models import smollm2_dir
    from hfpatches.demos.meta_buffers import dtype_kw, safetensors_state_dict

    d = smollm2_dir()
    cfg = AutoConfig.from_pretrained(d)
    if name == "meta_patched":
        hfpatches.apply(only=["meta_buffers"])
    gc.collect()
    base = _rss_mb()
    t0 = time.perf_counter()
    if name == "eager":
        model = AutoModelForCausalLM.from_pretrained(d, **dtype_kw(torch.float32))
    else:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg, **dtype_kw(torch.float32))
        model.to_empty(device="cpu")
        model.tie_weights()
        model.load_state_dict(safetensors_state_dict(d), strict=False)
    secs = time.perf_counter() - t0
    with torch.no_grad():  # touch every weight: RSS counts memory actually in use (mmap pages too)
        for p in model.parameters():
            p.sum()
    inv = dict(model.named_buffers())["model.rotary_emb.inv_freq"]
    return {"seconds": secs, "peak_rss_mb": _rss_mb(), "added_mb": _rss_mb() - base,
            "inv_freq_sum": float(inv.double().sum())}


def _timed(fn, build, n: int) -> tuple[list, list]:
    """Interleave torch's to_empty (a) and the patched one (b) on fresh models from ``build``."""
    a, b = [], []
    gc.collect()
    gc.freeze()  # everything alive now is never scanned again: each collection below is cheap
    for i in range(n):
        order = ((fn[0], a), (fn[1], b)) if i % 2 else ((fn[1], b), (fn[0], a))
        for f, acc in order:
            m = build()
            gc.collect()
            gc.disable()
            t = time.process_time()  # CPU time of this process: robust to a busy machine
            f(m, device="cpu")
            acc.append(time.process_time() - t)
            gc.enable()
            del m
    gc.unfreeze()
    return a, b


def micro(n: int) -> list[tuple]:
    import torch
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    import hfpatches
    from hfpatches._models import smollm2_dir
    from hfpatches.demos.meta_buffers import dtype_kw

    class Block(nn.Module):
        def __init__(self, np_buffer: bool):
            super().__init__()
            self.lin = nn.Linear(64, 64)
            self.norm = nn.BatchNorm1d(64)   # 3 persistent buffers
            if np_buffer:
                self.register_buffer("freq", torch.arange(32.0), persistent=False)

    torch_to_empty = torch.nn.Module.to_empty
    hfpatches.apply(only=["meta_buffers"])
    patched = torch.nn.Module.to_empty
    assert patched is not torch_to_empty, hfpatches.status()["meta_buffers"].reason
    cfg = AutoConfig.from_pretrained(smollm2_dir())

    def smollm(include_buffers):
        def build():
            with init_empty_weights(include_buffers=include_buffers):
                return AutoModelForCausalLM.from_config(cfg, **dtype_kw(torch.float32))
        return build

    plain = [nn.Sequential(*[Block(False) for _ in range(1000)])]
    kept = [nn.Sequential(*[Block(True) for _ in range(1000)])]
    cases = [
        ("1000 blocks, 3000 persistent buffers, no non-persistent (fast path)", lambda: plain[0], n, True),
        ("1000 blocks, + 1000 non-persistent buffers (kept)", lambda: kept[0], n, False),
        ("SmolLM2-135M skeleton, rotary buffer real (kept)", smollm(False), max(5, n // 5), False),
        ("SmolLM2-135M skeleton, rotary buffer on meta (recomputed)", smollm(True), max(5, n // 5), False),
    ]
    rows = []
    for label, build, reps, targeted in cases:
        a, b = _timed((torch_to_empty, patched), build, reps)
        paired = statistics.median(y / x for x, y in zip(a, b))  # adjacent runs: robust to drift
        rows.append((label, min(a), min(b), paired, targeted))
    hfpatches.revert(["meta_buffers"])
    return rows


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--scenario":
        print("SCENARIO " + json.dumps(scenario(sys.argv[2])))
        return 0
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 101
    import torch
    import transformers

    print(f"meta_init benchmark: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{os.cpu_count()} CPUs")
    loads: dict = {}
    for _ in range(LOAD_RUNS):
        for name in ("eager", "meta_patched", "meta_unpatched"):
            out = subprocess.run([sys.executable, __file__, "--scenario", name], capture_output=True, text=True,
                                 check=True)
            r = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("SCENARIO "))[9:])
            if name not in loads or r["seconds"] < loads[name]["seconds"]:
                loads[name] = r
    e = loads["eager"]
    print(f"SmolLM2-135M load, best of {LOAD_RUNS} fresh processes each (RSS = peak after touching every "
          "weight; + = above the post-import baseline):")
    for name, label in (("eager", "from_pretrained (eager)"),
                        ("meta_patched", "init_empty_weights -> to_empty -> load, patched"),
                        ("meta_unpatched", "init_empty_weights -> to_empty -> load, unpatched")):
        r = loads[name]
        ok = "inv_freq == from_pretrained" if r["inv_freq_sum"] == e["inv_freq_sum"] else "inv_freq WRONG"
        print(f"  {label:<52} {r['seconds']:6.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB (+{r['added_mb']:.0f} MB)"
              f"  time {r['seconds'] / e['seconds']:.2f}x eager  [{ok}]")
    print(f"Module.to_empty, patched vs torch's (CPU time, interleaved; N={n}, SmolLM2 N={max(5, n // 5)}):")
    met = True
    for label, ta, tb, paired, targeted in micro(n):
        flag = ""
        if targeted:
            met &= paired <= TARGET
            flag = f"  target <= {TARGET}x: {'met' if paired <= TARGET else 'MISSED'}"
        print(f"  {label:<68} min: torch {ta * 1e3:6.2f} ms, patched {tb * 1e3:6.2f} ms ({tb / ta:.3f}x);"
              f" median of paired ratios {paired:.3f}x{flag}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
