"""The BERT checkpoint rules shared by the ``flash_attn_bert_prefix`` patch and ``inspect`` /
``explain_load``: what counts as a BERT checkpoint that flash-attn's ``BertModel`` reproduces (model
type, RoBERTa-family refusals, where the backbone sits, the position-table scheme) and how its keys
map onto flash-attn's names. One module, so the load and the inspection always say the same; it
imports nothing heavy at module level and no patch."""
from __future__ import annotations

import os
import sys

from .errors import CheckpointError

MODULE = "flash_attn.models.bert"
SHOW = 10                                   # keys shown per kind in errors and warnings
BACKBONE_PARTS = ("embeddings.", "encoder.", "emb_ln.")   # flash-attn BertModel's own weights
CHECKPOINT_PARTS = ("embeddings.", "encoder.", "pooler.")  # a HF BertModel's top-level children
ANCHOR = "embeddings.word_embeddings.weight"
POSITIONS = "embeddings.position_embeddings.weight"
POSITION_ROWS = 4                           # rows of the position table checked for a padding row
BERT_MODEL_TYPES = ("bert",)                # config.json model_type values flash-attn's BERT reproduces
ROBERTA_FAMILY = ("roberta", "xlm-roberta", "camembert", "xlm-roberta-xl", "roberta-prelayernorm", "data2vec-text")
# base_model_prefix of BERT look-alikes whose position ids or embeddings differ from BERT's
FOREIGN_PREFIXES = {"roberta.": "RoBERTa / XLM-R / CamemBERT", "roberta_prelayernorm.": "RoBERTa-PreLayerNorm",
                    "data2vec_text.": "Data2VecText", "electra.": "ELECTRA", "ernie.": "ERNIE",
                    "megatron_bert.": "Megatron-BERT", "distilbert.": "DistilBERT", "deberta.": "DeBERTa"}
BERT_ONLY_FIX = ("Load it with transformers (AutoModel.from_pretrained), or give flash-attn a BERT checkpoint "
                 "(config.json model_type 'bert').")
DECODER_W, DECODER_B, HF_MLM_BIAS = "cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias"

# model types whose weights and forward are the same architecture under another name
SAME_ARCHITECTURE: tuple[frozenset[str], ...] = (frozenset(ROBERTA_FAMILY[:3]),)


def same_architecture(a: str, b: str) -> bool:
    """Are model types ``a`` and ``b`` the same architecture (``roberta`` and ``xlm-roberta`` are)?"""
    return a == b or any(a in group and b in group for group in SAME_ARCHITECTURE)


def where(model_name, cls=None) -> str:
    who = f"{cls.__module__}.{cls.__qualname__}" if cls is not None else "flash_attn BERT"
    return f"{who}.from_pretrained({str(model_name)!r})"


def prefix_candidates(keys) -> list[str]:
    """Every prefix under which the checkpoint holds ``embeddings.word_embeddings.weight``
    (``''``, ``'bert.'``, ``'q_encoder.'`` ...), sorted: the same list in every process."""
    return sorted({k[: -len(ANCHOR)] for k in keys if k.endswith(ANCHOR) and (k == ANCHOR or k[-len(ANCHOR) - 1] == ".")})


def checkpoint_config(model_name) -> tuple[str | None, dict | None]:
    """``(path, parsed config.json)`` of the checkpoint, or ``(None, None)`` when it has none (or it
    cannot be read: then the key layout and the weights are all there is to judge by)."""
    import json

    path: str | None = os.path.join(str(model_name), "config.json")
    if not os.path.isdir(str(model_name)):
        try:
            from transformers.utils.hub import cached_file

            path = cached_file(str(model_name), "config.json", _raise_exceptions_for_missing_entries=False)
        except Exception:  # noqa: BLE001 - offline, no such repo: judged by the weights alone
            path = None
    if not path or not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return path, None
    return path, cfg if isinstance(cfg, dict) else None


def zero_row(rows) -> int | None:
    """Index of the first all-zero row among the first position-embedding rows, else None."""
    if rows is None or getattr(rows, "ndim", 0) != 2:
        return None
    head = rows[:POSITION_ROWS]
    if head.is_meta:
        return None
    zero = (head == 0).all(dim=1)
    return int(zero.nonzero()[0, 0]) if bool(zero.any()) else None


