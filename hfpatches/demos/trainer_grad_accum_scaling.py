"""Demo: gradient accumulation in ``transformers.Trainer`` when the loss is not normalised by
``num_items_in_batch`` (a ``compute_loss`` of one's own on batches without ``labels``, TRL's
``ORPOTrainer``): one SGD step (lr=1, no clipping) with GA=4 x batch 1 against GA=1 x batch 4 over
the same four examples; the update and the logged loss should be the same.

Also the scenario helpers the tests and ``scripts/lab/trainer_grad_accum_scaling.py`` use: a tiny
Llama, four examples, a Trainer whose sampler keeps the data order, the per-step parameter
updates and the logged losses. Everything is built in-process (no hub).
"""
from __future__ import annotations

import contextlib
import importlib.util
import tempfile
from typing import Any

PID = "trainer_grad_accum_scaling"
VOCAB = 32
SEQ = 6
WORDS = ("<pad>", "<eos>", "<unk>", "q", "a", "b", "c", "d", "x", "y", "z", "w")


@contextlib.contextmanager
def _own_rng(seed: int):
    """Run with torch's CPU RNG seeded, restoring the caller's RNG state afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_llama(vocab_size: int = VOCAB, seed: int = 0):
    """A tiny random ``LlamaForCausalLM`` (its forward takes ``**kwargs``: the Trainer sets
    ``model_accepts_loss_kwargs``), float32, train mode, no KV cache."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = "eager"
    with _own_rng(seed):
        model: Any = transformers.LlamaForCausalLM(cfg)
    return model.train()


