"""What a load *will* do, key by key, before any GPU hour is spent on random weights.

``explain_load(model, checkpoint) -> LoadReport``: every key of the model (parameters, persistent
and non-persistent buffers) and every key of the checkpoint ends up in exactly one class, with a
reason and, where there is one, the fix:

==============================  ===========================================================
matched                         same name, shape and dtype
dtype-differs                   same name and shape; the load casts
prefix-mismatch                 the same key under an extra / a missing prefix (``bert.``,
                                ``model.``, ``module.``...): says which prefix to add or strip
                                and whether transformers' ``from_pretrained`` does it itself
peft-wrapped                    PEFT names (``base_model.model.``, ``.base_layer.``, LoRA
                                adapter weights): see ``hfpatches.peft_state_dict``
shape-mismatch                  both shapes, with the fix (``resize_token_embeddings``,
                                ``max_position_embeddings``, ``ignore_mismatched_sizes``)
tied                            not in the checkpoint, but the same tensor as a key that is
missing-new-head                a head (or pooler) the checkpoint never had: expected
missing-backbone                a backbone weight the checkpoint lacks: a real problem
missing-non-persistent-buffer   never in a state dict; ``__init__`` computes it (but see
                                ``meta_buffers``); a checkpoint copy of it is ignored
unexpected-head                 a head (or pooler) the model lacks: dropped
unexpected                      a checkpoint weight with no place in the model's backbone
                                (more layers than the config? another architecture?)
==============================  ===========================================================

``unexpected`` is one class more than the issue listed: calling extra encoder layers or another
architecture's backbone an "unexpected head" would be wrong.

``LoadReport.ok``: no ``missing-backbone`` and no ``shape-mismatch``. Prefix and PEFT names do not
make a report bad (the weights are there, the report says how to map them), but the verdict line
says when ``from_pretrained`` itself will *not* translate them.

Reading is header-only: safetensors through the ``safetensors`` library's ``safe_open`` (keys,
shapes, dtypes and metadata from the header; the file is memory-mapped, no tensor data is read),
sharded indexes checked shard by shard, ``.bin`` only through ``torch.load(weights_only=True,
mmap=True)`` (a pickle that is not plain tensors is refused with a clear message).

``python -m hfpatches inspect CHECKPOINT [--model dotted.Class] [--config DIR] [--json] [--debug]``
calls :func:`inspect_main`. Exit codes: 0 fine, 1 the load would leave backbone weights missing or
misshaped (``--model``), 2 bad input (one line on stderr naming the file; traceback with --debug).
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
from typing import Any

from . import _bert_checkpoint as bc
from .errors import CheckpointError, LoadError

KINDS = ("matched", "dtype-differs", "prefix-mismatch", "peft-wrapped", "shape-mismatch", "tied",
         "missing-new-head", "missing-backbone", "missing-non-persistent-buffer", "unexpected-head",
         "unexpected")
BAD_KINDS = ("missing-backbone", "shape-mismatch")
SHOW = 5  # keys listed per group in the table
HF_DOES_IT = "from_pretrained does this itself"  # in a prefix fix: transformers maps base_model_prefix

from ._files import ADAPTER_NAME, BIN_INDEX, BIN_NAME, SAFE_INDEX, SAFE_NAME  # noqa: E402

LOOKED_FOR = (SAFE_NAME, SAFE_INDEX, BIN_NAME, BIN_INDEX, ADAPTER_NAME)

# safetensors dtype codes -> torch names, and bytes per element
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
              "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
              "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
              "BOOL": ("bool", 1), "C64": ("complex64", 8)}
_FLOAT = ("float", "bfloat", "complex")

# PEFT: wrapped layers keep their original weight under ``.base_layer.``; the whole model sits
# under ``base_model.model.``; adapter weights have no place in the plain model.
from .peft_keys import PEFT_ROOT  # noqa: E402  (one source: where PEFT puts the model)


def _peft_names(keys) -> dict:
    """Every PEFT name among ``keys``, classified by :func:`hfpatches.peft_keys.parse_peft_keys`
    (the one parser of PEFT key names; it needs the whole key set to tell a tuner's
    ``base_layer`` from a layer that is really called so)."""
    from .peft_keys import parse_peft_keys

    return {e.key: e for e in parse_peft_keys(keys) if e.kind != "outside"}


def _peft_kind(names: dict, key: str) -> str | None:
    """``"adapter"``: no place in the plain model (tuner weights; the trained ``modules_to_save``
    copies, which only a merge puts into the plain model); ``"wrapped"``: a PEFT name of a plain
    weight (under ``base_model.model.``, ``.base_layer.``, ``.original_module.``); None: not PEFT."""
    e = names.get(key)
    if e is None:
        return None
    return "adapter" if e.kind in ("adapter", "copy") else "wrapped"


def _peft_normal(names: dict, key: str) -> str:
    """PEFT name -> the plain model's name (what ``peft_state_dict(sd, to="plain")`` gives it)."""
    e = names.get(key)
    return e.plain if e is not None and e.kind in ("base", "original") else key


def _is_float(dtype: str | None) -> bool:
    return bool(dtype) and str(dtype).startswith(_FLOAT)


def _dtype_name(dtype) -> str:
    """``torch.bfloat16`` / ``"BF16"`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    s = str(dtype)
    if s in _ST_DTYPES:
        return _ST_DTYPES[s][0]
    return s[6:] if s.startswith("torch.") else s


def _itemsize(dtype: str) -> int | None:
    for name, size in _ST_DTYPES.values():
        if name == dtype:
            return size
    return None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ============================================================================ reading
class TensorInfo:
    """Shape and dtype of one checkpoint tensor, and the file it lives in (no data)."""

    __slots__ = ("shape", "dtype", "file")

    def __init__(self, shape, dtype, file: str | None = None) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = _dtype_name(dtype)
        self.file = file

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int | None:
        size = _itemsize(self.dtype)
        return None if size is None else size * self.numel

    def __repr__(self) -> str:
        return f"TensorInfo({list(self.shape)}, {self.dtype})"


class Checkpoint:
    """A checkpoint's keys, shapes and dtypes, read without tensor data."""

    def __init__(self, source: str, fmt: str, files: list[str], tensors: dict[str, TensorInfo],
                 metadata: dict | None = None, shared_bytes: int = 0) -> None:
        self.source = source          # what the user passed (path, or "state dict")
        self.format = fmt             # safetensors | safetensors (sharded) | bin | bin (sharded) | state dict
        self.files = files
        self.tensors = tensors
        self.metadata = metadata or {}
        self.shared_bytes = shared_bytes  # bytes of .bin tensors that share storage with another key
        self.config_path: str | None = None   # the checkpoint's own config.json, when it has one
        self.config: dict | None = None
        self.data = None                      # the mapping itself, for a state dict

    def describe(self) -> str:
        n = len(self.files)
        files = f", {n} files" if n > 1 else ""
        return f"{self.source} ({self.format}{files}, {len(self.tensors)} tensors)"