def check_bert_checkpoint(source: str, keys, *, config=None, config_path=None, config_json=None,
                          positions=None, prefix=None, who: str | None = None) -> str:
    """The prefix of the checkpoint's BERT backbone, or ``CheckpointError`` when the checkpoint is
    not a BERT that flash-attn's ``BertModel`` reproduces. Shared by the patched ``from_pretrained``
    and ``python -m hfpatches inspect --model flash_attn.models.bert.BertModel``, so both say the same.

    ``keys``: the checkpoint's tensor names. ``config``: the config object the model is built from.
    ``config_json``: the checkpoint's own config.json (``config_path``: where it is). ``positions``:
    a function from a checkpoint key to the first rows of that tensor (None: absent or not read).
    ``prefix``: the caller's explicit choice (``checkpoint_prefix=``), else it must be unambiguous.
    Checked, in this order: config.json's ``model_type`` and ``position_embedding_type``; the config
    object's; where the backbone is (one candidate, ``''`` or ``'bert.'``, unless chosen explicitly;
    never a RoBERTa-family prefix); the position-id scheme (no padding row in the position table)."""
    who = who or where(source)
    refuse = BERT_ONLY_FIX
    if config_json is not None:
        mt = config_json.get("model_type")
        arch = config_json.get("architectures")
        said = f"{config_path} says model_type {mt!r}" + (f" (architectures {arch})" if arch else "")
        if mt is not None and mt not in BERT_MODEL_TYPES:
            raise CheckpointError(f"{who}: not a BERT checkpoint: {said}; expected model_type 'bert'. "
                                  f"{family_note(mt, config_json)}{refuse}")
        pe = config_json.get("position_embedding_type", "absolute")
        if pe not in (None, "absolute"):
            raise CheckpointError(f"{who}: {config_path} says position_embedding_type {pe!r}; flash-attn's BERT "
                                  f"has absolute position embeddings only (expected 'absolute'). {refuse}")
    mt = getattr(config, "model_type", None)
    if mt and mt not in BERT_MODEL_TYPES:
        raise CheckpointError(f"{who}: the config passed is a {type(config).__name__} (model_type {mt!r}); "
                              f"expected a BertConfig (model_type 'bert'). {family_note(mt, {})}{refuse}")
    found = prefix_candidates(keys)
    if not found:
        hint = f" ({config_path} says {config_json.get('architectures') or config_json.get('model_type')})" \
            if config_json and (config_json.get("architectures") or config_json.get("model_type")) else ""
        raise CheckpointError(f"{who}: not a BERT checkpoint{hint}: no '{ANCHOR}' under any prefix; "
                              f"its keys look like {show(list(keys)[:3])}. {refuse}")
    shown = ", ".join(repr(p) for p in found)
    explicit = prefix is not None
    if explicit:
        if prefix and not prefix.endswith("."):
            prefix += "."
        if prefix not in found:
            raise CheckpointError(f"{who}: checkpoint_prefix={prefix!r} holds no '{ANCHOR}'; the checkpoint has a "
                                  f"BERT embedding table under: {shown}. Pass one of these.")
    elif len(found) > 1:
        raise CheckpointError(f"{who}: ambiguous checkpoint: it holds {len(found)} BERT embedding tables, under "
                              f"{shown} (a dual encoder, a student/teacher pair?); expected one. Refusing to pick "
                              f"one: choose with from_pretrained(..., checkpoint_prefix={found[0]!r}) (or another "
                              "of these).")
    else:
        prefix = found[0]
    family = FOREIGN_PREFIXES.get(prefix)
    if family:
        raise CheckpointError(f"{who}: not a BERT checkpoint: its encoder sits under {prefix!r}, the prefix of "
                              f"{family} models; expected '' or 'bert.'. "
                              f"{family_note('roberta' if family.startswith(('RoBERTa', 'Data2Vec')) else '', {})}"
                              f"{refuse}")
    if not explicit and prefix not in ("", "bert."):
        raise CheckpointError(f"{who}: the checkpoint's BERT embedding table sits under {prefix!r}, not at the top "
                              "level or under 'bert.' (where transformers' BertModel / BertForPreTraining save it); "
                              "refusing to guess that the weights there are a BERT encoder. If they are, say so: "
                              f"from_pretrained(..., checkpoint_prefix={prefix!r}).")
    key = prefix + POSITIONS
    row = zero_row(positions(key) if positions is not None else None)
    if row is not None:
        raise CheckpointError(f"{who}: not a BERT position table: row {row} of {key} is all zeros, the padding row "
                              f"of RoBERTa-style embeddings, which count positions from padding_idx + 1 = {row + 1}; "
                              f"expected BERT's positions counted from 0 (no zero row). {refuse}")
    return prefix