def _no_kwargs_class():
    import torch

    class NoKwargsLM(torch.nn.Module):
        """A causal LM whose forward takes no ``**kwargs`` (like BERT, T5, every
        ``*ForSequenceClassification`` of 4.51): the Trainer sees ``model_accepts_loss_kwargs=False``
        and divides the loss by GA itself."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels=None):
            logits = self.inner(input_ids=input_ids).logits
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
            return out

    return NoKwargsLM


def examples(n: int = 4, *, labels: bool = True, seed: int = 1):
    """``n`` examples of ``SEQ`` random token ids (equal lengths: a batch mean is the mean of the
    examples' means), each ``{"input_ids"[, "labels"]}``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": row, **({"labels": row.clone()} if labels else {})} for row in ids]


def causal_lm_loss(logits, input_ids):
    """Mean next-token cross-entropy over every token of the batch."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             input_ids[:, 1:].reshape(-1))


def _sequential(base):
    """``base`` with the data order kept (SequentialSampler), so GA=4 x 1 and GA=1 x 4 see the
    same examples in every update."""
    from torch.utils.data import SequentialSampler

    class Sequential(base):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    Sequential.__name__ = Sequential.__qualname__ = f"Sequential{base.__name__}"
    return Sequential


def custom_loss_trainer_class():
    """A Trainer subclass with its own ``compute_loss`` on batches without ``labels`` (so
    ``num_items_in_batch`` is None), the case the bug is about."""
    from transformers import Trainer

    class OwnLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"])
            loss = causal_lm_loss(out.logits, inputs["input_ids"])
            return (loss, out) if return_outputs else loss

    return _sequential(OwnLossTrainer)


def _hyper(ga: int, bs: int) -> dict[str, Any]:
    """One SGD step's worth of training arguments: lr 1, no clipping, no schedule, no decay."""
    return dict(per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                num_train_epochs=1, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0)


def training_args(output_dir: str, ga: int, bs: int, **extra: Any) -> Any:
    from transformers import TrainingArguments

    kw: dict[str, Any] = {**_hyper(ga, bs), "remove_unused_columns": False, "dataloader_num_workers": 0, **extra}
    return TrainingArguments(output_dir=output_dir, **kw)


def _flat(model):
    import torch

    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def train(case: str, ga: int, bs: int, n: int = 4, max_steps: int = -1) -> tuple[list, list[float]]:
    """Train one epoch of ``n`` examples and return (the parameter update of every optimizer
    step, the logged training loss of every step). ``case``:

    * ``custom``: :func:`custom_loss_trainer_class` on a Llama, batches without labels
    * ``labels``: the plain ``Trainer`` on a Llama with ``labels`` (the model normalises by
      ``num_items_in_batch``)
    * ``compute_loss_func``: the plain ``Trainer`` with ``compute_loss_func`` (summed CE /
      ``num_items_in_batch``)
    * ``no_kwargs``: the plain ``Trainer`` with ``labels`` on a model without ``**kwargs``
    * ``orpo``: TRL's ``ORPOTrainer`` (see :func:`orpo_trainer`)
    """
    import torch
    from transformers import Trainer, TrainerCallback, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    snapshots: list = []

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(_flat(model))

    with tempfile.TemporaryDirectory() as tmp:
        args = training_args(tmp, ga, bs, max_steps=max_steps)
        if case == "orpo":
            trainer = orpo_trainer(tmp, ga, bs, n)
        else:
            model = tiny_llama()
            kw: dict = {}
            if case == "custom":
                cls = custom_loss_trainer_class()
                data = examples(n, labels=False)
            elif case in ("labels", "compute_loss_func"):
                cls = _sequential(Trainer)
                data = examples(n)
                if case == "compute_loss_func":
                    def summed(outputs, labels, num_items_in_batch=None):
                        logits = outputs["logits"]
                        loss = torch.nn.functional.cross_entropy(
                            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                            reduction="sum")
                        return loss / (num_items_in_batch if num_items_in_batch is not None
                                       else labels[:, 1:].numel())
                    kw["compute_loss_func"] = summed
            elif case == "no_kwargs":
                cls = _sequential(Trainer)
                data = examples(n)
                model = _no_kwargs_class()(model)
            else:
                raise ValueError(case)
            trainer = cls(model=model, args=args, train_dataset=data, data_collator=default_data_collator, **kw)
        trainer.remove_callback(PrinterCallback)   # disable_tqdm=True would print every log line
        trainer.add_callback(Snap())
        before = _flat(trainer.model)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = [before, *snapshots]
    return [b - a for a, b in zip(steps, steps[1:])], losses


def word_tokenizer():
    """A word-level tokenizer over ``WORDS`` (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


ORPO_ROWS = [("q x y", "a b", "c d"), ("q y z", "b c", "d a"), ("q z w", "c d", "a b"),
             ("q w x", "d a", "b c")]


def orpo_trainer(output_dir: str, ga: int, bs: int, n: int = 4):
    """TRL's ``ORPOTrainer`` on a tiny Llama and ``n`` preference rows of equal lengths (its NLL
    term is a token mean over the batch: equal lengths make it the mean of the rows' means).
    Its batches carry ``chosen_labels``/``rejected_labels``, not ``labels``."""
    from datasets import Dataset
    from trl import ORPOConfig, ORPOTrainer

    tok = word_tokenizer()
    rows = [ORPO_ROWS[i % len(ORPO_ROWS)] for i in range(n)]
    data = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [" " + r[1] for r in rows],
                              "rejected": [" " + r[2] for r in rows]})
    cfg = ORPOConfig(output_dir=output_dir, remove_unused_columns=False, **_hyper(ga, bs))
    return _sequential(ORPOTrainer)(model=tiny_llama(len(WORDS)), args=cfg, train_dataset=data,
                                    processing_class=tok)


def update_ratio(case: str, n: int = 4) -> tuple[float, float, list, list]:
    """(|update GA=4 x 1| / |update GA=1 x 4|, logged loss GA=4 / logged loss GA=1, the updates,
    the losses) for the first optimizer step."""
    u4, l4 = train(case, 4, 1, n)
    u1, l1 = train(case, 1, 4, n)
    return float(u4[0].norm() / u1[0].norm()), l4[0] / l1[0], [u4, u1], [l4, l1]


def available(case: str) -> bool:
    return case != "orpo" or (importlib.util.find_spec("trl") is not None
                              and importlib.util.find_spec("datasets") is not None)


def run(say) -> bool:
    import hfpatches

    import transformers.trainer  # noqa: F401  (the patch attaches when the Trainer is imported)

    hfpatches.revert([PID])
    cases = [c for c in ("custom", "orpo", "labels") if available(c)]
    if "orpo" in cases:
        try:
            from trl import ORPOTrainer  # noqa: F401
        except ImportError:
            cases.remove("orpo")
    names = {"custom": "own compute_loss, no labels", "orpo": "TRL ORPOTrainer",
             "labels": "plain Trainer, labels"}
    ok = True
    before = {}
    for c in cases:
        before[c] = update_ratio(c)
        say(f"without hfpatches  {names[c]:28s} update GA=4x1 / GA=1x4 = {before[c][0]:.4f}, "
            f"logged loss ratio {before[c][1]:.4f}")
    rep = hfpatches.apply(only=[PID])[PID]
    say(f"{rep.outcome.value}: {rep.reason}")
    for c in cases:
        r, lr, _, _ = update_ratio(c)
        say(f"with hfpatches     {names[c]:28s} update GA=4x1 / GA=1x4 = {r:.4f}, logged loss ratio {lr:.4f}")
        ok &= abs(r - 1) < 1e-3 and abs(lr - 1) < 1e-3
    hfpatches.revert([PID])
    return ok


def last_window_ratio(case: str = "no_kwargs") -> tuple[float, float]:
    """Six examples, two optimizer steps: GA=4 x batch 1 (windows of 4 and 2 micro-batches)
    against GA=1 x batch 4 (batches of 4 and 2). (update ratio, logged loss ratio) of the second,
    incomplete window: 1.0 when it is divided by the micro-batches it has, 0.5 when by GA."""
    u4, l4 = train(case, 4, 1, 6, max_steps=2)
    u1, l1 = train(case, 1, 4, 6, max_steps=2)
    return float(u4[1].norm() / u1[1].norm()), l4[1] / l1[1]
