"""Patched flash-attn ``BertModel.from_pretrained`` vs transformers ``BertModel.from_pretrained``.

Both load the packaged all-MiniLM-L6-v2 directory (fp32 safetensors, 22.7M parameters) on CPU, in
one run of this script, in fresh interpreters with the same imports done first (torch,
transformers, flash-attn's BERT; CPU stubs for flash-attn's CUDA-only modules when there is no
CUDA), one thread:

* time: one interpreter does one warm-up load of each, then N rounds of (transformers, patched),
  interleaved so that machine noise hits both alike; the medians are compared;
* memory: a separate fresh interpreter per side does one load; "load peak" is the process's peak
  RSS (``ru_maxrss``) minus its RSS just before the load, i.e. what the load itself needs on top of
  the imports. The process peak is printed too.

Targets (issue 3): time ratio <= 1.0x, load-peak RSS ratio <= 1.1x (no extra full copy of the
state dict). Usage: python benchmarks/flash_bert_load.py [N]
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = int(sys.argv[1]) if len(sys.argv) > 1 else 15

CHILD = r'''
import json, os, resource, sys, time
sys.path.insert(0, os.path.join(ROOT, "tests"))
from _stubs import install_flash_attn_cpu_stubs
install_flash_attn_cpu_stubs()                      # no-op where flash-attn's CUDA build is present
import torch, transformers
import flash_attn.models.bert as fb
import hfpatches
from hfpatches._models import minilm_dir
from hfpatches.demos.flash_attn_bert_prefix import flash_config

torch.set_num_threads(1)
src = minilm_dir()
with open(os.path.join(src, "model.safetensors"), "rb") as f:   # same page cache state for both sides
    f.read()
def patched_loader():
    rep = hfpatches.apply(only=["flash_attn_bert_prefix"])
    assert rep["flash_attn_bert_prefix"].outcome.value == "APPLIED", rep
    cfg = flash_config(src)
    return lambda: fb.BertModel.from_pretrained(src, cfg)

transformers.logging.set_verbosity_error()
loaders = {"transformers": lambda: transformers.BertModel.from_pretrained(src), "patched": patched_loader()}

def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024

out = {}
if MODE == "time":   # both sides in this one process, interleaved, so machine noise hits both alike
    times = {side: [] for side in loaders}
    for side in loaders:
        loaders[side]()
    for _ in range(N):
        for side, load in loaders.items():
            t0 = time.perf_counter(); m = load(); times[side].append(time.perf_counter() - t0); del m
    out["times"] = times
    # context: flash-attn's own path on its one working case (a bert.-prefixed checkpoint into
    # BertForPreTraining), unpatched vs patched, same checkpoint
    import tempfile
    from hfpatches.demos.flash_attn_bert_prefix import write_pretraining_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        pre = write_pretraining_checkpoint(src, os.path.join(tmp, "pre"))
        orig = hfpatches.get_original("flash_attn_bert_prefix").__get__(None, fb.BertForPreTraining)
        ctx = {"upstream": lambda: orig(pre, flash_config(src)),
               "patched": lambda: fb.BertForPreTraining.from_pretrained(pre, flash_config(src))}
        out["context"] = {}
        for side, load in ctx.items():
            load()
            ts = []
            for _ in range(max(3, N // 3)):
                t0 = time.perf_counter(); m = load(); ts.append(time.perf_counter() - t0); del m
            out["context"][side] = sorted(ts)[len(ts) // 2]
else:
    before = rss_kb()
    m = loaders[SIDE]()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.update(before_kb=before, peak_kb=peak, load_peak_kb=peak - before)
print("RESULT " + json.dumps(out))
'''


def child(side: str, mode: str) -> dict:
    code = f"ROOT = {ROOT!r}; SIDE = {side!r}; MODE = {mode!r}; N = {N}\n" + CHILD
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{side}/{mode} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> int:
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:  # (importing it needs the CUDA stubs on CPU)
        print("flash-attn is not installed here; nothing to benchmark")
        return 0
    timing = child("both", "time")
    t = {side: statistics.median(v) for side, v in timing["times"].items()}
    ctx = timing["context"]
    mem = {side: child(side, "memory") for side in ("transformers", "patched")}
    tr, mr = t["patched"] / t["transformers"], mem["patched"]["load_peak_kb"] / mem["transformers"]["load_peak_kb"]
    pr = mem["patched"]["peak_kb"] / mem["transformers"]["peak_kb"]
    print(f"flash_bert_load (all-MiniLM-L6-v2, CPU, 1 thread, median of {N}):")
    print(f"  time: transformers BertModel.from_pretrained {t['transformers'] * 1000:.0f} ms, "
          f"patched flash-attn BertModel.from_pretrained {t['patched'] * 1000:.0f} ms -> ratio {tr:.2f}x (target <= 1.0x)")
    print(f"  load peak RSS: transformers {mem['transformers']['load_peak_kb'] / 1024:.0f} MiB, "
          f"patched {mem['patched']['load_peak_kb'] / 1024:.0f} MiB -> ratio {mr:.2f}x (target <= 1.1x)")
    print(f"  process peak RSS: transformers {mem['transformers']['peak_kb'] / 1024:.0f} MiB, "
          f"patched {mem['patched']['peak_kb'] / 1024:.0f} MiB -> ratio {pr:.2f}x")
    print(f"  context, flash-attn's own path on its one working case (bert.-prefixed checkpoint into "
          f"BertForPreTraining): upstream {ctx['upstream'] * 1000:.0f} ms (random init, then copy), patched "
          f"{ctx['patched'] * 1000:.0f} ms -> ratio {ctx['patched'] / ctx['upstream']:.2f}x")
    ok = tr <= 1.0 and mr <= 1.1
    print("targets:", "met" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