def read_checkpoint(checkpoint) -> Checkpoint:
    """``checkpoint``: a directory, a ``.safetensors`` / ``.bin`` file, a sharded index ``.json``,
    a state dict (mapping of names to tensors) or an existing :class:`Checkpoint`.
    Raises :class:`~hfpatches.errors.CheckpointError` with the file and what is wrong."""
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if hasattr(checkpoint, "items") and not isinstance(checkpoint, (str, bytes, os.PathLike)):
        return _from_state_dict(checkpoint)
    path = os.fspath(checkpoint)
    ck = _read_path(path)
    ck.config_path, ck.config = _own_config(path)
    return ck


def _own_config(path: str) -> tuple[str | None, dict | None]:
    """The checkpoint's config.json (in the directory, or beside the file), parsed; else Nones."""
    cfg = os.path.join(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        if not stat.S_ISREG(os.stat(cfg).st_mode):
            return None, None
        with open(cfg, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None, None
    return (cfg, data) if isinstance(data, dict) else (None, None)


def _read_path(path: str) -> Checkpoint:
    if os.path.isdir(path):
        found = [n for n in LOOKED_FOR if os.path.isfile(os.path.join(path, n))]
        if not found:
            loose = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".safetensors.index.json")))
            if len(loose) == 1:
                found = loose
            else:
                what = f"several candidates: {', '.join(loose)}; pass one of them" if loose else \
                    f"looked for {', '.join(LOOKED_FOR)}"
                via = f" (a symlink to the directory {os.path.realpath(path)})" if os.path.islink(path) else ""
                raise CheckpointError(f"{path}{via}: no weights found ({what})")
        return _read_file(os.path.join(path, found[0]), source=path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    return _read_file(path, source=path)


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _check_regular(path: str, what: str = "a weights file") -> None:
    """Refuse anything that is not a regular file before opening it: reading a FIFO blocks forever,
    a device never ends, a directory is not "truncated". Symlinks are followed and named."""
    via = f" (a symlink to {os.path.realpath(path)})" if os.path.islink(path) else ""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file{via or ''}; expected {what}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({_one_line(e)}); expected {what}") from e
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path}: is a directory{via}, not {what}; pass the directory that holds the "
                              "weights, or the weights file itself")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise CheckpointError(f"{path}: is {kind}{via}, not a regular file; expected {what} (hfpatches does not "
                              "read from pipes or devices: it could block forever). Copy the checkpoint to a file")


def _read_file(path: str, source: str) -> Checkpoint:
    _check_regular(path, "a sharded-checkpoint index" if path.endswith(".json") else "a weights file")
    if path.endswith(".json"):
        return _read_index(path, source)
    if path.endswith(".safetensors"):
        tensors, meta = _read_safetensors(path)
        return Checkpoint(source, "safetensors", [path], tensors, meta)
    tensors, shared = _read_bin(path)
    return Checkpoint(source, "bin", [path], tensors, shared_bytes=shared)


def _read_safetensors(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Keys, shapes and dtypes from the header (``safe_open`` memory-maps the file and validates
    the header against the file size; no tensor is materialised)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = dict(f.metadata() or {})
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = TensorInfo(sl.get_shape(), sl.get_dtype(), path)
        return out, meta
    except Exception as e:  # SafetensorError, OSError
        size = os.path.getsize(path) if os.path.exists(path) else 0
        hint = _safetensors_hint(path, size)
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)}); {hint}") from e


