"""flair + PEFT: a model with ``peft_config`` embeddings saves, reloads and predicts; with one
compute dtype when the transformer is in bfloat16.

The bugs (flair <= 0.15.1, the newest release)
    1. ``TransformerEmbeddings(..., peft_config=LoraConfig(...))`` wraps the transformer with
       ``get_peft_model``, but ``to_params`` never saves the config. ``Model.save`` writes PEFT's
       key names (``embeddings.model.base_model.model.…``, ``….query.base_layer.weight``,
       ``….lora_A.default.weight``); ``Model.load`` rebuilds a plain transformer from the params
       and ``load_state_dict`` fails: ``Missing key(s) in state_dict:
       "embeddings.model.embeddings.word_embeddings.weight", …`` (flair issue #3623; fixed on
       flair's main by PR #3627, merged 2025-03-27, in no release).
    2. With the transformer in bfloat16 (``transformers_model_kwargs={"torch_dtype":
       torch.bfloat16}``, as PEFT/QLoRA set-ups do) ``predict`` and ``forward_loss`` fail: ``mat1
       and mat2 must have the same dtype, but got BFloat16 and Float`` - the embeddings are bf16,
       the decoder flair adds stays float32 (no upstream report for this half; ``SequenceTagger``
       fails only on a batch that needs no padding: its float32 padding tensor otherwise promotes
       the whole batch to float32). The sibling with
       ``subtoken_pooling="mean"``: ``fill_mean_token_embeddings`` scatters a float32 mask
       product into bf16 embeddings, ``scatter(): Expected self.dtype to be equal to src.dtype``
       (fixed on flair's main by PR #3651, also unreleased).
    Also fixed on the way, because a save/load fix must not lose models: ``Model.save`` writes
    straight onto the target, so a save interrupted mid-write (full disk, killed job) destroys the
    previous file; and ``torch.load`` does not check the zip's CRC-32, so a corrupted file loads
    flipped bits as weights.

Affected
    flair 0.14 (PEFT support) through 0.15.1, with any peft; the dtype half with or without peft.
    ``fixed_in`` is None: no release carries #3627/#3651. The probe, not the version, decides.

The probe
    A tiny flair ``TransformerDocumentEmbeddings`` (a 1-layer BERT of hidden size 8 and a 12-word
    tokenizer, written to a temporary directory; LoRA r=2 on ``query``; bfloat16), built once per
    process, ~0.3 s: (a) do its ``to_params()`` carry the PEFT config? (b) does a
    ``TextClassifier`` on it predict, or fail on the dtype? (c) does
    ``fill_mean_token_embeddings`` accept bf16 tensors? Bug present if any half is. torch's RNG,
    transformers' log level, flair's logger and ``TOKENIZERS_PARALLELISM`` are restored after.

What changes (all through ``ctx.wrap``; ``revert`` restores every original exactly)
    * ``TransformerEmbeddings.to_params``: a PEFT-wrapped transformer adds ``peft_config`` (a copy
      of the adapter's config object, the same parameter #3627 adds); with several adapters, or
      one not named ``default``, ``hfpatches_peft = {"adapters": {name: config}, "active": name}``
      instead. ``config_state_dict``'s ``torch_dtype`` is set to the dtype the weights really have
      (a bf16-loaded model upcast to float32 would otherwise reload in bf16 and round the weights).
    * ``TransformerEmbeddings.from_params`` rebuilds the ``hfpatches_peft`` adapters (named, the
      active one set) on the transformer it built, before flair loads the weights.
    * ``Model.save``: flair's own save into a temporary file beside the target (in a private hidden
      folder, under the target's own name: the bytes are those of a direct save), then
      ``os.replace`` (:func:`hfpatches.flair.atomic_save`): atomic, not fsync'ed (see there for the
      trade-off). Temporaries left by saves killed mid-write are removed by the next save into that
      folder (only hfpatches' own, only provably dead ones); a FIFO or device target is written
      directly, never replaced.
    * ``Model.load`` (every flair model class loads through it): a local file is checked first
      without unpickling (:func:`hfpatches.flair.inspect_model_file`: CRC-32 of every member,
      pickle opcodes walked, not executed; the CRC pass runs on a thread beside flair's own load and
      is waited for before the model is returned); a truncated/corrupted file, or a PEFT file written by
      unpatched flair (no config: LoRA's ``lora_alpha`` is not in the weights), raises
      :class:`hfpatches.errors.CheckpointError` naming the file and the fix
      (``hfpatches.flair.load(path, peft_config=...)``). A state-dict mismatch also becomes a
      CheckpointError naming the file. The loaded model gets the dtype policy.
    * ``predict`` / ``forward_loss`` of ``DefaultClassifier`` (TextClassifier, TextPairClassifier,
      TextTripleClassifier, TokenClassifier, SpanClassifier, RelationExtractor,
      RelationClassifier) and ``SequenceTagger`` (declared targets), and of every other flair
      model class that defines its own (found at apply: TextRegressor, TARS, Lemmatizer, …), call
      :func:`hfpatches.flair.unify_dtype` first: one compute dtype per part, ``HFPATCHES_DTYPE_POLICY=
      backbone`` (default: the transformer keeps its dtype, the head is held in float32 and casts
      the transformer's output up where it takes it - float32 master weights, so a bf16 backbone
      does not cost the head its training) or ``float32`` (the whole model, transformer included,
      in float32); per model with ``hfpatches.flair.unify_dtype(model, "float32")`` or
      ``hfpatches.flair.load(..., dtype_policy=...)``. A malformed value fails ``apply()``.
      Parameters are cast in place (an optimizer holding them keeps working).
    * ``fill_mean_token_embeddings`` runs in float32 when its inputs are not, and returns the
      embeddings' dtype.

Compatibility of the files
    A file written with the patch from a model with one adapter named ``default`` (what flair
    creates) loads in *unpatched* flair 0.15.1 too, exactly (flair's ``__init__`` already accepts
    ``peft_config``), and in flair's main (#3627 stores the same parameter); it needs peft to
    unpickle. A file with other adapter names fails in unpatched flair with ``TypeError: ...
    unexpected keyword argument 'hfpatches_peft'`` (raised by transformers' model constructor):
    load it with the patch live. The ``torch_dtype`` correction is plain config data.

Design decisions
    * Not wrapping ``TransformerEmbeddings.__init__``: flair's ``get_instance_parameters(locals())``
      breaks under a wrapper (``KeyError: 'saved_config'``); ``to_params``/``from_params`` are the
      serialisation seams flair itself uses (``create_from_state`` is overridden per subclass).
    * The config is stored as the PeftConfig object (like #3627) so that unpatched flair can load
      the file; flair files are pickles anyway.
    * A legacy file is detected from its key names by the scan, before anything is unpickled, and
      never loaded with a guessed ``lora_alpha``.
    * The head is not cast to the transformer's bf16 (0.1.0 did): AdamW updates below half a bf16
      step round away (lr 5e-5: 88 % of a MiniLM classifier's decoder weights never moved in 10
      steps). The upcast is a forward pre-hook on each head module that owns floating-point
      parameters, so the model stays usable without the patch (revert, ``hfpatches.flair.load``).
    * dtype unification runs at the compute entry points (and after load) rather than at
      construction: flair model constructors cannot be wrapped safely, and the first predict or
      training step is where the mismatch bites. What to walk is cached per model structure: a call
      costs well under a millisecond on MiniLM (no copy when the dtypes already agree).
    * Atomic saves are not fsync'ed: atomic against an interrupted write, which is the failure seen
      in practice, at no measurable cost; ``atomic_save(..., durable=True)`` adds fdatasync.
    * The CRC-32 pass (~50 ms CPU per 90 MB) is kept: torch.load returns flipped bits silently.
"""
from __future__ import annotations

