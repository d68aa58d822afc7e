"""``inspect CHECKPOINT`` without a model: what the checkpoint holds (counts, bytes, dtypes, prefixes)."""
from __future__ import annotations

import os

from ._checkpoint import _is_float, _peft_kind, _peft_names, read_checkpoint
from .peft_keys import PEFT_ROOT


def _top_prefix(key: str) -> str:
    if key.startswith(PEFT_ROOT):
        return PEFT_ROOT
    head, dot, _ = key.partition(".")
    return head + dot if dot else "(top level)"


def summarize(checkpoint) -> dict:
    """What ``inspect`` prints without ``--model``: tensors, dtypes, size, parameter count,
    key prefixes, format, PEFT names, metadata."""
    ck = read_checkpoint(checkpoint)
    dtypes: dict[str, dict] = {}
    prefixes: dict[str, int] = {}
    params = elements = size = 0
    unknown = []
    adapters = wrapped = 0
    peft = _peft_names(ck.tensors)
    for key, t in ck.tensors.items():
        d = dtypes.setdefault(t.dtype, {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        nb = t.nbytes
        if nb is None:
            unknown.append(t.dtype)
        else:
            d["bytes"] += nb
            size += nb
        elements += t.numel
        if _is_float(t.dtype):
            params += t.numel
        prefixes[_top_prefix(key)] = prefixes.get(_top_prefix(key), 0) + 1
        kind = _peft_kind(peft, key)
        if kind == "adapter":
            adapters += 1
        elif kind == "wrapped":
            wrapped += 1
    return {
        "checkpoint": ck.source, "format": ck.format, "files": ck.files, "tensors": len(ck.tensors),
        "parameters": params, "elements": elements, "bytes": size - ck.shared_bytes,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["tensors"])),
        "prefixes": dict(sorted(prefixes.items(), key=lambda kv: -kv[1])),
        "peft": {"adapter_weights": adapters, "wrapped_names": wrapped},
        "metadata": ck.metadata, "unknown_dtypes": sorted(set(unknown)),
    }


def _human_bytes(size: int) -> str:
    n = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{size:,} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.1f}{unit})"
    return f"{n:,}"


def render_summary(s: dict) -> str:
    files = s["files"]
    fmt = s["format"]
    if len(files) > 1:
        fmt += f": {len(files) - 1} shards + {os.path.basename(files[0])}"
    lines = [
        ("checkpoint", s["checkpoint"]),
        ("format", fmt),
        ("tensors", f"{s['tensors']:,} (" + ", ".join(f"{d} {v['tensors']}" for d, v in s["dtypes"].items()) + ")"),
        ("parameters", _human_count(s["parameters"]) + " floating-point elements"),
        ("size", _human_bytes(s["bytes"]) + " (" + ", ".join(f"{d} {_human_bytes(v['bytes'])}"
                                                            for d, v in s["dtypes"].items()) + ")"),
        ("prefixes", ", ".join(f"{p} {n}" for p, n in s["prefixes"].items())),
    ]
    peft = s["peft"]
    if peft["adapter_weights"] or peft["wrapped_names"]:
        lines.append(("peft", f"{peft['adapter_weights']} adapter weights, {peft['wrapped_names']} PEFT-wrapped "
                              "names: translate with hfpatches.peft_state_dict before a plain load"))
    if s["metadata"]:
        lines.append(("metadata", ", ".join(f"{k}={v}" for k, v in s["metadata"].items())))
    if s["unknown_dtypes"]:
        lines.append(("note", f"size leaves out tensors of dtype {', '.join(s['unknown_dtypes'])} (unknown width)"))
    return "\n".join(f"{k:<11} {v}" for k, v in lines)


