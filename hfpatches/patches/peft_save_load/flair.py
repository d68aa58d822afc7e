"""``hfpatches.flair``: load flair model files safely, including PEFT files flair wrote without
their config, and give a flair model one compute dtype.

``load(path, peft_config=None, *, model_class=None, dtype_policy=None)``
    Loads a flair model file. The file is checked first, without unpickling anything: a
    truncated or corrupted file (a zip member whose CRC-32 does not match: ``torch.load`` itself
    does not check, it returns the flipped bits as weights) raises
    :class:`hfpatches.errors.CheckpointError` naming the file. A file written by unpatched flair
    from a PEFT model (flair issue #3623: LoRA-wrapped weights, no PEFT config) raises the same
    error asking for the config, because LoRA's ``lora_alpha`` (its scale) is not in the weights;
    with ``peft_config=LoraConfig(...)`` the embeddings are rebuilt with that config and the
    weights load strictly (a config that does not fit them, e.g. another ``r`` or other target
    modules, raises, naming the file). Then the dtype policy is applied. Works with or without the
    ``peft_save_load`` patch live; the file is only ever opened for reading. The CRC-32 pass over
    the tensor data runs on a thread beside flair's own load (reading and ``zlib.crc32`` release
    the GIL) and is waited for before the model is returned.

``unify_dtype(model, policy=None)``
    One compute dtype per part of a flair model whose embeddings are transformers, without
    costing the head its training. ``"backbone"`` (the default): the transformer keeps its dtype
    (bf16 stays bf16: its memory and speed are why it was loaded so); everything outside it
    (decoder, CRF, RNN, other embeddings: the head) is held in float32, and each head module that
    owns floating-point parameters gets a forward pre-hook (:func:`upcast_inputs`) that casts
    narrower inputs up to its own dtype: the transformer's bf16 output enters the head as float32
    (a differentiable cast; gradients reach the transformer in bf16). Float32 master weights
    matter: a bf16 head rounds away AdamW updates smaller than half its precision step (at lr
    5e-5, 88 % of a MiniLM classifier's decoder weights never moved in 10 steps). ``"float32"``:
    the whole model, transformer included, in float32. Adapter weights (LoRA, kept in float32 by
    peft's ``autocast_adapter_dtype``) are left to peft under ``"backbone"``. Integer (quantized)
    weights are never touched. Precedence: the ``policy`` argument (remembered on the model) > an
    earlier explicit choice on that model > ``HFPATCHES_DTYPE_POLICY``
    (``hfpatches._env.DTYPE_POLICY``) > ``"backbone"``. Parameters keep their identity (an
    optimizer holding them keeps working). The hooks live on the model's own modules, so the
    model works the same with the patch reverted, in a user's own forward code, and as loaded by
    :func:`load` without the patch (flair's own save does not pickle modules, so no hook reaches
    a file). What to walk is cached per model structure, so a call costs well under a
    millisecond for MiniLM when nothing needs casting (the patch calls it at every predict /
    forward_loss). Returns the head's dtype (``torch.float32``), None without a transformer.

``inspect_model_file(path)``
    What the safe scan sees (format, PEFT layout, whether the PEFT config travels).

Security: reading a flair model file means unpickling it; flair does that with
``torch.load(..., weights_only=False)`` in ``flair.file_utils.load_torch_state`` (its objects,
tokenizer bytes, label dictionaries and configs are not plain tensors). That is flair's own loader,
called exactly as ``TextClassifier.load(path)`` calls it, and only after the scan. The scan itself
never unpickles: it reads the zip directory, checks every member's CRC-32 and walks the pickle's
opcodes with ``pickletools.genops`` (which parses, it does not execute); ``torch.load`` with
``weights_only=True`` cannot read a flair file at all (it rejects flair's classes), so it cannot
be used for this peek. Load only model files you trust, as with flair itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import os
import pickletools
import zipfile
from typing import Any

from hfpatches import _env
from hfpatches.errors import CheckpointError

__all__ = ["load", "unify_dtype", "inspect_model_file", "ModelFileInfo", "FileCheck", "POLICIES", "atomic_save",
           "remove_stale_temporaries"]

POLICIES = _env.DTYPE_POLICIES  # ("backbone", "float32")
_POLICY_ATTR = "_hfpatches_dtype_policy"
#: key of the embeddings' params that carries several adapters (written by the patch; see patch docs)
MULTI_ADAPTER_KEY = "hfpatches_peft"
_STATE_DICT_ERROR = "Error(s) in loading state_dict"
# (file being loaded, whether a caller-supplied peft_config was put into it): for errors raised deeper
_loading: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar("hfpatches_flair_file",
                                                                                   default=(None, False))


# ----------------------------------------------------------------------------- dtype
def resolve_policy(policy: str | None = None, model=None) -> str:
    if policy is not None:
        val = str(policy).strip().lower()
        if val not in POLICIES:
            raise ValueError(f"dtype policy {policy!r} is not one of {', '.join(POLICIES)}")
        return val
    remembered = getattr(model, _POLICY_ATTR, None) if model is not None else None
    if remembered is not None:
        return remembered
    return _env.dtype_policy()


def _backbones(model) -> list:
    """The transformers models inside flair's TransformerEmbeddings of ``model``."""
    import sys

    import torch

    mod = sys.modules.get("flair.embeddings.transformer")
    if mod is None:
        return []
    kinds = tuple(getattr(mod, n) for n in ("TransformerEmbeddings", "TransformerBaseEmbeddings") if hasattr(mod, n))
    out = []
    for m in model.modules():
        if isinstance(m, kinds):
            inner = getattr(m, "model", None)
            if isinstance(inner, torch.nn.Module) and inner not in out:
                out.append(inner)
    return out