def family_note(model_type: str, cfg: dict) -> str:
    if model_type in ROBERTA_FAMILY:
        pad = cfg.get("pad_token_id", 1)
        return (f"{model_type} counts positions from padding_idx + 1 (= {pad + 1 if isinstance(pad, int) else 'pad + 1'}) "
                "where BERT counts from 0, so flash-attn's BertModel would compute different outputs from the same "
                "weights. ")
    return ""


def target_prefix(model, fb) -> str:
    """Where ``model`` holds its flash-attn ``BertModel``: '' (it is one), 'bert.', or another name."""
    if isinstance(model, fb.BertModel):
        return ""
    names = [n for n, m in model.named_modules() if n and isinstance(m, fb.BertModel)]
    return names[0] + "." if names else "bert."   # no BertModel inside: remap_state_dict's assumption


def to_bert_prefix(sd: dict, prefix: str) -> dict:
    """Move the checkpoint's backbone keys (``<prefix>embeddings.`` ...) under ``bert.``."""
    out = {}
    for k, v in sd.items():
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is not None and rest.startswith(CHECKPOINT_PARTS):
            out["bert." + rest] = v
        else:
            out[k] = v
    return out


def from_bert_prefix(sd: dict, target: str) -> dict:
    if target == "bert.":
        return sd
    return {(target + k[5:] if k.startswith("bert.") else k): v for k, v in sd.items()}


def layer_count(keys) -> int:
    import re

    idx = [int(m.group(1)) for k in keys for m in [re.search(r"encoder\.layers?\.(\d+)\.", k)] if m]
    return max(idx) + 1 if idx else 0


# ----------------------------------------------------------------------------- checking
def show(keys) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - SHOW} more)" if len(keys) > SHOW else ""
    return ", ".join(keys[:SHOW]) + more


class Plan:
    """What a load would do, key by key (computed before anything is copied)."""

    def __init__(self, model, sd: dict, target: str):
        expected = model.state_dict(keep_vars=True)
        aliases: dict[int, list[str]] = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
            aliases.setdefault(id(t), []).append(name)
        backbone = tuple(target + p for p in BACKBONE_PARTS)
        self.missing_backbone: list[str] = []
        self.missing_allowed: list[str] = []
        for k, t in expected.items():
            if k in sd or any(a in sd for a in aliases.get(id(t), ())) or not t.is_floating_point():
                continue
            (self.missing_backbone if k.startswith(backbone) else self.missing_allowed).append(k)
        self.unexpected_backbone: list[str] = []
        self.unexpected_allowed: list[str] = []
        self.ignored: list[str] = []
        for k, v in sd.items():
            if k in expected:
                continue
            if not v.is_floating_point():
                self.ignored.append(k)
            else:
                (self.unexpected_backbone if k.startswith(backbone) else self.unexpected_allowed).append(k)
        self.mismatched = [(k, tuple(sd[k].shape), tuple(t.shape)) for k, t in expected.items()
                           if k in sd and tuple(sd[k].shape) != tuple(t.shape)]

    @property
    def ok(self) -> bool:
        return not (self.missing_backbone or self.unexpected_backbone or self.mismatched)


def likely_cause(plan: Plan, raw_keys, emb_shape, config) -> str:
    causes = []
    hidden = getattr(config, "hidden_size", None)
    if emb_shape is not None and len(emb_shape) == 2 and hidden is not None and emb_shape[1] != hidden:
        causes.append(f"the config does not match the checkpoint: its hidden size is {emb_shape[1]}, "
                      f"config.hidden_size is {hidden}")
    n_ckpt, n_cfg = layer_count(raw_keys), getattr(config, "num_hidden_layers", None)
    if n_ckpt and n_cfg is not None and n_ckpt != n_cfg:
        causes.append(f"the checkpoint has {n_ckpt} encoder layers, config.num_hidden_layers is {n_cfg}")
    if plan.mismatched and not causes:
        causes.append("the config does not match the checkpoint (see the shapes above); build the config "
                      "from the checkpoint's own config.json")
    if not causes:
        causes.append("the checkpoint is partial or names its weights differently from a transformers BERT")
    return "; ".join(causes)


