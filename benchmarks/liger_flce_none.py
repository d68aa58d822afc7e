"""liger_flce_reduction_none: peak memory of the patched ``reduction="none"`` path against torch's
unfused loss and Liger's ``mean`` path, and what the patch adds to ``mean``/``sum`` calls.

Memory (forward + backward of ``sum(loss * w)``, or of the mean loss), at a shape where the
logits dominate. Each case runs in its own child process: on a CPU with ``TRITON_INTERPRET=1``
(Liger's real kernel in Triton's interpreter) and the peak measured as the process's peak
resident memory above the resident memory before the step (Linux ``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; glibc returns these large blocks to the system on free, so the
peak is the live tensors' peak plus small allocator noise); with CUDA, ``max_memory_allocated``.
The CPU default shape (B*T=2048, H=256, V=32768, fp32: logits 256 MiB) is what the interpreter
runs in tens of seconds; a real training shape needs a GPU (``--bt 8192 --h 4096 --v 128256``).

Overhead: the replacement ``forward``/``backward`` hand every call with a reduction other than
"none" to the original after one comparison; timed on stub originals (no tensors, no Triton) so
the difference is what the patch adds per call (interleaved rounds of thread CPU time; per case the
minimum over rounds of the mean per call). Target: <= 1 us added per forward + backward.

Usage: .venvs/affected/bin/python benchmarks/liger_flce_none.py [--bt N --h N --v N] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import timeit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
PID = "liger_flce_reduction_none"
CASES = ("torch_unfused_none", "liger_mean", "liger_none_unpatched", "liger_none_patched")


# ----------------------------------------------------------------------------- memory (child)
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(case: str, bt: int, h: int, v: int, dtype_name: str) -> None:
    import torch
    import torch.nn.functional as F

    import hfpatches

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.set_num_threads(1)
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(bt, h, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, v, (bt,), generator=g).to(device)
    tw = torch.rand(bt, generator=g).to(device)
    if case == "liger_none_patched":
        rep = hfpatches.apply(only=[PID])[PID]
        assert rep.outcome.value in ("APPLIED", "NOT_AFFECTED"), rep

    def step():
        if case == "torch_unfused_none":
            (F.cross_entropy((x @ w.t()).float(), y, reduction="none") * tw).sum().backward()
        elif case == "liger_mean":
            LigerFusedLinearCrossEntropyLoss()(w, x, y).backward()
        else:
            (LigerFusedLinearCrossEntropyLoss(reduction="none")(w, x, y) * tw).sum().backward()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:   # reset VmHWM to the current RSS
            f.write("5")
        base = _rss("VmRSS")
    t0 = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss("VmHWM") - base
    wall = time.perf_counter() - t0
    print("RESULT " + json.dumps({"case": case, "peak": peak, "wall_s": wall, "device": device}))


def memory(bt: int, h: int, v: int, dtype: str) -> dict:
    import torch

    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, *extra])}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = {}
    for case in CASES:
        code = (f"import sys; sys.path.insert(0, {HERE!r}); import liger_flce_none as b; "
                f"b.child({case!r}, {bt}, {h}, {v}, {dtype!r})")
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=3600)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{case} failed:\n{proc.stderr[-2000:]}")
        out[case] = json.loads(lines[-1][7:])
    return out


# ----------------------------------------------------------------------------- overhead
def per_call_us(fn, number: int) -> float:
    return timeit.Timer(fn, timer=time.thread_time).timeit(number=number) / number * 1e6


def overhead(rounds: int = 30, number: int = 20000) -> dict:
    import inspect

    from hfpatches.patches.liger_flce_reduction_none import impl as P

    def original_forward(ctx, _input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                         lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                         return_z_loss=False):
        return _input

    def original_backward(ctx, grad_output, grad_output2):
        return grad_output

    params = inspect.signature(original_forward).parameters
    names = tuple(params)
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    fwd = P._make_forward(original_forward, names, defaults)
    bwd = P._make_backward(original_backward, None)

    class Ctx:   # a ctx of a mean/sum call: no saved options
        pass

    ctx = Ctx()
    args = (ctx, 1, 2, 3, None, None, -100, 0.0, 0.0, "mean", None, False)
    cases = {
        "forward unpatched": lambda: original_forward(*args),
        "forward patched": lambda: fwd(*args),
        "backward unpatched": lambda: original_backward(ctx, 1, None),
        "backward patched": lambda: bwd(ctx, 1, None),
    }
    best = {k: float("inf") for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            best[k] = min(best[k], per_call_us(fn, number))
    return {"forward_added_us": best["forward patched"] - best["forward unpatched"],
            "backward_added_us": best["backward patched"] - best["backward unpatched"], **best}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bt", type=int, default=2048)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    import importlib.metadata as md

    import torch

    print(f"liger-kernel {md.version('liger-kernel')}, torch {torch.__version__}, "
          f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU (Triton interpreter)'}")
    ov = overhead()
    print(f"mean/sum calls, added per call: forward {ov['forward_added_us']:.3f} us, backward "
          f"{ov['backward_added_us']:.3f} us (stub originals: {ov['forward unpatched']:.3f} / "
          f"{ov['backward unpatched']:.3f} us)")
    if a.skip_memory:
        return 0
    size = {"fp32": 4, "bf16": 2}[a.dtype]
    logits = a.bt * a.v * size
    print(f"memory, B*T={a.bt} H={a.h} V={a.v} {a.dtype}: full logits {logits / 2**20:.0f} MiB, "
          f"grad_weight {a.v * a.h * size / 2**20:.0f} MiB, grad_input {a.bt * a.h * size / 2**20:.1f} MiB")
    res = memory(a.bt, a.h, a.v, a.dtype)
    for case in CASES:
        r = res[case]
        print(f"  {case:<22} peak {r['peak'] / 2**20:8.1f} MiB  ({r['peak'] / logits:5.2f} x logits)  "
              f"{r['wall_s']:7.1f} s  [{r['device']}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
