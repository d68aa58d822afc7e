"""Demo: flair + PEFT on all-MiniLM-L6-v2 + LoRA(r=4): the reload failure and the bf16 dtype
failure unpatched, then the same scenarios with ``peft_save_load``, with numbers. Also a legacy
file (written unpatched) loaded with its config, and ``peft_state_dict(merge=True)`` into a plain
``BertModel``.

The scenario builders here are shared with the tests and the benchmark, so all three run the
same model the same way.
"""
from __future__ import annotations

import contextlib
import os
import tempfile

PID = "peft_save_load"

TRAIN = [
    ("I loved this film, the acting was wonderful.", "pos"),
    ("A warm, funny and beautifully shot story.", "pos"),
    ("The plot was dull and the dialogue painful.", "neg"),
    ("I walked out after an hour, what a waste of time.", "neg"),
]
HELD_OUT = [
    "One of the best movies I have seen this year.",
    "Boring, predictable and far too long.",
    "The soundtrack is nice but the story goes nowhere.",
]


def lora_config(**over):
    from peft import LoraConfig

    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    return LoraConfig(**{**kw, **over})


@contextlib.contextmanager
def quiet():
    """flair's INFO lines (trainable params, ...), Python warnings, transformers' log and progress
    bars off for the block; all restored after."""
    import logging
    import warnings

    from .._quiet import Quiet as _Quiet  # transformers' verbosity + progress bars

    log = logging.getLogger("flair")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), _Quiet():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def label_dictionary(values=("pos", "neg")):
    from flair.data import Dictionary

    d = Dictionary(add_unk=False)
    for v in values:
        d.add_item(v)
    return d


def embeddings(kind: str = "document", *, dtype=None, peft: bool = True, **kw):
    """flair TransformerEmbeddings on the packaged all-MiniLM-L6-v2 (LoRA r=4 on query/value)."""
    from flair.embeddings import TransformerDocumentEmbeddings, TransformerEmbeddings, TransformerWordEmbeddings

    from .._models import minilm_dir

    cls = {"document": TransformerDocumentEmbeddings, "word": TransformerWordEmbeddings,
           "both": TransformerEmbeddings}[kind]
    if dtype is not None:
        kw["transformers_model_kwargs"] = {"torch_dtype": dtype}
    if peft:
        kw.setdefault("peft_config", lora_config())
    with quiet():
        return cls(minilm_dir(), fine_tune=True, **kw)


def build_classifier(*, dtype=None, peft: bool = True, seed: int = 0):
    """A TextClassifier (pos/neg) on MiniLM (+ LoRA unless ``peft=False``), seeded."""
    import torch
    from flair.models import TextClassifier

    torch.manual_seed(seed)
    emb = embeddings("document", dtype=dtype, peft=peft)
    with quiet():
        return TextClassifier(emb, label_dictionary=label_dictionary(), label_type="sentiment")


def sentences(texts=None):
    from flair.data import Sentence

    return [Sentence(t) for t in (texts or HELD_OUT)]


def labelled(pairs=None, label_type: str = "sentiment"):
    from flair.data import Sentence

    out = []
    for text, value in pairs or TRAIN:
        s = Sentence(text)
        s.add_label(label_type, value)
        out.append(s)
    return out


