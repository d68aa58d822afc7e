"""Reading a checkpoint without loading it: keys, shapes, dtypes and metadata from safetensors headers,
sharded indexes shard by shard, ``.bin`` only through ``torch.load(weights_only=True)`` (a pickle that
is not plain tensors is refused). Used by ``explain_load``, ``summarize`` and ``inspect``."""
from __future__ import annotations

import json
import os
import re
import stat

from ._files import ADAPTER_NAME, BIN_INDEX, BIN_NAME, SAFE_INDEX, SAFE_NAME
from .errors import CheckpointError

LOOKED_FOR = (SAFE_NAME, SAFE_INDEX, BIN_NAME, BIN_INDEX, ADAPTER_NAME)

# safetensors dtype codes -> torch names, and bytes per element
_ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
              "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
              "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
              "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
              "BOOL": ("bool", 1), "C64": ("complex64", 8)}
_FLOAT = ("float", "bfloat", "complex")


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


# PEFT: wrapped layers keep their original weight under ``.base_layer.``; the whole model sits
# under ``base_model.model.``; adapter weights have no place in the plain model.


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