def _safetensors_hint(path: str, size: int) -> str:
    """For the error message only: how far the header says the data reaches (the documented
    layout: an 8-byte little-endian header length, then a JSON header)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if 0 < n <= min(size - 8, 100 << 20):
                header = json.loads(fh.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:
                    return (f"the file has {size:,} bytes but its header describes {8 + n + end:,}: it is "
                            "truncated (an interrupted download or copy); fetch it again")
    except Exception:  # noqa: BLE001 - only a hint
        pass
    return f"the file has {size:,} bytes: truncated or not safetensors at all; fetch it again"


def _read_index(path: str, source: str) -> Checkpoint:
    try:
        with open(path) as fh:
            index = json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable sharded-checkpoint index ({_one_line(e)})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no 'weight_map' in it (not a sharded-checkpoint index)")
    base = os.path.dirname(os.path.abspath(path))
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    for shard, keys in shards.items():
        what = f"{path}: names {shard!r} as the shard of {len(keys)} tensors (e.g. {keys[0]!r})"
        if not isinstance(shard, str) or os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(f"{what}; expected a file name in {base}: a shard outside the checkpoint "
                                  "directory is refused")
        if os.path.realpath(os.path.join(base, shard)) == os.path.realpath(path):
            raise CheckpointError(f"{what}: that is the index itself; expected .safetensors or .bin shards. The "
                                  "index is corrupt: fetch it again")
        if not shard.endswith((".safetensors", ".bin")):
            raise CheckpointError(f"{what}: not a .safetensors or .bin file; expected weight shards. The index is "
                                  "corrupt: fetch it again")
    missing = [s for s in shards if not os.path.lexists(os.path.join(base, s))]
    if missing:
        n = sum(len(shards[s]) for s in missing)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: names shard {missing[0]!r}{more}, which does not exist in {base} "
                              f"({n} tensors would be missing); fetch the missing shard(s) again")
    tensors: dict[str, TensorInfo] = {}
    meta: dict = {}
    shared = 0
    safe = all(s.endswith(".safetensors") for s in shards)
    for shard, keys in shards.items():
        file = os.path.join(base, shard)
        _check_regular(file, f"a shard named by {path}")
        if shard.endswith(".safetensors"):
            got, m = _read_safetensors(file)
            meta = meta or m
        else:
            got, sh = _read_bin(file)
            shared += sh
        absent = [k for k in keys if k not in got]
        if absent:
            raise CheckpointError(f"{path}: says {absent[0]!r} is in {shard!r}, but {file} does not contain it "
                                  f"({len(absent)} such keys); the index and the shards do not belong together")
        tensors.update(got)
    fmt = "safetensors (sharded)" if safe else "bin (sharded)"
    return Checkpoint(source, fmt, [path] + [os.path.join(base, s) for s in shards], tensors, meta, shared)


def _read_bin(path: str) -> tuple[dict[str, TensorInfo], int]:
    """A ``torch.save`` file: only with ``weights_only=True`` (``mmap=True``: the tensors stay on
    disk), and only a flat mapping of names to tensors."""
    import pickle
    import zipfile

    import torch

    zipped = zipfile.is_zipfile(path)
    try:
        # mmap needs the zip format (torch >= 1.6 writes it); a legacy file is read with
        # weights_only=True but without mmap.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as e:
        what = _refusal(str(e))
        raise CheckpointError(f"{path}: not a plain-tensor checkpoint: {what}. hfpatches only reads .bin files with "
                              "torch.load(weights_only=True); if you trust the file, re-save just its state dict "
                              "(or convert it to safetensors)") from e
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_one_line(e)[:300]}); "
                              "truncated, or not written by torch.save") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    tensors: dict[str, TensorInfo] = {}
    seen: set = set()
    shared = 0
    for key, val in obj.items():
        if not isinstance(val, torch.Tensor):
            hint = " (a training checkpoint? its model weights are usually under one key, e.g. 'model' or " \
                   "'state_dict': save that dict alone)" if isinstance(val, dict) else ""
            raise CheckpointError(f"{path}: {key!r} is not a tensor ({type(val).__name__}): not a plain state "
                                  f"dict{hint}")
        info = TensorInfo(val.shape, val.dtype, path)
        ident = (val.untyped_storage().data_ptr(), val.storage_offset(), info.shape)
        if ident in seen and info.nbytes:
            shared += info.nbytes
        seen.add(ident)
        tensors[str(key)] = info
    return tensors, shared


# torch's words for the global it refused: "Unsupported global: GLOBAL posix.system was not an allowed
# global" (torch 2.4-2.6), "Trying to load unsupported GLOBAL posix.system whose module posix is blocked"
# (newer, e.g. 2.13); the generic paragraphs around them say nothing about this file
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.I)
_TORCH_GENERIC = ("weights only load failed", "(1)", "(2)", "check the documentation of torch.load")


def _refusal(text: str) -> str:
    """What ``torch.load(weights_only=True)`` refused, in torch's own words (the culprit kept)."""
    kept = [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.strip().lower().startswith(_TORCH_GENERIC)]
    said = _one_line(" ".join(kept) or text).rstrip(".")
    if len(said) > 600:
        said = said[:600] + " ..."
    m = _REFUSED_GLOBAL.search(text)
    head = f"it pickles {m.group(1)}; " if m else ""
    return f"{head}torch.load(weights_only=True) refused it: {said}"


def _from_state_dict(sd) -> Checkpoint:
    tensors = {}
    for key, val in sd.items():
        shape, dtype = getattr(val, "shape", None), getattr(val, "dtype", None)
        if shape is None or dtype is None:
            raise CheckpointError(f"state dict: {key!r} is not a tensor ({type(val).__name__})")
        tensors[str(key)] = TensorInfo(shape, dtype)
    ck = Checkpoint("state dict", "state dict", [], tensors)
    ck.data = sd
    return ck


# ============================================================================ summary (no model)
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


# ============================================================================ the model side
class _ModelView:
    """The keys a load fills (``state_dict``), the non-persistent buffers, which keys are one
    tensor (tied), and which keys belong to a head rather than the backbone."""

    def __init__(self, model, base_prefix: str | None = None) -> None:
        self.name = type(model).__name__
        sd = model.state_dict(keep_vars=True)  # the real Parameter objects: identity tells ties
        self.keys = {k: (tuple(v.shape), _dtype_name(v.dtype)) for k, v in sd.items()}
        self.nonpersistent = {}
        for k, b in model.named_buffers(remove_duplicate=False):
            if k not in sd:
                self.nonpersistent[k] = (tuple(b.shape), _dtype_name(b.dtype))
        groups: dict[int, list[str]] = {}
        for k, v in sd.items():
            groups.setdefault(id(v), []).append(k)
        self.aliases = {k: [o for o in g if o != k] for g in groups.values() if len(g) > 1 for k in g}
        self.modules = {n for n, _ in model.named_modules()}
        prefix = getattr(model, "base_model_prefix", "") or ""
        base = getattr(model, prefix, None) if prefix else None
        self.base_prefix = prefix + "." if base is not None and base is not model and hasattr(base, "state_dict") else ""
        if base_prefix is not None:
            self.base_prefix = base_prefix
        self.hf_prefix = prefix  # what transformers' from_pretrained adds / strips by itself
        self.config = getattr(model, "config", None)

    def is_head(self, key: str) -> bool:
        """A task head (anything outside the base model) or the optional pooling layer."""
        if "pooler" in key.split("."):
            return True
        return bool(self.base_prefix) and not key.startswith(self.base_prefix)

    def in_backbone_module(self, key: str) -> bool:
        """Does ``key`` sit inside a backbone submodule the model has (e.g. ``encoder.layer``)?"""
        parts = key.split(".")[:-1]
        root = self.base_prefix.rstrip(".")
        for i in range(len(parts), 0, -1):
            mod = ".".join(parts[:i])
            if mod in self.modules and mod != root:
                return not self.is_head(key)
        return False


