"""``peft_save_load``: flair models with PEFT-wrapped embeddings save, reload and predict.

Bug
    flair's ``TransformerEmbeddings(peft_config=...)`` never saves the PEFT config, so
    ``Model.load`` fails on the PEFT key names; with a bf16 transformer ``predict`` /
    ``forward_loss`` fail on mixed dtypes (and mean subtoken pooling on ``scatter``); an
    interrupted save destroys the previous file.
Affected
    flair 0.14 .. 0.15.1 (the fixes #3627/#3651 are merged on main, in no release).
Upstream
    flairNLP/flair#3623, #3627, #3651.
Probe
    a tiny flair classifier with a LoRA-wrapped tiny BERT: save, load, predict in a temp dir.
What changes
    the PEFT config travels with the model file (readable by unpatched flair too); legacy or
    corrupt files raise ``CheckpointError`` naming the file; saves are atomic; one compute dtype
    for bf16 transformers (``HFPATCHES_DTYPE_POLICY``), trainable heads kept in float32.
    Helpers: ``hfpatches.flair.load`` / ``unify_dtype``. Rationale: docs/patches/peft_save_load.md.
"""
from hfpatches._declare import Patch, Target

_TRANSFORMER = "flair.embeddings.transformer"
_NN_MODEL = "flair.nn.model"
_TAGGER = "flair.models.sequence_tagger_model"

PATCH = Patch(
    id="peft_save_load",
    summary="flair + PEFT: the PEFT config travels with the model file, legacy/corrupt files raise a clear error, "
            "atomic saves, one compute dtype for bf16 transformers",
    upstream=("flairNLP/flair#3623", "flairNLP/flair#3627", "flairNLP/flair#3651"),
    requires=("flair>=0.14",),
    fixed_in=None,
    targets=(
        Target(_TRANSFORMER, "TransformerEmbeddings.to_params", params=("self",)),
        Target(_TRANSFORMER, "TransformerEmbeddings.from_params", params=("cls", "params")),
        Target(_TRANSFORMER, "fill_mean_token_embeddings",
               params=("all_token_embeddings", "sentence_hidden_states", "word_ids", "token_lengths")),
        Target(_NN_MODEL, "Model.save", params=("self", "model_file")),
        Target(_NN_MODEL, "Model.load", params=("cls", "model_path")),
        Target(_NN_MODEL, "DefaultClassifier.predict", params=("self", "sentences")),
        Target(_NN_MODEL, "DefaultClassifier.forward_loss", params=("self", "sentences")),
        Target(_TAGGER, "SequenceTagger.predict", params=("self", "sentences")),
        Target(_TAGGER, "SequenceTagger.forward_loss", params=("self", "sentences")),
    ),
    affected="checked up to 0.15.1; #3627/#3651 are merged on main, in no release",
)
