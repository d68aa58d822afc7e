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

The jobs live in their own modules: reading (``_checkpoint``), the model-free summary
(``_summary``), the BERT rules (``_bert_checkpoint``), the ``inspect`` CLI (``_inspect``); this
module classifies keys and explains a load.
"""
from __future__ import annotations

import json
from typing import Any

from . import _bert_checkpoint as bc
from ._checkpoint import (
    Checkpoint,
    TensorInfo,
    _dtype_name,
    _first_rows,
    _is_float,
    _one_line,
    _peft_kind,
    _peft_names,
    _peft_normal,
    read_checkpoint,
)
from ._summary import _top_prefix, summarize
from .errors import CheckpointError, LoadError

__all__ = ["KINDS", "BAD_KINDS", "LoadEntry", "LoadReport", "explain_load", "read_checkpoint", "summarize"]

KINDS = ("matched", "dtype-differs", "prefix-mismatch", "peft-wrapped", "shape-mismatch", "tied",
         "missing-new-head", "missing-backbone", "missing-non-persistent-buffer", "unexpected-head",
         "unexpected")
BAD_KINDS = ("missing-backbone", "shape-mismatch")
SHOW = 5  # keys listed per group in the table
HF_DOES_IT = "from_pretrained does this itself"  # in a prefix fix: transformers maps base_model_prefix

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
    if bc.is_flash_bert(type(model)):
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


