"""Reproductions for the gradient-accumulation advisories (one process, CPU):

* ``full``: 2 samples, ``gradient_accumulation_steps=2``, batch 1, one optimizer step, against
  one step on the batch of 2 (a model without ``**kwargs``, mean-reduced loss): the update norm
  ratio is 1.0 when the micro-batch losses are averaged, 2.0 when they are summed
  (``tf_ga_no_kwargs_models``, ``tf_ga_480_check``).
* ``full_labels``: the same with the target passed as ``labels`` (Trainer then counts
  ``num_items_in_batch``, which 4.48.0 keys the division on).
* ``last``: 1 sample, ``gradient_accumulation_steps=2``: the epoch's only window is one batch;
  ratio 1.0 when it is divided by its own length, 0.5 when by the full GA (``tf_ga_last_window``).

    python scripts/lab/advisories/tf_ga_division.py    -> one JSON line {"transformers", "full", "last"}
"""
import json
import tempfile

import torch
from torch.utils.data import Dataset


class Tiny(torch.nn.Module):   # forward without **kwargs: Trainer cannot hand it num_items_in_batch
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)}


class TinyLabels(Tiny):   # the same, with its target named ``labels``: Trainer counts num_items_in_batch
    def forward(self, x, labels):
        return super().forward(x, labels)


class Data(Dataset):
    def __init__(self, n: int, key: str = "y") -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y, self.key = torch.randn(n, 4, generator=g), torch.randn(n, generator=g), key

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], self.key: self.y[i]}


def update(n: int, bs: int, ga: int, labels: bool = False) -> torch.Tensor:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs,
                             gradient_accumulation_steps=ga, num_train_epochs=1, learning_rate=0.1, optim="sgd",
                             use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, lr_scheduler_type="constant",
                             max_grad_norm=0.0)   # no clipping: it would hide a scaled gradient
    model = TinyLabels() if labels else Tiny()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    Trainer(model=model, args=args, train_dataset=Data(n, "labels" if labels else "y")).train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def reproduce() -> dict:
    import transformers

    full = float(update(2, 1, 2).norm() / update(2, 2, 1).norm())
    full_labels = float(update(2, 1, 2, True).norm() / update(2, 2, 1, True).norm())
    last = float(update(1, 1, 2).norm() / update(1, 1, 1).norm())
    return {"transformers": transformers.__version__, "full": round(full, 3), "full_labels": round(full_labels, 3),
            "last": round(last, 3)}


if __name__ == "__main__":
    print(json.dumps(reproduce()))