# ============================================================================ entries and report
class LoadEntry:
    """One class decision: a model key and/or a checkpoint key, why, and the fix."""

    __slots__ = ("kind", "model_key", "checkpoint_key", "model_shape", "checkpoint_shape", "model_dtype",
                 "checkpoint_dtype", "reason", "fix", "detail")

    def __init__(self, kind, model_key=None, checkpoint_key=None, *, model=None, ckpt=None, reason="", fix=None,
                 detail=None) -> None:
        assert kind in KINDS, kind
        self.kind, self.model_key, self.checkpoint_key = kind, model_key, checkpoint_key
        self.model_shape: Any
        self.model_dtype: Any
        self.checkpoint_shape: Any
        self.checkpoint_dtype: Any
        self.model_shape, self.model_dtype = model if model else (None, None)
        self.checkpoint_shape, self.checkpoint_dtype = ckpt if ckpt else (None, None)
        self.reason, self.fix, self.detail = reason, fix, detail

    def label(self) -> str:
        m, c = self.model_key, self.checkpoint_key
        text = f"{c} -> {m}" if m and c and m != c else (m or c)
        return text + (f"  ({self.detail})" if self.detail else "")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__slots__}
        for k in ("model_shape", "checkpoint_shape"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    def __repr__(self) -> str:
        return f"LoadEntry({self.kind}, {self.label()!r})"


class LoadReport:
    """Every key of a load, classified. ``print(report)``: counts first, then each class with its
    reason, fix and up to ``SHOW`` keys. ``.ok``, ``.to_json()``, ``.raise_if_bad()``."""

    def __init__(self, model: str, checkpoint: str, entries: list[LoadEntry], notes: list[str] | None = None,
                 source: str = "header", incompatible: list[str] | None = None) -> None:
        self.model = model
        self.checkpoint = checkpoint
        self.entries = entries
        self.notes = notes or []
        self.incompatible = incompatible or []  # the checkpoint is another architecture: why, and the fix
        self.source = source  # "header": explain_load; "loading_info": from a finished from_pretrained

    # -- queries ---------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        c = {k: 0 for k in KINDS}
        for e in self.entries:
            c[e.kind] += 1
        return {k: n for k, n in c.items() if n}

    def count(self, kind: str) -> int:
        return sum(1 for e in self.entries if e.kind == kind)

    def by_kind(self, kind: str) -> list[LoadEntry]:
        if kind not in KINDS:
            raise ValueError(f"unknown class {kind!r}; classes: {', '.join(KINDS)}")
        return [e for e in self.entries if e.kind == kind]

    def model_keys(self, kind: str) -> set[str]:
        return {e.model_key for e in self.by_kind(kind) if e.model_key}

    def checkpoint_keys(self, kind: str) -> set[str]:
        return {e.checkpoint_key for e in self.by_kind(kind) if e.checkpoint_key}

    def kind_of(self, key: str) -> str:
        """The class of a model or checkpoint key (KeyError if neither side has it)."""
        for e in self.entries:
            if key in (e.model_key, e.checkpoint_key):
                return e.kind
        raise KeyError(key)

    @property
    def problems(self) -> list[LoadEntry]:
        return [e for e in self.entries if e.kind in BAD_KINDS]

    @property
    def ok(self) -> bool:
        """The checkpoint is this architecture, no backbone weight missing, no shape mismatch."""
        return not self.problems and not self.incompatible

    def untranslated(self) -> list[LoadEntry]:
        """Keys that ``from_pretrained`` will not map by itself (PEFT names, foreign prefixes)."""
        return [e for e in self.entries if e.kind in ("peft-wrapped", "prefix-mismatch")
                and e.model_key and HF_DOES_IT not in (e.fix or "")]

    # -- output ----------------------------------------------------------------------------
    def verdict(self) -> str:
        if not self.ok:
            parts = ["the checkpoint is refused for this model (see 'refused')"] if self.incompatible else []
            if self.count("missing-backbone"):
                parts.append(f"{self.count('missing-backbone')} backbone weights missing (they would stay random)")
            if self.count("shape-mismatch"):
                parts.append(f"{self.count('shape-mismatch')} shapes differ")
            return "NOT OK: " + ", ".join(parts)
        todo = self.untranslated()
        if todo:
            return (f"ok once keys are translated: {len(todo)} model weights sit under names from_pretrained "
                    "does not map by itself (see peft-wrapped / prefix-mismatch)")
        return "ok"

    def to_dict(self) -> dict:
        return {"model": self.model, "checkpoint": self.checkpoint, "source": self.source, "ok": self.ok,
                "verdict": self.verdict(), "incompatible": self.incompatible, "counts": self.counts, "notes": self.notes,
                "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, **kw) -> str:
        kw.setdefault("indent", 2)
        return json.dumps(self.to_dict(), **kw)

    def _groups(self) -> list[tuple[str, str, list[LoadEntry]]]:
        groups: dict[tuple, list[LoadEntry]] = {}
        for e in self.entries:
            groups.setdefault((KINDS.index(e.kind), e.reason), []).append(e)
        return [(KINDS[k], r, es) for (k, r), es in sorted(groups.items(), key=lambda kv: kv[0][0])]

    def __str__(self) -> str:
        counts = self.counts
        w = max([len("class")] + [len(k) for k in counts])
        lines = [f"{self.model} <- {self.checkpoint}", f"verdict: {self.verdict()}"]
        lines += [f"refused: {why}" for why in self.incompatible]
        lines += ["", f"{'class':<{w}}  {'keys':>6}", f"{'-' * w}  {'-' * 6}"]
        lines += [f"{k:<{w}}  {n:>6}" for k, n in counts.items()]
        for note in self.notes:
            lines.append(f"note: {note}")
        for kind, reason, es in self._groups():
            if kind == "matched":
                continue
            fixes = {e.fix for e in es}
            shared = len(fixes) == 1
            lines += ["", f"{kind} ({len(es)}): {reason}"]
            if shared and es[0].fix:
                lines.append(f"  fix: {es[0].fix}")
            for e in es[:SHOW]:
                lines.append(f"  {e.label()}" + (f"; fix: {e.fix}" if e.fix and not shared else ""))
            if len(es) > SHOW:
                lines.append(f"  ... and {len(es) - SHOW} more")
        return "\n".join(lines)

    __repr__ = __str__

    def error_message(self) -> str:
        parts = [f"{self.model} <- {self.checkpoint}: {self.verdict()}."]
        parts += [f"Refused: {why}" for why in self.incompatible]
        miss = self.by_kind("missing-backbone")
        if miss:
            keys = ", ".join(e.model_key for e in miss[:SHOW]) + (f" (+{len(miss) - SHOW} more)" if len(miss) > SHOW else "")
            parts.append(f"Missing: {keys}.")
        for e in self.by_kind("shape-mismatch")[:SHOW]:
            parts.append(f"{e.model_key or e.checkpoint_key}: checkpoint {list(e.checkpoint_shape or ())}, model "
                         f"{list(e.model_shape or ())}" + (f"; fix: {e.fix}." if e.fix else "."))
        parts += [f"Note: {n}" for n in self.notes]
        parts.append("print(err.report) explains every key.")
        return " ".join(parts)

    def raise_if_bad(self) -> "LoadReport":
        """Raise :class:`~hfpatches.errors.LoadError` (carrying this report) unless ``.ok``."""
        if not self.ok:
            raise LoadError(self.error_message(), self)
        return self

    # -- from a finished transformers load ----------------------------------------------------
    @classmethod
    def from_loading_info(cls, model, info: dict, checkpoint: str = "?") -> "LoadReport":
        """Classify what ``from_pretrained(..., output_loading_info=True)`` reported (public API,
        both transformers 4.x and 5.x forms). Sizes re-initialised by ``ignore_mismatched_sizes``
        count as a new head when they are in a head, as ``shape-mismatch`` in the backbone."""
        view = _ModelView(model)
        missing = {str(k) for k in info.get("missing_keys") or ()}
        unexpected = {str(k) for k in info.get("unexpected_keys") or ()}
        mism: dict[str, tuple] = {}
        for item in info.get("mismatched_keys") or ():
            if isinstance(item, (tuple, list)):
                key, shapes = str(item[0]), tuple(tuple(s) for s in item[1:3])
            else:
                key, shapes = str(item), ()
            mism[_in_model(view, key)] = shapes
        entries: list[LoadEntry] = []
        for key, (shape, dtype) in view.keys.items():
            if key in mism:
                shapes = mism.pop(key)
                ck_shape = shapes[0] if shapes else None
                detail = f"checkpoint {list(ck_shape)}, model {list(shape)}" if ck_shape else f"model {list(shape)}"
                if view.is_head(key):
                    entries.append(LoadEntry("missing-new-head", key, model=(shape, dtype), detail=detail,
                                             reason="head re-initialised because its size differs "
                                                    "(ignore_mismatched_sizes=True)"))
                else:
                    entries.append(LoadEntry("shape-mismatch", key, key, model=(shape, dtype), ckpt=(ck_shape, None),
                                             reason="backbone weight re-initialised because its size differs",
                                             fix=_shape_fix(view, key, ck_shape, shape), detail=detail))
            elif key in missing:
                missing.discard(key)
                entries.append(_missing_entry(view, key, missing))
            else:
                entries.append(LoadEntry("matched", key, key, model=(shape, dtype), reason="loaded"))
        for key, (shape, dtype) in view.nonpersistent.items():
            entries.append(_buffer_entry(key, (shape, dtype), None))
        for key in sorted(missing):  # reported missing but not a state-dict key of the model
            entries.append(LoadEntry("missing-new-head" if view.is_head(key) else "missing-backbone", key,
                                     reason="reported missing by from_pretrained"))
        for key, shapes in mism.items():
            entries.append(LoadEntry("shape-mismatch", key, key, reason="reported by from_pretrained",
                                     detail=str(shapes) if shapes else None))
        loaded = sum(1 for e in entries if e.kind == "matched")
        # nothing loaded: the unexpected keys are another architecture's backbone, not heads
        dominant = _dominant_prefix(dict.fromkeys(unexpected)) if not loaded else None
        peft = _peft_names(unexpected)
        entries += [_unexpected_entry(view, k, _in_model(view, k), None, dominant, peft) for k in sorted(unexpected)]
        return cls(view.name, checkpoint, entries, _notes(view, loaded, sorted(unexpected)), source="loading_info")


def _in_model(view: _ModelView, key: str) -> str:
    """A key as transformers may report it (checkpoint or model naming) -> the model's name."""
    if key in view.keys or not view.hf_prefix:
        return key
    p = view.hf_prefix + "."
    if key.startswith(p) and key[len(p):] in view.keys:
        return key[len(p):]
    if p + key in view.keys:
        return p + key
    return key


# ---------------------------------------------------------------------------- classification
PEFT_FIX = ("hfpatches.peft_state_dict translates PEFT names to the base model's (or peft's "
            "merge_and_unload() for a plain model with the adapter merged)")
NONPERSISTENT_FIX = ("after init_empty_weights()/to_empty() it is uninitialised memory: "
                     "hfpatches.materialize(model) (patch meta_buffers)")


def _buffer_entry(key, model_info, ckpt_key, ckpt=None) -> LoadEntry:
    reason = "non-persistent buffer: never in a state dict, the model's __init__ computes it"
    if ckpt_key:
        reason += "; the checkpoint's copy is ignored"
    return LoadEntry("missing-non-persistent-buffer", key, ckpt_key, model=model_info, ckpt=ckpt, reason=reason,
                     fix=NONPERSISTENT_FIX)


def _missing_entry(view: _ModelView, key: str, missing: set[str]) -> LoadEntry:
    info = view.keys.get(key)
    tied = [a for a in view.aliases.get(key, ()) if a not in missing]
    if tied:
        return LoadEntry("tied", key, model=info, reason="the same tensor as another key: set when that one loads",
                         detail=f"tied to {tied[0]}")
    if view.is_head(key):
        return LoadEntry("missing-new-head", key, model=info,
                         reason="a head (or pooler) the checkpoint does not have: freshly initialised, "
                                "expected when fine-tuning")
    return LoadEntry("missing-backbone", key, model=info,
                     reason="backbone weight absent from the checkpoint: it would stay at its random initialisation",
                     fix="load the checkpoint this model was trained from, or a config that matches it")


def _unexpected_entry(view: _ModelView, ckpt_key: str, model_space: str, info, dominant: str | None,
                      peft: dict) -> LoadEntry:
    kind = _peft_kind(peft, ckpt_key)
    if kind == "adapter":
        return LoadEntry("peft-wrapped", None, ckpt_key, ckpt=info,
                         reason="PEFT adapter weight (or a trained modules_to_save copy): no place in the plain model",
                         fix="merge it (peft: model.merge_and_unload(), or hfpatches.peft_state_dict(sd, to='plain', "
                             "merge=True)) or load the model as a PeftModel")
    if kind == "wrapped":
        return LoadEntry("peft-wrapped", None, ckpt_key, ckpt=info,
                         reason="PEFT-wrapped name (base_model.model. / .base_layer.): no model key has this name",
                         fix=PEFT_FIX)
    head = "pooler" in model_space.split(".")
    backbone = not head and (view.in_backbone_module(model_space) or (dominant is not None and ckpt_key.startswith(dominant)))
    if backbone:
        return LoadEntry("unexpected", None, ckpt_key, ckpt=info,
                         reason="checkpoint weight with no place in the model: dropped (more layers than the "
                                "config? another architecture?)")
    return LoadEntry("unexpected-head", None, ckpt_key, ckpt=info,
                     reason="a head (or pooler) the model does not have: dropped")


def _shape_fix(view: _ModelView, key: str, ck_shape, m_shape) -> str:
    cfg = view.config
    if ck_shape and m_shape and len(ck_shape) == len(m_shape) and ck_shape[0] != m_shape[0] \
            and all(a == b for a, b in zip(ck_shape[1:], m_shape[1:])):
        vocab = getattr(cfg, "vocab_size", None)
        if vocab == m_shape[0] and ("embed" in key or "lm_head" in key or "predictions" in key or "decoder" in key):
            return (f"vocabulary size differs ({ck_shape[0]} in the checkpoint, {m_shape[0]} in the model): "
                    f"model.resize_token_embeddings({ck_shape[0]}) before loading, or vocab_size={ck_shape[0]} in the config")
        if "position" in key:
            return (f"position table differs ({ck_shape[0]} vs {m_shape[0]}): max_position_embeddings={ck_shape[0]} "
                    "in the config, or ignore_mismatched_sizes=True to re-initialise it (then untrained)")
    if view.is_head(key):
        return "a head of another size (num_labels?): ignore_mismatched_sizes=True re-initialises it"
    return ("the config does not match the checkpoint: fix the config, or ignore_mismatched_sizes=True to "
            "re-initialise this weight (then untrained)")




def _suffix_index(keys) -> dict[str, list[tuple[str, str]]]:
    """``"a.b.c"`` -> {"b.c": [("a.", key)], "c": [("a.b.", key)]}."""
    idx: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            idx.setdefault(".".join(parts[i:]), []).append((".".join(parts[:i]) + ".", key))
    return idx


def _align(model_all: set[str], ck: dict[str, TensorInfo]):
    """Pair checkpoint keys with model keys: directly, through PEFT names, then through the
    prefix rule (add or strip) that pairs the most keys, repeated while one pairs anything.
    Returns ({model_key: (ckpt_key, how, rule)}, PEFT adapter keys, [(op, prefix, n paired)],
    the checkpoint keys paired)."""
    pairs: dict[str, tuple[str, str, tuple | None]] = {}
    taken: set[str] = set()
    for c in ck:
        if c in model_all:
            pairs[c] = (c, "direct", None)
            taken.add(c)
    peft_names = _peft_names(ck)
    adapters = {c for c in ck if c not in taken and _peft_kind(peft_names, c) == "adapter"}
    names: dict[str, str] = {}  # normalised checkpoint name -> checkpoint key
    peft: set[str] = set()
    for c in sorted(ck):
        if c in taken or c in adapters:
            continue
        n = _peft_normal(peft_names, c)
        if n != c:
            peft.add(c)
            if n in model_all and n not in pairs:
                pairs[n] = (c, "peft", None)
                taken.add(c)
                continue
        names.setdefault(n, c)
    rules: list[tuple[str, str, int]] = []
    ties: list[str] = []
    for _ in range(4):
        um = [m for m in model_all if m not in pairs]
        uc = {n: c for n, c in names.items() if c not in taken}
        if not um or not uc:
            break
        votes: dict[tuple[str, str], int] = {}
        idx_m = _suffix_index(um)
        for n in uc:
            for p, _m in idx_m.get(n, ()):
                votes[("add", p)] = votes.get(("add", p), 0) + 1
        idx_c = _suffix_index(uc)
        for m in um:
            for p, _n in idx_c.get(m, ()):
                votes[("strip", p)] = votes.get(("strip", p), 0) + 1
        if not votes:
            break
        (op, p), _cnt = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0][1])))
        tied = sorted(q for (o, q), n in votes.items() if o == op and n == _cnt and len(q) == len(p))
        if len(tied) > 1 and not rules:   # two encoders under two prefixes, equally good: do not pick one
            ties.extend(f"{op}:{q}" for q in tied)
            break
        got = 0
        for n, c in uc.items():
            target = p + n if op == "add" else (n[len(p):] if n.startswith(p) else None)
            if target is not None and target in model_all and target not in pairs:
                pairs[target] = (c, "peft" if c in peft else "prefix", (op, p))
                taken.add(c)
                got += 1
        if not got:
            break
        rules.append((op, p, got))
    return pairs, adapters, rules, taken, ties, peft_names


