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
    ``peft_save_load`` patch live; the file is only ever opened for reading.

``unify_dtype(model, policy=None)``
    One compute dtype for a flair model whose embeddings are transformers. ``"backbone"`` (the
    default): everything outside the transformer (decoder, CRF, RNN, other embeddings) takes the
    transformer's dtype, so a bf16 backbone gets a bf16 head. ``"float32"``: the whole model,
    transformer included, in float32. Adapter weights (LoRA, kept in float32 by peft's
    ``autocast_adapter_dtype``) are left to peft under ``"backbone"``. Integer (quantized) weights
    are never touched. Precedence: the ``policy`` argument (remembered on the model) > an earlier
    explicit choice on that model > ``HFPATCHES_DTYPE_POLICY`` (``hfpatches._env.DTYPE_POLICY``) >
    ``"backbone"``. Parameters keep their identity (an optimizer holding them keeps working).

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
import stat
import zipfile

from . import _env
from .errors import CheckpointError

__all__ = ["load", "unify_dtype", "inspect_model_file", "ModelFileInfo", "POLICIES", "atomic_save"]

POLICIES = ("backbone", "float32")
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
    return _env.get_choice(_env.DTYPE_POLICY, POLICIES, "backbone")


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
        inner = getattr(m, "model", None)
        if isinstance(m, kinds) and isinstance(inner, torch.nn.Module) and inner not in out:
            out.append(inner)
    return out


def _adapter_param_ids(backbone) -> set[int]:
    from .peft_keys import parse_peft_keys

    params = dict(backbone.named_parameters(remove_duplicate=False))
    return {id(params[e.key]) for e in parse_peft_keys(params) if e.kind == "adapter"}


def backbone_dtype(backbone):
    """The dtype holding most of the backbone's floating-point weights (adapters not counted)."""
    adapters = _adapter_param_ids(backbone)
    count: dict = {}
    for p in backbone.parameters():
        if p.is_floating_point() and id(p) not in adapters:
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else None


def unify_dtype(model, policy: str | None = None):
    """Cast ``model`` to one compute dtype (see the module docs); returns it (None: no transformer)."""
    import torch

    pol = resolve_policy(policy, model)
    if policy is not None:
        object.__setattr__(model, _POLICY_ATTR, pol)
    backbones = _backbones(model)
    if not backbones:
        return None
    if pol == "float32":
        target, skip = torch.float32, set()
    else:
        dtypes = [d for d in (backbone_dtype(b) for b in backbones) if d is not None]
        if not dtypes:
            return None
        target = dtypes[0]
        for d in dtypes[1:]:
            target = torch.promote_types(target, d)
        skip = {id(m) for b in backbones for m in b.modules()}
    with torch.no_grad():
        for m in model.modules():
            if id(m) in skip:
                continue
            for name, p in m.named_parameters(recurse=False):
                if p.is_floating_point() and p.dtype != target:
                    p.data = p.data.to(target)
                    if p.grad is not None:
                        p.grad = p.grad.to(target)
            for name, b in m.named_buffers(recurse=False):
                if b is not None and b.is_floating_point() and b.dtype != target:
                    setattr(m, name, b.to(target))
    return target


# ----------------------------------------------------------------------------- file scan
class ModelFileInfo:
    """What a flair model file holds, read without unpickling it.

    ``format``: ``"zip"`` (torch >= 1.6) or ``"legacy"`` (the old torch format: not checked);
    ``peft_roots``: outer key parts before ``base_model.model.`` (``["embeddings.model."]``);
    ``adapters``: adapter names in the keys; ``wrapped``: names of the wrapped layers
    (``["query", "value"]``); ``has_peft_config``: the embeddings' params carry a PEFT config.
    """

    __slots__ = ("path", "format", "peft_roots", "adapters", "wrapped", "has_peft_config")

    def __init__(self, path, format, peft_roots=(), adapters=(), wrapped=(), has_peft_config=False):
        self.path, self.format = path, format
        self.peft_roots, self.adapters, self.wrapped = list(peft_roots), sorted(adapters), sorted(wrapped)
        self.has_peft_config = has_peft_config

    @property
    def legacy_peft(self) -> bool:
        """PEFT-wrapped weights but no PEFT config: written by unpatched flair (#3623)."""
        return bool(self.peft_roots) and not self.has_peft_config

    def __repr__(self) -> str:
        return (f"ModelFileInfo({self.path!r}, format={self.format}, peft_roots={self.peft_roots}, "
                f"adapters={self.adapters}, wrapped={self.wrapped}, has_peft_config={self.has_peft_config})")


def _bad(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}. The file is truncated or corrupted (an interrupted copy or save?); "
                           "nothing was loaded from it. Restore it from a good copy or save the model again.")


