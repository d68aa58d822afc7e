"""A small data-parallel training script for tests/test_distributed.py (not a test module).

Run under ``torchrun`` / ``accelerate launch`` with ``HFPATCHES_AUTO=1``: nothing here calls
``hfpatches.apply()``; the fixes come from the start-up hook. Per rank it writes
``OUT/rank<N>.json`` with what the patched code actually did, to set beside the rank's record.

    python _dist_train.py MODE OUT      MODE: full | accelerate | light

full / accelerate: meta init of a tiny Llama -> ``to_empty`` -> ``load_state_dict`` (meta_buffers:
``inv_freq`` must equal the eager model's), then one DDP training step (``accelerate``: through
``Accelerator``) of that model with Liger's fused linear cross-entropy (the real kernel, under
``TRITON_INTERPRET=1`` on a CPU) on a padding-free batch carrying FlashAttention's keys
(liger_flash_kwargs), fed (torchrun run) by a DataLoader with a ``spawn`` worker. light: torch only, a module
with a non-persistent buffer through ``to_empty`` (used for the deliberately mixed run).
Top-level imports are torch only: the spawn worker re-imports this module.
"""
import json
import os
import sys

import torch
from torch.utils.data import Dataset

VOCAB = 64
LENGTHS = (5, 7, 4)   # three sequences packed into one row


class PackedBatches(Dataset):
    """Padding-free batches in transformers' documented FlashAttention form (1-D int32
    ``cu_seq_lens_*``, int ``max_length_*``), different per rank and index."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(100 * self.rank + i)
        n = sum(LENGTHS)
        ids = torch.randint(0, VOCAB, (1, n), generator=g)
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        pos = torch.cat([torch.arange(k) for k in LENGTHS]).unsqueeze(0)
        labels = ids.clone()
        labels[0, cu[:-1].long()] = -100   # no prediction across a sequence boundary
        return {"input_ids": ids, "position_ids": pos, "labels": labels, "cu_seq_lens_q": cu,
                "cu_seq_lens_k": cu, "max_length_q": max(LENGTHS), "max_length_k": max(LENGTHS)}


def light(rank: int) -> dict:
    """meta_buffers' own scenario on a plain module: a real non-persistent buffer through
    ``to_empty`` keeps its values only where the fix is live."""

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(1.0, 65.0), persistent=False)

    m = M()
    m.to_empty(device="cpu")
    return {"buffer_kept": bool(torch.equal(m.table, torch.arange(1.0, 65.0)))}


def full(rank: int, use_accelerate: bool) -> dict:
    import torch.distributed as dist
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfpatches.demos.liger_flash_kwargs import apply_liger

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)                       # same weights on every rank
    eager = LlamaForCausalLM(cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(eager.state_dict())
    out = {"inv_freq_ok": bool(torch.equal(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq))}
    apply_liger("llama")                       # Liger's real FLCE (rope/rms_norm/swiglu off: CPU interpreter)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # torchrun run: one spawn worker per rank (a fresh interpreter: its own record, never the rank's);
    # the accelerate run loads in-process (one worker scenario is enough on a 2-core CI box)
    workers = {"num_workers": 0} if use_accelerate else {"num_workers": 1, "multiprocessing_context": "spawn"}
    loader = DataLoader(PackedBatches(rank), batch_size=None, **workers)
    if use_accelerate:
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        model, opt = acc.prepare(model, opt)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    for batch in loader:
        loss = model(**batch).loss
        (acc.backward(loss) if use_accelerate else loss.backward())
        opt.step()
        opt.zero_grad()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    out.update(loss=loss.item(), mean_loss=mean.item() / dist.get_world_size())
    return out


def main() -> None:
    import torch.distributed as dist

    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode != "accelerate":
        dist.init_process_group("gloo")
    else:
        from accelerate import PartialState

        PartialState(cpu=True)                 # gloo, from accelerate launch's environment
    rank = dist.get_rank()
    res = {"rank": rank, "pid": os.getpid(), "world_size": dist.get_world_size()}
    try:
        res.update(light(rank) if mode == "light" else full(rank, mode == "accelerate"))
    except Exception as e:  # reported, and the test fails on it with the message
        res["error"] = f"{type(e).__name__}: {e}"
    import hfpatches

    res["status_live"] = sorted(k for k, r in hfpatches.status().items() if r.outcome in ("APPLIED", "ALREADY_APPLIED"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