def _model_space(key: str, rules, peft: dict) -> str:
    """Where a checkpoint key would land in the model under the prefix rules found."""
    n = _peft_normal(peft, key)
    for op, p, _ in rules:
        if op == "add":
            return p + n
        if n.startswith(p):
            return n[len(p):]
    return n


def _prefix_fix(view: _ModelView, op: str, p: str) -> str:
    code = (f"{{'{p}' + k: v for k, v in sd.items()}}" if op == "add"
            else f"{{k.removeprefix('{p}'): v for k, v in sd.items()}}")
    if p.rstrip(".") == view.hf_prefix and view.hf_prefix:
        return f"transformers' {HF_DOES_IT} (base_model_prefix '{view.hf_prefix}'); for load_state_dict: {code}"
    return f"neither from_pretrained nor load_state_dict does this: rename first, {code}"


def explain_load(model, checkpoint) -> LoadReport:
    """What loading ``checkpoint`` into ``model`` will do, key by key (nothing is loaded).

    ``model``: an ``nn.Module`` (a model on the meta device is fine: only names, shapes, dtypes and
    tensor identity are used). ``checkpoint``: a directory, a file, a sharded index, or a state
    dict. Safetensors are read header-only; ``.bin`` only with ``torch.load(weights_only=True)``.
    """
    ck = read_checkpoint(checkpoint)
    described = ck.describe()
    notes: list[str] = []
    if _is_flash_bert(type(model)):
        ck, incompatible, base, note = _flash_bert_view(model, ck)
        view = _ModelView(model, base_prefix=base)
        notes += [note] if note else []
    else:
        incompatible = _architecture_problems(model, ck)
        view = _ModelView(model)
    model_all = set(view.keys) | set(view.nonpersistent)
    pairs, adapters, rules, taken, ties, peft = _align(model_all, ck.tensors)
    if ties and not incompatible:   # one refusal is enough (a flash-attn class: the patch's own says it)
        names = ", ".join(repr(t.split(":", 1)[1]) for t in ties)
        strip = ties[0].startswith("strip:")
        first = ties[0].split(":", 1)[1]
        how = (f"{{k.removeprefix({first!r}): v for k, v in sd.items() if k.startswith({first!r})}}" if strip
               else f"{{{first!r} + k: v for k, v in sd.items()}}")
        incompatible = incompatible + [
            f"ambiguous: the checkpoint holds the model's weights equally well under {len(ties)} prefixes ({names}: "
            f"a dual encoder, a student/teacher pair?); refusing to pick one. Choose one and rename, e.g. {how}"]
    entries: list[LoadEntry] = []
    missing = set(model_all) - set(pairs)
    for key in list(view.keys) + list(view.nonpersistent):
        m_info = view.keys.get(key) or view.nonpersistent[key]
        pair = pairs.get(key)
        if key in view.nonpersistent:
            c = pair[0] if pair else None
            t = ck.tensors.get(c) if c else None
            entries.append(_buffer_entry(key, m_info, c, (t.shape, t.dtype) if t else None))
            continue
        if pair is None:
            entries.append(_missing_entry(view, key, missing))
            continue
        c, how, rule = pair
        t = ck.tensors[c]
        ck_info = (t.shape, t.dtype)
        shape, dtype = m_info
        prefix_note = None
        if rule:
            op, p = rule
            prefix_note = (f"the checkpoint key lacks the prefix '{p}'" if op == "add"
                           else f"the checkpoint key has the extra prefix '{p}'")
        if t.shape != shape:
            entries.append(LoadEntry("shape-mismatch", key, c, model=m_info, ckpt=ck_info,
                                     reason="same weight, another shape" + (f" ({prefix_note})" if prefix_note else ""),
                                     fix=_shape_fix(view, key, t.shape, shape),
                                     detail=f"checkpoint {list(t.shape)}, model {list(shape)}"))
        elif how == "peft":
            entries.append(LoadEntry("peft-wrapped", key, c, model=m_info, ckpt=ck_info,
                                     reason="PEFT-wrapped name of a base weight (base_model.model. / .base_layer.)"
                                     + (f"; also {prefix_note}" if prefix_note else ""),
                                     fix=PEFT_FIX))
        elif how == "prefix":
            entries.append(LoadEntry("prefix-mismatch", key, c, model=m_info, ckpt=ck_info, reason=prefix_note,
                                     fix=_prefix_fix(view, *rule)))
        elif t.dtype != dtype:
            fix = (f"from_pretrained(..., torch_dtype=torch.{t.dtype}) (or 'auto') keeps {t.dtype}"
                   if _is_float(t.dtype) and _is_float(dtype) else None)
            entries.append(LoadEntry("dtype-differs", key, c, model=m_info, ckpt=ck_info,
                                     reason=f"same weight; the checkpoint holds {t.dtype}, the model {dtype}: "
                                            f"the load casts to {dtype}", fix=fix))
        else:
            entries.append(LoadEntry("matched", key, c, model=m_info, ckpt=ck_info, reason="same name, shape and dtype"))
    dominant = _dominant_prefix(ck.tensors)
    for c in ck.tensors:
        if c in taken:
            continue
        t = ck.tensors[c]
        if c in adapters:
            entries.append(_unexpected_entry(view, c, c, (t.shape, t.dtype), dominant, peft))
            continue
        entries.append(_unexpected_entry(view, c, _model_space(c, rules, peft), (t.shape, t.dtype), dominant, peft))
    found = sum(1 for e in entries if e.model_key in view.keys and e.checkpoint_key)
    notes += [] if ties else _notes(view, found, list(ck.tensors))
    return LoadReport(view.name, described, entries, notes, incompatible=incompatible)


