"""packed_attention_boundaries: peak memory and time of a packed (padding-free) batch with the patch
against the same sequences as a padded batch, and against the packed batch unpatched (whose
attention crosses sequences: the wrong result, shown as the cost upstream pays).

A small random Llama (hidden 256, 2 layers, 4 heads, vocab 1024, fp32), sdpa by default, four
sequences of 200/350/120/330 tokens: padded = 4 rows of 350 with an attention mask; packed = one
row of 1000 tokens with restarting ``position_ids`` and no mask. One training step (forward +
backward of the mean loss) per measurement. Each case runs in its own child process; peak memory
= the process's peak resident memory above the resident memory before the step (Linux ``VmHWM``
reset through ``/proc/self/clear_refs``), or ``max_memory_allocated`` with CUDA; time = median of
5 further steps (the peak is measured on the first step of a fresh process).

The mask the patch builds is (1, 1, N, N) for a packed row of N tokens, the mask upstream builds
for any unpadded row of N tokens under eager (and under sdpa with any padding); a padded batch of
B rows of L tokens has a (B, 1, L, L) mask. N * N > B * L * L whenever the sequences are long
compared with their number: the ratio says what that costs on the whole step.

Usage: .venvs/affected/bin/python benchmarks/packed_attention.py [--impl eager|sdpa] [--device cuda --dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
PID = "packed_attention_boundaries"
CASES = ("padded", "packed_patched", "packed_unpatched")
LENGTHS = (200, 350, 120, 330)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _model(impl: str, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def _batch(case: str, device: str):
    import torch

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 1024, (n,), generator=g) for n in LENGTHS]
    if case == "padded":
        L = max(LENGTHS)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        labels = ids.masked_fill(mask == 0, -100)
        b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    else:
        ids = torch.cat(seqs)[None]
        pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
        labels = ids.clone()
        labels[pos == 0] = -100
        b = {"input_ids": ids, "position_ids": pos, "labels": labels}
    return {k: v.to(device) for k, v in b.items()}


def child(case: str, impl: str, device: str, dtype_name: str) -> dict:
    import torch

    import hfpatches

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if case == "packed_patched":
        import transformers.modeling_utils  # noqa: F401
        rep = hfpatches.apply(only=[PID])[PID]
        assert rep.outcome.value == "APPLIED", rep
    model = _model(impl, device, dtype)
    batch = _batch(case, device)

    def step():
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        step()
        peak = _status("VmHWM") - base
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"case": case, "time_s": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="sdpa", choices=("eager", "sdpa"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.impl, a.device, a.dtype)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    res = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--impl", a.impl, "--device", a.device,
                              "--dtype", a.dtype], env=env, capture_output=True, text=True, check=True).stdout
        res[case] = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    import transformers

    print(f"transformers {transformers.__version__}, {a.impl}, {a.device} {a.dtype}, sequences {LENGTHS}")
    for case, r in res.items():
        print(f"  {case:17s} time {r['time_s'] * 1e3:8.1f} ms   peak {r['peak_bytes'] / 2**20:8.1f} MiB")
    p, q = res["packed_patched"], res["padded"]
    print(f"  packed patched / padded: time {p['time_s'] / q['time_s']:.2f}x, peak {_ratio(p, q)}")
    u = res["packed_unpatched"]
    print(f"  packed patched / packed unpatched (wrong): time {p['time_s'] / u['time_s']:.2f}x, "
          f"peak {_ratio(p, u)}")


def _ratio(a: dict, b: dict) -> str:
    return f"{a['peak_bytes'] / b['peak_bytes']:.2f}x" if b["peak_bytes"] > 0 else "n/a (no peak measured)"


if __name__ == "__main__":
    main()