def inspect_model_file(path) -> ModelFileInfo:
    """Check ``path`` and read its key names without unpickling (see the module docs)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(2)
        if head[:1] == b"\x80":  # a pickle stream: torch's pre-1.6 format, which has no checksums
            return ModelFileInfo(path, "legacy")
        raise _bad(path, "not a torch zip archive (no zip directory at its end)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            pkl = [i for i in infos if i.filename.endswith("data.pkl")]
            if not pkl:
                raise _bad(path, "a zip file without the data.pkl of a torch archive")
            for info in infos:  # every member, CRC-32 checked (torch.load does not)
                if info.CRC == 0 and info.file_size:
                    continue  # written with torch's CRC computation switched off: nothing to check
                with zf.open(info) as fh:
                    while fh.read(1 << 22):
                        pass
            data = zf.read(pkl[0])
    except (zipfile.BadZipFile, EOFError, ValueError) as e:  # OSError (permissions, I/O) propagates as is
        raise _bad(path, f"{type(e).__name__}: {e}") from e
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):  # parses opcodes; executes nothing
            if isinstance(arg, str) and op.name.endswith("UNICODE"):
                strings.append(arg)
    except Exception as e:  # noqa: BLE001 - any parse failure means a damaged pickle
        raise _bad(path, f"its pickle does not parse ({type(e).__name__}: {e})") from e
    return _info_from_strings(path, strings)


def _info_from_strings(path: str, strings) -> ModelFileInfo:
    from .peft_keys import PEFT_ROOT, parse_peft_keys

    keys = [s for s in strings if PEFT_ROOT in s and " " not in s]
    entries = parse_peft_keys(keys)
    roots = sorted({e.key[: e.key.index(PEFT_ROOT)] for e in entries})
    adapters = {e.adapter for e in entries if e.kind in ("adapter", "copy") and e.adapter}
    wrapped = {e.rel_module.rsplit(".", 1)[-1] for e in entries if e.kind == "adapter"}
    has_cfg = "peft_config" in strings or MULTI_ADAPTER_KEY in strings
    return ModelFileInfo(path, "zip", roots, adapters, wrapped, has_cfg)


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
    from .peft_keys import PEFT_ROOT, parse_peft_keys

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


def _inject(state: dict, peft_config, where: str) -> None:
    roots, with_cfg, without, adapters, _ = state_peft_status(state)
    need = len(roots) - len(with_cfg)
    if need <= 0:
        import warnings

        warnings.warn(f"{where} carries its own PEFT config; the peft_config passed in is not used", stacklevel=3)
        return
    if need != len(without):
        raise CheckpointError(f"{where}: {need} PEFT-wrapped transformer(s) without a config but {len(without)} "
                              "transformer embeddings without one: cannot tell which to rebuild with peft_config")
    if adapters - {"default"}:
        raise CheckpointError(f"{where}: adapters named {sorted(adapters)}; flair creates only 'default', and "
                              "hfpatches.flair.load rebuilds that one")
    for params in without:
        params["peft_config"] = copy.deepcopy(peft_config)


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
    info = inspect_model_file(path)
    if info.legacy_peft and peft_config is None:
        raise CheckpointError(legacy_message(path, info))
    from flair.file_utils import load_torch_state  # flair's own loader (see the module docs)

    try:
        state = load_torch_state(path)
    except Exception as e:  # noqa: BLE001 - a damaged payload the scan could not see
        raise _bad(path, f"flair could not read it ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a flair model file (it holds a {type(state).__name__})")
    injected = False
    if peft_config is not None:
        before = [id(p.get("peft_config")) for p in _transformer_params(state)]
        _inject(state, peft_config, path)
        injected = before != [id(p.get("peft_config")) for p in _transformer_params(state)]
    cls = model_class or _model_class(state, path)
    try:
        with loading_file(path, injected):
            model = cls.load(state)
    except RuntimeError as e:
        if _STATE_DICT_ERROR in str(e):
            raise state_dict_error(path, e, injected) from e
        raise
    unify_dtype(model, dtype_policy)
    return model


def atomic_save(path, write) -> None:
    """``write(tmp_path)`` writes the file; it then replaces ``path`` in one step (``os.replace``).

    The temporary file sits beside the target (same file system), is created with the mode a
    plain ``open(path, "w")`` would give (or the existing file's mode), is flushed to disk before
    the rename, and is removed if anything fails: an interrupted save leaves the previous file as
    it was. A symlinked target is replaced at the link's destination, as a direct write would."""
    dest = os.path.realpath(os.fspath(path))
    directory, base = os.path.split(dest)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.hfpatches-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.exists(dest):
            os.chmod(tmp, stat.S_IMODE(os.stat(dest).st_mode))
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
