"""``python -m hfpatches inspect`` reads headers only: time vs ``safetensors.torch.load_file``, RSS.

Generates a ~1 GB sharded safetensors checkpoint (a Llama-shaped layout: embeddings, 18 layers of
q/k/v/o + gate/up/down + two norms, fp32, 5 shards + ``model.safetensors.index.json``) in a temporary
directory, then in one run, in this process:

1. ``inspect`` - ``hfpatches._inspect.inspect_main`` exactly as ``python -m hfpatches inspect DIR``
   calls it (output discarded) - timed, with the RSS growth (VmRSS) around it;
2. ``safetensors.torch.load_file`` on every shard - timed, RSS growth shown for contrast. safetensors
   0.8's default backend memory-maps the file and returns lazily paged tensors (load_file itself
   reads no data), so three baselines are shown: ``backend="pread"`` (reads every byte: the target's
   baseline), the default mmap backend plus reading each tensor once (what using the weights costs),
   and the lazy default alone (for honesty: inspect must not be slower than that either).

The shards were just written, so every read comes from the page cache: the baselines are as fast as
they get. Targets (issue 7): inspect <= 5% of load_file's time, RSS growth < 50 MB. Also prints the wall time of
the real CLI in a fresh interpreter (start-up included) for reference. The temporary files are removed.
Usage: python benchmarks/inspect_checkpoint.py (named so that it does not shadow the stdlib inspect)
"""
import os
import sys

# This file is named like the stdlib's ``inspect`` (the name for it): keep its directory off
# sys.path so that torch & co. import the real one.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS, SHARDS = 1024, 2816, 32000, 18, 5


def rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def layout() -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER))]
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,))]


def generate(root: str) -> tuple[list[str], int]:
    """Write the shards one at a time (at most ~220 MB in memory) and the index."""
    import torch
    from safetensors.torch import save_file

    items = layout()
    total = sum(4 * _numel(s) for _, s in items)
    per = total / SHARDS
    shards, weight_map, cur, size = [], {}, {}, 0

    def flush():
        nonlocal cur, size
        name = f"model-{len(shards) + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file(cur, os.path.join(root, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(cur, name))
        shards.append(os.path.join(root, name))
        cur, size = {}, 0

    for key, shape in items:
        cur[key] = torch.ones(shape, dtype=torch.float32)
        size += 4 * _numel(shape)
        if size >= per and len(shards) < SHARDS - 1:
            flush()
    flush()
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return shards, total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> int:
    root = tempfile.mkdtemp(prefix="hfpatches-bench-inspect-")
    try:
        print(f"generating a sharded safetensors checkpoint in {root} ...", flush=True)
        shards, total = generate(root)
        import gc

        gc.collect()
        from hfpatches._inspect import inspect_main

        args = argparse.Namespace(checkpoint=root, model=None, config=None, json=False, debug=False)
        r0 = rss()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()) as out:
            rc = inspect_main(args)
        t_inspect = time.perf_counter() - t0
        grew_inspect = rss() - r0
        if rc != 0:
            print(out.getvalue())
            raise SystemExit(f"inspect failed with exit code {rc}")

        from safetensors.torch import load_file

        def timed_load(**kw):
            """(seconds, RSS growth, tensors) of load_file on every shard; ``touch``: read each tensor once."""
            touch = kw.pop("touch", False)
            r, t = rss(), time.perf_counter()
            loaded = [load_file(s, **kw) for s in shards]
            if touch:
                for d in loaded:
                    for x in d.values():
                        x.sum()
            out = (time.perf_counter() - t, rss() - r, sum(len(d) for d in loaded))
            del loaded
            gc.collect()
            return out

        # safetensors >= 0.7's default backend memory-maps: load_file itself reads no data (lazy)
        t_lazy, grew_lazy, n_tensors = timed_load()
        t_touch, grew_touch, _ = timed_load(touch=True)
        t_load, grew_load, _ = timed_load(backend="pread")

        t2 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "hfpatches", "inspect", root], capture_output=True, text=True)
        t_cli = time.perf_counter() - t2
        if proc.returncode != 0:
            raise SystemExit(f"CLI failed: {proc.stderr}")

        ratio = t_inspect / t_load
        mb = 1 << 20
        print(f"checkpoint: {total / 1e9:.2f} GB, {len(shards)} shards, {n_tensors} tensors (fp32)")
        print(f"inspect (in process, header-only): {t_inspect * 1000:.1f} ms, RSS growth {grew_inspect / mb:.1f} MB")
        print(f"load_file(backend='pread'), reads the data: {t_load * 1000:.1f} ms, RSS growth {grew_load / mb:.0f} MB")
        print(f"load_file() default mmap backend, lazy (no data read): {t_lazy * 1000:.1f} ms, "
              f"RSS growth {grew_lazy / mb:.0f} MB; + reading each tensor once: {t_touch * 1000:.1f} ms, "
              f"RSS growth {grew_touch / mb:.0f} MB")
        print(f"ratio inspect / load_file(pread): {ratio:.4f} ({ratio * 100:.2f}%); "
              f"vs mmap load + read: {t_inspect / t_touch * 100:.2f}%; vs lazy mmap load_file: "
              f"{t_inspect / t_lazy * 100:.0f}%")
        print(f"python -m hfpatches inspect (fresh interpreter, start-up included): {t_cli * 1000:.0f} ms")
        ok = ratio <= 0.05 and grew_inspect < 50 * mb
        print("targets (<= 5% of load_file, RSS growth < 50 MB):", "met" if ok else "MISSED")
        return 0 if ok else 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