def load_error(model_name, cls, *, missing, unexpected, mismatched=(), cause: str):
    lines = [f"{where(model_name, cls)}: the checkpoint does not fit this model; refusing to return a model "
             "with randomly initialised backbone weights."]
    if missing:
        lines.append(f"  missing backbone weights ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"  unexpected checkpoint weights ({len(unexpected)}): {show(unexpected)}")
    if mismatched:
        shown = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        lines.append(f"  shape mismatches ({len(shown)}): {show(shown)}")
    lines.append(f"  likely cause: {cause}")
    return CheckpointError("\n".join(lines))


def remap_checkpoint(box: list, prefix: str, config, model, *, raw_keys, who) -> tuple[dict, str]:
    """The checkpoint's state dict (the one item of ``box``, handed over so that flash-attn's remap
    can free q/k/v once fused) in ``model``'s names: backbone moved under ``bert.``, flash-attn's own
    ``remap_state_dict``, then moved to where ``model`` holds its BertModel. Returns (state dict, that
    prefix). Works on meta tensors too (``inspect``). Missing Q/K/V raise the missing-layer error."""
    fb = sys.modules[MODULE]
    box.append(to_bert_prefix(box.pop(), prefix))
    qkv = [f"bert.encoder.layer.{d}.attention.self.{p}.{w}" for d in range(config.num_hidden_layers)
           for p in ("query", "key", "value") for w in ("weight", "bias")]
    if any(k not in box[0] for k in qkv):
        # remap_state_dict pops q/k/v unconditionally: say everything that is missing instead of a KeyError
        missing, whole = missing_layer_keys(raw_keys, prefix, config.num_hidden_layers)
        raise load_error(*who, missing=missing, unexpected=[], cause=cause_for_layers(raw_keys, config, whole))
    stand_ins = add_stand_ins(box[0], config)
    sd = fb.remap_state_dict(box.pop(), config)
    for k in stand_ins:
        sd.pop(k, None)
    target = target_prefix(model, fb)
    return from_bert_prefix(sd, target), target


def add_stand_ins(sd: dict, config) -> list[str]:
    """With ``pad_vocab_size_multiple > 1`` flash-attn's remap pads the MLM decoder's weight and bias
    too; a checkpoint without them (a bare BertModel, or transformers' safetensors, which drop the
    tied decoder weight) gets stand-ins for that call. Returns their names (dropped afterwards)."""
    added = []
    if getattr(config, "pad_vocab_size_multiple", 1) > 1:
        emb = sd["bert." + ANCHOR]
        if DECODER_W not in sd:
            sd[DECODER_W] = emb
            added.append(DECODER_W)
        if DECODER_B not in sd and HF_MLM_BIAS not in sd:
            sd[DECODER_B] = emb.new_zeros(emb.shape[0])
            added.append(DECODER_B)
    return added


LAYER_KEYS = tuple(f"attention.self.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias")) + tuple(
    f"{m}.{w}" for m in ("attention.output.dense", "attention.output.LayerNorm", "intermediate.dense", "output.dense",
                         "output.LayerNorm") for w in ("weight", "bias"))   # a transformers BERT layer's 16 weights


def missing_layer_keys(raw_keys, prefix: str, n_layers: int) -> tuple[list[str], list[int]]:
    """Every encoder-layer weight the checkpoint lacks for ``n_layers`` layers (in its own naming:
    the weight names its other layers use, ``gamma``/``beta`` included, else transformers'), and
    the layers that are missing entirely."""
    import re

    pat = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.(.+)$")
    have: dict[int, set] = {}
    for k in raw_keys:
        m = pat.match(k)
        if m:
            have.setdefault(int(m.group(1)), set()).add(m.group(2))
    used = set().union(*have.values()) | set(LAYER_KEYS[:6]) if have else set(LAYER_KEYS)
    names = [n for n in LAYER_KEYS if n in used] + sorted(used - set(LAYER_KEYS))
    missing = [f"{prefix}encoder.layer.{d}.{n}" for d in range(n_layers) for n in names if n not in have.get(d, ())]
    whole = [d for d in range(n_layers) if d not in have]
    return missing, whole


def cause_for_layers(raw_keys, config, whole=()) -> str:
    n_ckpt = layer_count(raw_keys)
    gone = f" (layers missing entirely: {', '.join(map(str, whole))})" if whole else ""
    if n_ckpt and n_ckpt < config.num_hidden_layers:
        return (f"the checkpoint has {n_ckpt} encoder layers, config.num_hidden_layers is {config.num_hidden_layers}"
                f"{gone}; build the config from the checkpoint's own config.json")
    if whole:
        return f"the checkpoint lacks whole encoder layers{gone}: it is partial (an interrupted save or a missing shard?)"
    return "the checkpoint's attention weights are not named like a transformers BERT's (attention.self.query/key/value)"


def is_flash_bert(cls: object) -> bool:
    """One of flash-attn's BERT classes (or a subclass): loads go through ``flash_attn_bert_prefix``."""
    fb = sys.modules.get(MODULE)
    base = getattr(fb, "BertPreTrainedModel", None) if fb is not None else None
    return isinstance(cls, type) and base is not None and issubclass(cls, base)