from .._registry import Patch, ProbeResult, Target

PATCH_ID = "peft_save_load"
TRANSFORMER = "flair.embeddings.transformer"
NN_MODEL = "flair.nn.model"
TAGGER = "flair.models.sequence_tagger_model"
_COMPUTE = ("predict", "forward_loss")


# ----------------------------------------------------------------------------- wrappers
def _to_params(wrapped, instance, args, kwargs):
    params = wrapped(*args, **kwargs)
    if not isinstance(params, dict):
        return params
    from ..flair import MULTI_ADAPTER_KEY, backbone_dtype

    model = getattr(instance, "model", None)
    cfgs = getattr(model, "peft_config", None)
    if isinstance(cfgs, dict) and cfgs and params.get("peft_config") is None and MULTI_ADAPTER_KEY not in params:
        import copy

        names = list(cfgs)
        if names == ["default"]:
            params["peft_config"] = copy.deepcopy(cfgs["default"])
        else:
            active = getattr(model, "active_adapter", names[0])
            active = active[0] if isinstance(active, (list, tuple)) else active
            params[MULTI_ADAPTER_KEY] = {"adapters": {n: copy.deepcopy(c) for n, c in cfgs.items()},
                                         "active": active}
    conf = params.get("config_state_dict")
    if isinstance(conf, dict) and model is not None:
        dtype = backbone_dtype(model)
        if dtype is not None:
            name = str(dtype).rpartition(".")[2]
            keys = [k for k in ("torch_dtype", "dtype") if k in conf] or ["torch_dtype"]
            for k in keys:
                conf[k] = name
    return params