# ---------------------------------------------------------------------------- architecture
def _model_type_of(model) -> str | None:
    """The model type the class is written for (its config class's, not the instance's: a
    ``BertConfig.from_pretrained`` of a RoBERTa directory keeps ``model_type='roberta'``)."""
    for owner in (getattr(type(model), "config_class", None), type(getattr(model, "config", None))):
        mt = getattr(owner, "model_type", None)
        if isinstance(mt, str) and mt:
            return mt
    return None


def _first_rows(ck: Checkpoint, key: str, n: int):
    """The first ``n`` rows of one checkpoint tensor (a few hundred bytes read), or None."""
    t = ck.tensors.get(key)
    if t is None:
        return None
    try:
        if ck.data is not None:
            return ck.data[key][:n]
        if t.file and t.file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(t.file, framework="pt") as f:
                return f.get_slice(key)[:n]
        if t.file:
            import zipfile

            import torch

            obj = torch.load(t.file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(t.file))
            return obj[key][:n].clone()
    except Exception:  # noqa: BLE001 - only a check; unreadable files were refused when reading
        return None
    return None


def _architecture_problems(model, ck: Checkpoint) -> list[str]:
    """Is the checkpoint the model's architecture? From its own config.json's ``model_type`` and,
    for BERT (positions counted from 0), its position table: RoBERTa-style embeddings keep an
    all-zero padding row and count positions from padding_idx + 1."""
    out = []
    want, cfg = _model_type_of(model), ck.config or {}
    have = cfg.get("model_type")
    name = type(model).__name__
    if want and isinstance(have, str) and have and not bc.same_architecture(have, want):
        arch = f" (architectures {cfg['architectures']})" if cfg.get("architectures") else ""
        out.append(f"{ck.config_path} says model_type {have!r}{arch}; {name} is a {want!r} model, so the weights "
                   f"would run in another architecture (transformers' from_pretrained only warns \"You are using a "
                   f"model of type {have} to instantiate a model of type {want}\") and compute other outputs. Load "
                   f"it with its own class (transformers.AutoModel / AutoModelFor...)")
    if want == "bert" and not out:
        for key in sorted(k for k in ck.tensors if k == bc.POSITIONS or k.endswith("." + bc.POSITIONS)):
            row = bc.zero_row(_first_rows(ck, key, bc.POSITION_ROWS))
            if row is not None:
                out.append(f"row {row} of {key} is all zeros, the padding row of RoBERTa-style embeddings, which "
                           f"count positions from padding_idx + 1 = {row + 1}; {name} counts positions from 0, "
                           "so the outputs would differ. Load it with its own class (transformers.AutoModel, "
                           "RobertaModel / XLMRobertaModel)")
                break
    return out


