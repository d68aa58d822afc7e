"""Reproduction for the advisory ``tf_ddp_no_sync_inverted`` (transformers#34645): run under
``torchrun --nproc-per-node 2`` (CPU, gloo). A tiny model trains one optimizer step with
``gradient_accumulation_steps=2`` on different data per rank; DDP must leave every rank with the
same weights. transformers 4.46.2 skips the all-reduce of the last micro-batch: they differ.

    torchrun --nproc-per-node 2 scripts/lab/advisories/tf_ddp_no_sync_inverted.py OUT.json
Rank 0 writes ``{"transformers": version, "max_weight_diff_between_ranks": x, "diverged": bool}``.
"""
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from torch.utils.data import Dataset


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, x, y):
        return {"loss": torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)}


class Data(Dataset):
    def __init__(self, rank: int) -> None:
        g = torch.Generator().manual_seed(1 + rank)
        self.x, self.y = torch.randn(4, 4, generator=g), torch.randn(4, generator=g) * (1 + 3 * rank)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


class PerRankSampler(torch.utils.data.Sampler):
    """Each rank reads its own data (no DistributedSampler mixing): what matters is the gradient sync."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def main(out: str) -> None:
    import transformers
    from transformers import Trainer, TrainingArguments

    rank = int(os.environ["RANK"])
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.5, optim="sgd", use_cpu=True, ddp_backend="gloo",
                             report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, seed=0, max_grad_norm=0.0)
    model = Tiny()

    class T(Trainer):
        def _get_train_sampler(self, *a, **k):
            return PerRankSampler(4)

    trainer = T(model=model, args=args, train_dataset=Data(rank))
    trainer.train()
    w = torch.cat([p.detach().flatten() for p in model.parameters()])
    allw = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
    dist.all_gather(allw, w)
    diff = float(max((a - allw[0]).abs().max() for a in allw))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"transformers": transformers.__version__, "max_weight_diff_between_ranks": diff,
                       "diverged": diff > 1e-6}, f)


if __name__ == "__main__":
    main(sys.argv[1])