def train(model, batch, steps: int = 2, lr: float = 1e-3) -> list[float]:
    """``steps`` optimizer steps of ``forward_loss`` on ``batch`` (AdamW on the trainable parameters)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    try:
        for _ in range(steps):
            loss, _n = model.forward_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            for s in batch:
                s.clear_embeddings()
    finally:
        model.eval()
    return losses


def scores(model, texts=None) -> list[tuple]:
    """(label, score) of every class for each held-out sentence (fresh Sentence objects)."""
    out = []
    batch = sentences(texts)
    model.predict(batch, return_probabilities_for_all_classes=True)
    for s in batch:
        out.append(tuple((lab.value, lab.score) for lab in s.get_labels(model.label_type)))
    return out


MEAN_TEXT = "Tokenization of unbelievably long words works"  # 6 words, several split into sub-tokens


def mean_pooled(emb, text: str = MEAN_TEXT):
    """Token embeddings of ``text`` from ``emb`` (subtoken_pooling="mean"), stacked: (words, dim)."""
    import torch
    from flair.data import Sentence

    s = Sentence(text)
    emb.embed(s)
    return torch.stack([t.get_embedding() for t in s])


def max_diff(a, b) -> float:
    return max(abs(x[1] - y[1]) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def first_line(e: BaseException, n: int = 150) -> str:
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {line[:n]}{' ...' if len(line) > n else ''}"


def trained_classifier(*, dtype=None, seed: int = 0):
    """Build, train 2 steps, return (model, losses)."""
    model = build_classifier(dtype=dtype, seed=seed)
    return model, train(model, labelled())


def merged_bert(peft_model):
    """A plain transformers BertModel loaded strictly from ``peft_state_dict(merge=True)``."""
    from transformers import BertModel

    import hfpatches

    sd = hfpatches.peft_state_dict(peft_model, merge=True)
    plain = BertModel(peft_model.base_model.model.config)
    plain.load_state_dict(sd, strict=True)
    return plain.to(next(iter(sd.values())).dtype).eval()


def bert_outputs(model, texts=None):
    import torch
    from transformers import AutoTokenizer

    from .._models import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    batch = tok(texts or HELD_OUT, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state


# ----------------------------------------------------------------------------- demo
def _p_pos(rows) -> str:
    return ", ".join(f"{dict(r)['pos']:.4f}" for r in rows)


def _merge_section(say, peft_model) -> float:
    plain = merged_bert(peft_model)
    diff = float((bert_outputs(peft_model) - bert_outputs(plain)).abs().max())
    say(f"peft_state_dict(merge=True) -> plain BertModel, strict load: max |hidden diff| vs the PEFT model "
        f"{diff:.1e}")
    return diff


def run(say) -> bool:
    import importlib.util

    import hfpatches

    if importlib.util.find_spec("flair") is None:
        rep = hfpatches.apply(only=[PID])[PID]
        say(f"{rep.outcome.value}: {rep.reason}")
        say("building all-MiniLM-L6-v2 + LoRA(r=4) with peft (no flair here) ...")
        import torch
        from peft import get_peft_model
        from transformers import BertModel

        from .._models import minilm_dir

        torch.manual_seed(0)
        with quiet():
            pm = get_peft_model(BertModel.from_pretrained(minilm_dir()), lora_config())
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        return _merge_section(say, pm) <= 1e-5
    import torch

    from ..errors import CheckpointError
    from ..flair import load as flair_load
    from ..flair import unify_dtype

    hfpatches.revert([PID])
    ok = True
    with tempfile.TemporaryDirectory(prefix="hfpatches-demo-flair-") as tmp:
        legacy, fixed = os.path.join(tmp, "legacy.pt"), os.path.join(tmp, "patched.pt")
        say("building all-MiniLM-L6-v2 + LoRA(r=4, query/value) TextClassifier, 2 training steps (fp32) ...")
        from flair.models import TextClassifier

        model, losses = trained_classifier()
        before = scores(model)
        say(f"trained: losses {', '.join(f'{x:.4f}' for x in losses)}; held-out P(pos) {_p_pos(before)}")
        with quiet():
            model.save(legacy)
        try:
            with quiet():
                TextClassifier.load(legacy)
            say("unpatched: reload worked (bug not reproduced)")
        except RuntimeError as e:
            text = str(e)
            missing = text[text.find("Missing key(s)"):].split(", ")[0] if "Missing key(s)" in text else first_line(e)
            n_missing = text.count('", "') + 1 if "Missing key(s)" in text else 0
            say(f"unpatched: save -> TextClassifier.load: RuntimeError: {missing}, ... ({n_missing} keys)")
        with hfpatches.patched(PID) as rep:
            say(f"patched ({rep[PID].outcome.value}): {rep[PID].reason}")
            with quiet():
                model.save(fixed)
                again = TextClassifier.load(fixed)
            after = scores(again)
            same = after == before
            ok &= same
            say(f"patched: save -> load: held-out scores {'identical (bit-exact)' if same else 'DIFFER'}, "
                f"max |diff| {max_diff(before, after):.1e}; trains on: loss "
                f"{train(again, labelled(), steps=1)[0]:.4f}")
            try:
                with quiet():
                    TextClassifier.load(legacy)
                say("patched: the legacy file loaded without its config (should have raised)")
                ok = False
            except CheckpointError as e:
                say(f"patched: legacy file (written unpatched) -> {first_line(e, 400)}")
            with quiet():
                rescued = flair_load(legacy, peft_config=lora_config())
            same = scores(rescued) == before
            ok &= same
            say(f"hfpatches.flair.load(legacy, peft_config=LoraConfig(r=4, lora_alpha=8, ...)): scores "
                f"{'identical to the model that wrote it' if same else 'DIFFER'}")
            ok &= _merge_section(say, model.embeddings.model) <= 1e-5

        say("bf16: the same classifier with the transformer in bfloat16 ...")
        bf = build_classifier(dtype=torch.bfloat16)
        try:
            scores(bf)
            say("unpatched: bf16 predict worked (bug not reproduced)")
        except RuntimeError as e:
            say(f"unpatched: bf16 predict -> {first_line(e)}")
        with hfpatches.patched(PID):
            s_bf = scores(bf)
            say(f"patched: bf16 predict works, decoder {bf.decoder.weight.dtype}; held-out P(pos) {_p_pos(s_bf)}")
            with quiet():
                bf.save(fixed)
                back = TextClassifier.load(fixed)
            same = scores(back) == s_bf
            ok &= same
            say(f"patched: bf16 save -> load: scores {'identical' if same else 'DIFFER'}")
            unify_dtype(bf, "float32")
            s32 = scores(bf)
            dtypes = sorted({str(p.dtype) for p in bf.parameters()})
            say(f"policy float32 (HFPATCHES_DTYPE_POLICY=float32 or unify_dtype(model, 'float32')): parameters "
                f"{', '.join(dtypes)}; max |score diff| vs bf16 {max_diff(s_bf, s32):.1e}")
            ok &= dtypes == ["torch.float32"]
    return ok