def _flash_bert_view(model, ck: Checkpoint):
    """A flash-attn BERT class: the checkpoint as the ``flash_attn_bert_prefix`` patch's
    ``from_pretrained`` would see it. Its own architecture check (so ``inspect`` says what the load
    says), then its key mapping on meta tensors (QKV fused, LayerNorms renamed). Returns
    (checkpoint to align, refusals, where the backbone is, a note)."""
    import torch

    who = (ck.source, type(model))
    keys = list(ck.tensors)
    try:
        prefix = bc.check_bert_checkpoint(ck.source, keys, config=getattr(model, "config", None),
                                          config_path=ck.config_path, config_json=ck.config,
                                          positions=lambda key: _first_rows(ck, key, bc.POSITION_ROWS),
                                          who=bc.where(*who))
        meta = {k: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="meta") for k, t in ck.tensors.items()}
        sd, target = bc.remap_checkpoint([meta], prefix, model.config, model, raw_keys=keys, who=who)
    except CheckpointError as e:
        return ck, [_one_line(e)], None, None
    mapped = Checkpoint(ck.source, ck.format, ck.files, {k: TensorInfo(v.shape, v.dtype) for k, v in sd.items()},
                        ck.metadata, ck.shared_bytes)
    note = (f"flash-attn BERT class: keys as hfpatches' flash_attn_bert_prefix from_pretrained maps them "
            f"(checkpoint prefix {prefix!r} -> model prefix {target!r}, Q/K/V fused); unpatched flash-attn raises "
            "KeyError or keeps random weights instead")
    return mapped, [], target, note