def _from_params(wrapped, cls, args, kwargs):
    from ..flair import MULTI_ADAPTER_KEY

    params = args[0] if args else kwargs.get("params")
    extra = params.pop(MULTI_ADAPTER_KEY, None) if isinstance(params, dict) else None
    emb = wrapped(*args, **kwargs)
    if extra:
        import copy

        from peft import get_peft_model

        adapters = extra["adapters"]
        names = list(adapters)
        pm = get_peft_model(emb.model, copy.deepcopy(adapters[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            pm.add_adapter(n, copy.deepcopy(adapters[n]))
        pm.set_adapter(extra.get("active", names[0]))
        emb.model = pm
    return emb


def _save(wrapped, instance, args, kwargs):
    from ..flair import atomic_save

    args = list(args)
    target = args.pop(0) if args else kwargs.pop("model_file")
    atomic_save(target, lambda tmp: wrapped(tmp, *args, **kwargs))


def _load(wrapped, cls, args, kwargs):
    import os

    from ..errors import CheckpointError
    from ..flair import (_STATE_DICT_ERROR, FileCheck, check_state, legacy_message, loading_file, state_dict_error,
                         unify_dtype)

    src = args[0] if args else kwargs.get("model_path")
    check = None
    if isinstance(src, (str, os.PathLike)) and os.path.isfile(src):
        check = FileCheck(src)
        if check.info.legacy_peft:
            raise CheckpointError(legacy_message(check.path, check.info))
        check.start()  # the CRC-32 pass runs beside flair's load; waited for before returning
    elif isinstance(src, dict):
        check_state(src)
    try:
        if check is not None:
            with loading_file(check.path):
                model = wrapped(*args, **kwargs)
        else:
            model = wrapped(*args, **kwargs)
    except BaseException as e:
        if check is not None:
            check.result()  # a damaged file explains the failure better than what it caused
        if isinstance(e, RuntimeError) and _STATE_DICT_ERROR in str(e):
            raise state_dict_error(check.path if check else None, e) from e
        raise
    if check is not None:
        check.result()  # a model built from a file that fails its CRC is never returned
    unify_dtype(model)
    return model


def _unified(wrapped, instance, args, kwargs):
    from ..flair import unify_dtype

    unify_dtype(instance)
    return wrapped(*args, **kwargs)


def _fill_mean(wrapped, instance, args, kwargs):
    """Mean sub-token pooling in float32 when the inputs are not float32; result in their dtype."""
    import torch

    names = ("all_token_embeddings", "sentence_hidden_states", "word_ids", "token_lengths")
    bound = dict(zip(names, args), **kwargs)
    emb, hidden = bound["all_token_embeddings"], bound["sentence_hidden_states"]
    if emb.dtype == torch.float32 and hidden.dtype == torch.float32:
        return wrapped(*args, **kwargs)
    out = wrapped(emb.float(), hidden.float(), bound["word_ids"], bound["token_lengths"])
    return out.to(emb.dtype)


def _compute_owners(nn_model):
    """flair's model classes that define their own predict / forward_loss (abstract ones skipped)."""
    from ..flair import model_classes

    out = []
    for c in model_classes(nn_model.Model):
        if not c.__module__.startswith("flair."):
            continue
        for name in _COMPUTE:
            fn = vars(c).get(name)
            if fn is not None and not getattr(fn, "__isabstractmethod__", False):
                out.append((c, name))
    return sorted(out, key=lambda cn: (cn[0].__module__, cn[0].__qualname__, cn[1]))


def _apply(ctx) -> None:
    tr = ctx.module(TRANSFORMER)
    nn_model = ctx.module(NN_MODEL)
    ctx.wrap(tr.TransformerEmbeddings, "to_params", _to_params)
    ctx.wrap(tr.TransformerEmbeddings, "from_params", _from_params)
    ctx.wrap(tr, "fill_mean_token_embeddings", _fill_mean)
    ctx.wrap(nn_model.Model, "save", _save)
    ctx.wrap(nn_model.Model, "load", _load)
    for owner, name in _compute_owners(nn_model):
        ctx.wrap(owner, name, _unified)


# ----------------------------------------------------------------------------- probe
_TINY: dict = {}
_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "good", "bad", "film", "##s"]


class _Quiet:
    """Undo what building a flair embedding does to the process (see the probe docs)."""

    def __enter__(self):
        import logging
        import os

        import torch
        from transformers.utils import logging as tlog

        self.tlog, self.level = tlog, tlog.get_verbosity()
        self.env = os.environ.get("TOKENIZERS_PARALLELISM")
        self.flog = logging.getLogger("flair")
        self.flevel = self.flog.level
        self.flog.setLevel(logging.WARNING)
        self.rng = torch.random.fork_rng(devices=[])
        self.rng.__enter__()
        return self

    def __exit__(self, *exc):
        import os

        self.rng.__exit__(*exc)
        self.flog.setLevel(self.flevel)
        self.tlog.set_verbosity(self.level)
        if self.env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self.env


def _tiny_embedding():
    """The probe's tiny bf16 LoRA document embedding (built once per process)."""
    if "emb" in _TINY:
        return _TINY["emb"]
    import importlib.util
    import os
    import tempfile

    import torch
    from flair.embeddings import TransformerDocumentEmbeddings
    from transformers import BertConfig, BertModel, BertTokenizerFast

    has_peft = importlib.util.find_spec("peft") is not None
    with tempfile.TemporaryDirectory(prefix="hfpatches-flair-probe-") as d:
        vocab = os.path.join(d, "vocab.txt")
        with open(vocab, "w") as fh:
            fh.write("\n".join(_VOCAB) + "\n")
        BertTokenizerFast(vocab_file=vocab).save_pretrained(d)
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(_VOCAB), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8, max_position_embeddings=16)
        BertModel(cfg).save_pretrained(d)
        kw = {}
        if has_peft:
            from peft import LoraConfig

            kw["peft_config"] = LoraConfig(r=2, lora_alpha=4, target_modules=["query"])
        emb = TransformerDocumentEmbeddings(d, fine_tune=True, transformers_model_kwargs={"torch_dtype": torch.bfloat16},
                                            **kw)
    _TINY["emb"], _TINY["peft"] = emb, has_peft
    return emb


def _probe() -> ProbeResult:
    import sys

    import torch
    from flair.data import Dictionary, Sentence
    from flair.models import TextClassifier

    found, fixed = [], []
    with _Quiet():
        emb = _tiny_embedding()
        if _TINY["peft"]:
            params = emb.to_params()
            if params.get("peft_config") is None and params.get("hfpatches_peft") is None:
                found.append("to_params() drops the PEFT config (#3623)")
            else:
                fixed.append("to_params() carries the PEFT config")
        labels = Dictionary(add_unk=False)
        for v in ("good", "bad"):
            labels.add_item(v)
        clf = TextClassifier(emb, label_dictionary=labels, label_type="probe")
        object.__setattr__(clf, "_hfpatches_dtype_policy", "backbone")  # the probe ignores the env switch
        try:
            clf.predict(Sentence("a good film"))
            fixed.append("bf16 predict works")
        except RuntimeError as e:
            if "dtype" not in str(e):
                raise
            found.append(f"bf16 predict fails ({str(e).splitlines()[0][:80]})")
        fill = sys.modules[TRANSFORMER].fill_mean_token_embeddings
        hidden = torch.arange(12, dtype=torch.bfloat16).reshape(1, 3, 4)
        try:
            out = fill(torch.zeros(1, 2, 4, dtype=torch.bfloat16), hidden, torch.tensor([[0, 0, 1]]),
                       torch.tensor([2]))
        except RuntimeError as e:
            found.append(f"bf16 mean pooling fails ({str(e).splitlines()[0][:60]})")
        else:
            want = torch.stack([hidden[0, :2].float().mean(0), hidden[0, 2].float()]).to(torch.bfloat16)
            if out.dtype != torch.bfloat16 or not torch.equal(out[0], want):
                found.append("bf16 mean pooling gives wrong values")
            else:
                fixed.append("bf16 mean pooling works")
    if found:
        return ProbeResult(True, "; ".join(found))
    return ProbeResult(False, "; ".join(fixed))


PATCH = Patch(
    id=PATCH_ID,
    summary="flair + PEFT: the PEFT config travels with the model file, legacy/corrupt files raise a clear error, "
            "atomic saves, one compute dtype for bf16 transformers",
    upstream=("flairNLP/flair#3623", "flairNLP/flair#3627", "flairNLP/flair#3651"),
    requires=("flair>=0.14",),
    fixed_in=None,
    targets=(
        Target(TRANSFORMER, "TransformerEmbeddings.to_params", params=("self",)),
        Target(TRANSFORMER, "TransformerEmbeddings.from_params", params=("cls", "params")),
        Target(TRANSFORMER, "fill_mean_token_embeddings",
               params=("all_token_embeddings", "sentence_hidden_states", "word_ids", "token_lengths")),
        Target(NN_MODEL, "Model.save", params=("self", "model_file")),
        Target(NN_MODEL, "Model.load", params=("cls", "model_path")),
        Target(NN_MODEL, "DefaultClassifier.predict", params=("self", "sentences")),
        Target(NN_MODEL, "DefaultClassifier.forward_loss", params=("self", "sentences")),
        Target(TAGGER, "SequenceTagger.predict", params=("self", "sentences")),
        Target(TAGGER, "SequenceTagger.forward_loss", params=("self", "sentences")),
    ),
    probe=_probe,
    apply=_apply,
    affected="flair 0.14-0.15.1 (#3627/#3651 merged on main, unreleased)",
    verified_stacks=("affected", "latest"),
)