def _adapter_param_ids(backbone) -> set[int]:
    """Parameters of PEFT tuner layers that are not their base layer's (LoRA A/B, ...)."""
    import sys

    tuners = sys.modules.get("peft.tuners.tuners_utils")  # no peft imported: no PEFT model here
    if tuners is None:
        return set()
    out: set[int] = set()
    for m in backbone.modules():
        if isinstance(m, tuners.BaseTunerLayer):
            base = {id(p) for p in m.get_base_layer().parameters()}
            out.update(id(p) for p in m.parameters() if id(p) not in base)
    return out


def _dominant(params):
    count: dict = {}
    for p in params:
        if p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else None


def backbone_dtype(backbone):
    """The dtype holding most of the backbone's floating-point weights (adapters not counted)."""
    adapters = _adapter_param_ids(backbone)
    return _dominant(p for p in backbone.parameters() if id(p) not in adapters)


class _Plan:
    """What unify_dtype walks, computed once per model structure (keyed by its modules' ids):
    the backbones' base parameters, (module, tensor name) slots outside / inside them, and the
    head modules that own floating-point parameters (they get the input upcast hook)."""

    __slots__ = ("sig", "bases", "outside", "inside", "head", "__weakref__")

    def __init__(self, model, sig):
        self.sig = sig
        backbones = _backbones(model)
        self.bases = []
        for b in backbones:
            adapters = _adapter_param_ids(b)
            self.bases.append([p for p in b.parameters() if id(p) not in adapters])
        inner = {id(m) for b in backbones for m in b.modules()}
        self.outside, self.inside, self.head = [], [], []
        for m in model.modules():
            slots = [(m, n, True) for n, _ in m.named_parameters(recurse=False)]
            slots += [(m, n, False) for n, _ in m.named_buffers(recurse=False)]
            (self.inside if id(m) in inner else self.outside).extend(slots)
            if (id(m) not in inner and m is not model
                    and any(p.is_floating_point() for p in m.parameters(recurse=False))):
                self.head.append(m)


_PLANS: dict = {}


def _plan(model) -> _Plan:
    import weakref

    sig = tuple(map(id, model.modules()))
    cache = _PLANS.setdefault("plans", weakref.WeakKeyDictionary())
    plan = cache.get(model)
    if plan is None or plan.sig != sig:
        plan = cache[model] = _Plan(model, sig)
    return plan


def _bits(dtype) -> int:
    import torch

    return torch.finfo(dtype).bits


def _upcast(x, dtype):
    import torch
    from torch.nn.utils.rnn import PackedSequence

    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and _bits(x.dtype) < _bits(dtype) else x
    if isinstance(x, PackedSequence):
        return x.to(dtype) if x.data.is_floating_point() and _bits(x.data.dtype) < _bits(dtype) else x
    if type(x) in (tuple, list):
        return type(x)(_upcast(v, dtype) for v in x)
    return x