def _notes(view: _ModelView, found: int, ckpt_keys: list[str]) -> list[str]:
    if view.keys and not found and ckpt_keys:
        return [f"none of the model's {len(view.keys)} weights is in the checkpoint: another architecture? "
                f"(checkpoint keys look like {', '.join(ckpt_keys[:3])})"]
    return []


def _dominant_prefix(tensors: dict) -> str | None:
    """The first name component most checkpoint keys share (``bert.``, ``model.``), if any."""
    counts: dict[str, int] = {}
    for k in tensors:
        p = _top_prefix(k)
        counts[p] = counts.get(p, 0) + 1
    if not counts:
        return None
    p, n = max(counts.items(), key=lambda kv: kv[1])
    return p if n * 2 > len(tensors) and p != "(top level)" else None


# ============================================================================ the CLI
class _UsageError(ValueError):
    pass


def build_meta_model(class_path: str, config_dir: str):
    """``class_path`` (``transformers.BertModel``, ``BertModel``, ``transformers.AutoModelForCausalLM``)
    built from ``config_dir``'s config on the meta device: no memory for weights."""
    import importlib


    mod_name, _, cls_name = class_path.rpartition(".")
    try:
        module = importlib.import_module(mod_name or "transformers")
        cls = getattr(module, cls_name)
    except (ImportError, AttributeError) as e:
        raise _UsageError(f"--model {class_path}: cannot import it ({_one_line(e)}); give a dotted class name "
                          "such as transformers.BertModel") from e
    if not _is_model_class(cls):
        raise _UsageError(f"--model {class_path}: is {_describe(cls)}, not a model class; expected a torch.nn.Module "
                          "subclass or a transformers Auto class, such as transformers.BertModel (nothing was called)")
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise _UsageError(f"{config_dir}: no config.json to build {cls_name} from; pass --config DIR")
    from transformers import AutoConfig

    cfg_cls = getattr(cls, "config_class", None)
    if _is_flash_bert(cls):   # flash-attn's BERT classes take a transformers BertConfig (and check it)
        from transformers import BertConfig as cfg_cls
    try:
        if cfg_cls is not None and hasattr(cfg_cls, "from_pretrained") and getattr(cfg_cls, "model_type", None):
            config = cfg_cls.from_pretrained(config_dir)   # what cls.from_pretrained would use
        else:
            config = AutoConfig.from_pretrained(config_dir)
    except Exception as e:
        raise _UsageError(f"{os.path.join(config_dir, 'config.json')}: cannot build a config ({_one_line(e)})") from e
    if _is_flash_bert(cls) and getattr(config, "position_embedding_type", None) is None:
        config.position_embedding_type = "absolute"   # transformers 5 dropped the field (BERT is absolute only)
    from ._meta_build import meta_build

    with meta_build():   # this thread only: torch.device("meta") would set a process global
        if hasattr(cls, "from_config") and not hasattr(cls, "base_model_prefix"):  # Auto* classes
            return cls.from_config(config)
        return cls(config)


def _is_model_class(obj) -> bool:
    """An ``nn.Module`` subclass, or a transformers Auto class (``AutoModel``...): the only things
    ``--model`` may name. Anything else (``os.system``) is never called."""
    if not isinstance(obj, type):
        return False
    import torch

    if issubclass(obj, torch.nn.Module):
        return True
    try:
        from transformers.models.auto.auto_factory import _BaseAutoModelClass
    except ImportError:  # pragma: no cover - transformers moved it
        return False
    return issubclass(obj, _BaseAutoModelClass)


def _describe(obj) -> str:
    kind = type(obj).__name__
    return f"a {kind}" if not isinstance(obj, type) else f"the class {obj.__module__}.{obj.__qualname__}"


def _is_flash_bert(cls) -> bool:
    """One of flash-attn's BERT classes (or a subclass): loads go through ``flash_attn_bert_prefix``."""
    fb = sys.modules.get("flash_attn.models.bert")
    base = getattr(fb, "BertPreTrainedModel", None) if fb is not None else None
    return isinstance(cls, type) and base is not None and issubclass(cls, base)


def _config_dir(checkpoint: str) -> str:
    return checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))


def inspect_main(args) -> int:
    """``python -m hfpatches inspect``: see the module docstring for the exit codes."""
    debug = bool(getattr(args, "debug", False))
    try:
        if getattr(args, "model", None):
            ck = read_checkpoint(args.checkpoint)
            model = build_meta_model(args.model, getattr(args, "config", None) or _config_dir(args.checkpoint))
            report = explain_load(model, ck)
            print(report.to_json() if args.json else report)
            return 0 if report.ok else 1
        s = summarize(args.checkpoint)
        print(json.dumps(s, indent=2) if args.json else render_summary(s))
        return 0
    except Exception as e:  # noqa: BLE001 - every failure is one line unless --debug
        if debug:
            import traceback

            traceback.print_exc()
        msg = _one_line(e) if isinstance(e, (CheckpointError, _UsageError)) else f"{type(e).__name__}: {_one_line(e)}"
        print(f"hfpatches inspect: error: {msg}" + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return 2