def upcast_inputs(module, args, kwargs):
    """Forward pre-hook of a head module (registered by :func:`unify_dtype` under ``"backbone"``):
    floating-point inputs narrower than the module's own parameters (a bf16 transformer's output
    reaching a float32 decoder, RNN or CRF) are cast up to them; the cast is differentiable, so
    gradients flow back to the transformer in its own dtype. Nothing else is touched."""
    own = next((p.dtype for p in module.parameters(recurse=False) if p.is_floating_point()), None)
    if own is None:
        return None
    return _upcast(args, own), {k: _upcast(v, own) for k, v in kwargs.items()}


def _hook_head(modules) -> None:
    for m in modules:
        if not any(h is upcast_inputs for h in m._forward_pre_hooks.values()):
            m.register_forward_pre_hook(upcast_inputs, with_kwargs=True)


def unify_dtype(model, policy: str | None = None):
    """One compute dtype per part of ``model`` (see the module docs); returns the head's dtype,
    ``torch.float32`` (None: no transformer in the model)."""
    import torch

    pol = resolve_policy(policy, model)
    if policy is not None:
        object.__setattr__(model, _POLICY_ATTR, pol)
    plan = _plan(model)
    if not plan.bases:
        return None
    target = torch.float32
    slots = plan.outside + plan.inside if pol == "float32" else plan.outside
    with torch.no_grad():
        for m, name, is_param in slots:
            t = getattr(m, name)
            if t is None or not t.is_floating_point() or t.dtype == target:
                continue
            if is_param:
                t.data = t.data.to(target)
                if t.grad is not None:
                    t.grad = t.grad.to(target)
            else:
                setattr(m, name, t.to(target))
    if pol == "backbone":
        narrow = {d for d in map(_dominant, plan.bases) if d is not None and _bits(d) < _bits(target)}
        if narrow:
            _hook_head(plan.head)
    return target


# ----------------------------------------------------------------------------- file scan
class ModelFileInfo:
    """What a flair model file holds, read without unpickling it.

    ``format``: ``"zip"`` (torch >= 1.6) or ``"legacy"`` (the old torch format: not checked);
    ``peft_roots``: outer key parts before ``base_model.model.`` (``["embeddings.model."]``);
    ``adapters``: adapter names in the keys; ``wrapped``: names of the wrapped layers
    (``["query", "value"]``); ``has_peft_config``: the embeddings' params carry a PEFT config;
    ``legacy_peft``: PEFT-wrapped weights without it. The pickle's opcodes are walked only when
    an answer needs its strings (a file without PEFT names, or with a config, needs no walk).
    """

    __slots__ = ("path", "format", "_data", "_strings")

    def __init__(self, path, format, data: bytes = b""):
        self.path, self.format, self._data = path, format, data
        self._strings: list[str] | None = None

    def strings(self) -> list[str]:
        """Every text constant of the pickle (keys, names), by walking its opcodes: parsed, never run."""
        if self._strings is None:
            out: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(self._data):
                    if isinstance(arg, str) and op.name.endswith("UNICODE"):
                        out.append(arg)
            except Exception as e:  # noqa: BLE001 - any parse failure means a damaged pickle
                raise _bad(self.path, f"its pickle does not parse ({type(e).__name__}: {e})") from e
            self._strings = out
        return self._strings

    def _entries(self):
        from hfpatches.peft_keys import PEFT_ROOT, parse_peft_keys

        if PEFT_ROOT.encode() not in self._data:
            return []
        return parse_peft_keys(s for s in self.strings() if PEFT_ROOT in s and " " not in s)

    @property
    def peft_roots(self) -> list[str]:
        from hfpatches.peft_keys import PEFT_ROOT

        return sorted({e.key[: e.key.index(PEFT_ROOT)] for e in self._entries()})

    @property
    def adapters(self) -> list[str]:
        return sorted({e.adapter for e in self._entries() if e.kind in ("adapter", "copy") and e.adapter})

    @property
    def wrapped(self) -> list[str]:
        return sorted({e.rel_module.rsplit(".", 1)[-1] for e in self._entries() if e.kind == "adapter"})

    @property
    def has_peft_config(self) -> bool:
        # the key strings as the pickle stores them (SHORT_BINUNICODE / BINUNICODE opcode + length)
        for key in (b"peft_config", MULTI_ADAPTER_KEY.encode()):
            if (b"\x8c" + bytes([len(key)]) + key in self._data
                    or b"X" + len(key).to_bytes(4, "little") + key in self._data):
                return True
        return False

    @property
    def legacy_peft(self) -> bool:
        """PEFT-wrapped weights but no PEFT config: written by unpatched flair (#3623)."""
        return not self.has_peft_config and bool(self.peft_roots)

    def __repr__(self) -> str:
        return (f"ModelFileInfo({self.path!r}, format={self.format}, peft_roots={self.peft_roots}, "
                f"adapters={self.adapters}, wrapped={self.wrapped}, has_peft_config={self.has_peft_config})")


def _bad(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}. The file is truncated or corrupted (an interrupted copy or save?); "
                           "nothing was loaded from it. Restore it from a good copy or save the model again.")


def inspect_model_file(path, *, verify: bool = True) -> ModelFileInfo:
    """Check ``path`` and read its key names without unpickling (see the module docs).
    ``verify=False`` skips the CRC-32 pass over the tensor data (the zip directory and the pickle
    are still checked)."""
    info, members = _scan(path)
    info.strings()  # the whole pickle parses
    if verify:
        _verify(path, members)
    return info


class FileCheck:
    """:func:`inspect_model_file` in two steps: ``info`` (zip directory, pickle) at once, and the
    CRC-32 pass over the tensor data on a background thread once started (:meth:`start`) - reading
    and ``zlib.crc32`` release the GIL, so it runs beside flair's own load instead of before it.
    :meth:`result` waits for it (runs it, if never started) and raises what it found."""

    def __init__(self, path) -> None:
        self.path = os.fspath(path)
        self.info, self._members = _scan(self.path)
        self._error: BaseException | None = None
        self._thread: Any = None

    def start(self) -> FileCheck:
        import threading

        self._thread = threading.Thread(target=self._run, name="hfpatches-crc", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            _verify(self.path, self._members)
        except BaseException as e:  # noqa: BLE001 - handed to the caller in result()
            self._error = e

    def result(self) -> ModelFileInfo:
        if self._thread is None:
            self._run()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.info


def _scan(path) -> tuple[ModelFileInfo, list]:
    """Zip directory + pickle opcodes (no unpickling); returns the members the CRC pass reads."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80":  # a pickle stream: torch's pre-1.6 format, which has no checksums
            return ModelFileInfo(path, "legacy"), []
        raise _bad(path, "not a torch zip archive (no zip directory at its end)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("data.pkl")]
            if not pkl:
                raise _bad(path, "a zip file without the data.pkl of a torch archive")
            data = zf.read(pkl[0])  # CRC-checked by zipfile
    except (zipfile.BadZipFile, EOFError, ValueError) as e:  # OSError (permissions, I/O) propagates as is
        raise _bad(path, f"{type(e).__name__}: {e}") from e
    # written with torch's CRC computation switched off (CRC 0): nothing to check there
    members = [i.filename for i in infos if i is not pkl[0] and not (i.CRC == 0 and i.file_size)]
    return ModelFileInfo(path, "zip", data), members


def _verify(path: str, members) -> None:
    """Read every member through zipfile, which checks its CRC-32 (torch.load does not)."""
    try:
        with zipfile.ZipFile(path) as zf:
            for name in members:
                with zf.open(name) as fh:
                    while fh.read(1 << 23):
                        pass
    except (zipfile.BadZipFile, EOFError, ValueError, KeyError) as e:
        raise _bad(path, f"{type(e).__name__}: {e}") from e


def legacy_message(where: str, info: ModelFileInfo | None = None, roots=(), wrapped=()) -> str:
    roots = info.peft_roots if info is not None else list(roots)
    wrapped = info.wrapped if info is not None else list(wrapped)
    tm = f"target_modules={wrapped!r}, " if wrapped else ""
    return (f"{where} holds PEFT-wrapped weights (under {', '.join(repr(r + 'base_model.model.') for r in roots)}) "
            "but not the PEFT config that built them: it was saved by flair without the fix for flair issue #3623 "
            "(flair <= 0.15.1). LoRA's lora_alpha (the scale of the adapters) cannot be recovered from the weights, "
            "so the file cannot be loaded faithfully on its own. Load it with the config used in training: "
            f"hfpatches.flair.load({where!r}, peft_config=LoraConfig(r=..., lora_alpha=..., {tm}...)). "
            "Saved again with the peft_save_load patch live, the file carries its config.")


# ----------------------------------------------------------------------------- in-memory state
def _transformer_params(obj, depth: int = 0) -> list[dict]:
    """The params dicts of transformer embeddings inside a loaded flair state (nested: stacked)."""
    found: list[dict] = []
    if depth > 6:
        return found
    if isinstance(obj, dict):
        if "config_state_dict" in obj and "__cls__" in obj:
            found.append(obj)
        for k, v in obj.items():
            if k != "state_dict":
                found.extend(_transformer_params(v, depth + 1))
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            found.extend(_transformer_params(v, depth + 1))
    return found


def _has_config(params: dict) -> bool:
    return params.get("peft_config") is not None or params.get(MULTI_ADAPTER_KEY) is not None


def state_peft_status(state: dict) -> tuple[list[str], list[dict], list[dict], set, set]:
    """(PEFT roots in the weights, transformer params with a config, without, adapter names, wrapped)."""
    from hfpatches.peft_keys import PEFT_ROOT, parse_peft_keys

    sd = state.get("state_dict") if isinstance(state, dict) else None
    keys = [k for k in (sd or {}) if isinstance(k, str) and PEFT_ROOT in k]
    entries = parse_peft_keys(keys)
    roots = sorted({e.key[: e.key.index(PEFT_ROOT)] for e in entries})
    params = _transformer_params(state)
    adapters = {e.adapter for e in entries if e.kind in ("adapter", "copy") and e.adapter}
    wrapped = {e.rel_module.rsplit(".", 1)[-1] for e in entries if e.kind == "adapter"}
    return (roots, [p for p in params if _has_config(p)], [p for p in params if not _has_config(p)],
            adapters, wrapped)


def check_state(state: dict, where: str | None = None) -> None:
    """Raise the legacy error when a loaded state has PEFT weights without their config."""
    roots, with_cfg, _without, _adapters, wrapped = state_peft_status(state)
    if len(roots) > len(with_cfg):
        raise CheckpointError(legacy_message(where or _loading.get()[0] or "the state dict", roots=roots,
                                             wrapped=sorted(wrapped)))


def _inject(state: dict, peft_config, where: str) -> bool:
    """Put ``peft_config`` into the transformer params that lack one; True if it did."""
    roots, with_cfg, without, adapters, _ = state_peft_status(state)
    need = len(roots) - len(with_cfg)
    if need <= 0:
        import warnings

        warnings.warn(f"{where} carries its own PEFT config; the peft_config passed in is not used", stacklevel=4)
        return False
    if need != len(without):
        raise CheckpointError(f"{where}: {need} PEFT-wrapped transformer(s) without a config but {len(without)} "
                              "transformer embeddings without one: cannot tell which to rebuild with peft_config")
    if adapters - {"default"}:
        raise CheckpointError(f"{where}: adapters named {sorted(adapters)}; flair creates only 'default', and "
                              "hfpatches.flair.load rebuilds that one")
    for params in without:
        params["peft_config"] = copy.deepcopy(peft_config)
    return True


# ----------------------------------------------------------------------------- load / save
@contextlib.contextmanager
def loading_file(path: str, injected: bool = False):
    """Name the file being loaded (and whether a peft_config was supplied) for errors raised deeper."""
    token = _loading.set((path, injected))
    try:
        yield
    finally:
        _loading.reset(token)


def state_dict_error(where: str | None, e: BaseException, injected: bool | None = None) -> CheckpointError:
    """A ``load_state_dict`` mismatch as a CheckpointError naming the file."""
    cur, cur_injected = _loading.get()
    where = where or cur or "the state dict"
    injected = cur_injected if injected is None else injected
    msg = str(e).strip().splitlines()
    head = "; ".join(line.strip() for line in msg[:3])
    if len(head) > 600:
        head = head[:600] + " ..."
    why = ("the peft_config passed in does not match the weights (r, target_modules, modules_to_save?)" if injected
           else "the weights do not fit the model this file describes")
    return CheckpointError(f"{where}: {why}: {head}")


def model_classes(root=None) -> list:
    """``flair.nn.Model`` (or ``root``) and every subclass defined so far, each once."""
    if root is None:
        import flair

        root = flair.nn.Model
    todo, seen = [root], []
    while todo:
        c = todo.pop()
        if c not in seen:
            seen.append(c)
            todo.extend(c.__subclasses__())
    return seen


def _model_class(state: dict, where: str):
    import inspect

    name = state.get("__cls__")
    if name is None:
        raise CheckpointError(f"{where} does not name its model class (flair <= 0.11 file): pass model_class=")
    for c in model_classes():
        if c.__name__ == name and not inspect.isabstract(c):
            return c
    raise CheckpointError(f"{where}: model class {name!r} is not a flair model class known here; pass model_class=")


def load(path, peft_config=None, *, model_class=None, dtype_policy: str | None = None):
    """Load a flair model file (see the module docs). Returns the model, in eval mode."""
    path = os.fspath(path)
    if dtype_policy is not None:
        resolve_policy(dtype_policy)  # a bad value fails before any work
    check = FileCheck(path)
    if check.info.legacy_peft and peft_config is None:
        raise CheckpointError(legacy_message(path, check.info))
    check.start()
    try:
        model = _load_checked(path, peft_config, model_class)
    except BaseException:
        check.result()  # a damaged file explains the failure better than what it caused
        raise
    check.result()
    unify_dtype(model, dtype_policy)
    return model


def _load_checked(path: str, peft_config, model_class):
    from flair.file_utils import load_torch_state  # flair's own loader (see the module docs)

    try:
        state = load_torch_state(path)
    except Exception as e:  # noqa: BLE001 - a damaged payload the scan could not see
        raise _bad(path, f"flair could not read it ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a flair model file (it holds a {type(state).__name__})")
    injected = peft_config is not None and _inject(state, peft_config, path)
    cls = model_class or _model_class(state, path)
    try:
        with loading_file(path, injected):
            model = cls.load(state)
    except RuntimeError as e:
        if _STATE_DICT_ERROR in str(e):
            raise state_dict_error(path, e, injected) from e
        raise
    return model


def atomic_save(path, write, *, durable: bool = False) -> None:
    """``write(tmp_path)`` writes the file; it then replaces ``path`` in one step (``os.replace``).

    The temporary file sits beside the target (same file system), in a private hidden folder
    ``.<name>.<host>.<pid>.<random>.hfpatches-tmp/`` under the target's own file name (torch names
    the zip's root folder after the file it writes, so the bytes are those of a direct save:
    saves are byte-reproducible). It gets the mode a plain ``open(path, "w")`` would give (or the
    existing file's mode) and is removed if anything fails: a save interrupted mid-write (an
    exception, a full disk) leaves the previous file as it was, and a reader never sees a
    half-written file. A symlinked target is replaced at the link's destination, as a direct
    write would; a target that exists and is not a regular file (a device, a FIFO) is written
    directly, as flair would, never replaced by a regular file.

    A save killed outright (SIGKILL, OOM killer) cannot clean up after itself; the next save into
    the same folder removes such leftovers (:func:`remove_stale_temporaries`: only hfpatches'
    own, and only provably stale ones - never a live save of another process).

    ``durable=True`` also flushes the data (``fdatasync``) and the directory entry (``fsync``)
    before returning: the new file survives a power loss on any file system. That waits for the
    disk (about 60 ms per 90 MB here), so it is off by default; ext4's default ``auto_da_alloc``
    already writes a file's data before a rename that replaces another file is committed."""
    from hfpatches._atomic import replace_atomic

    replace_atomic(path, write, durable=durable, clean=True)


def remove_stale_temporaries(directory) -> list[str]:
    """Remove what saves killed mid-write left in ``directory``; return the names removed (see
    ``hfpatches._atomic.remove_stale_temporaries``, shared with the run records): only
    hfpatches' own ``.<name>.<host>.<pid>.<random>.hfpatches-tmp`` folders, and only when every
    sign says their save is dead (this host, that pid not running here, older than 10 s, nobody
    holding the folder's ``flock``); 0.1.0's plain temporary files after an hour. POSIX only."""
    from hfpatches._atomic import remove_stale_temporaries as remove

    return remove(directory)
