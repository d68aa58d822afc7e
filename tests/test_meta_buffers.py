"""meta_buffers: meta-device init -> to_empty -> load_state_dict gives the same model as
from_pretrained. Every bug case also runs unpatched and asserts the bug is there (both stacks:
the bug is unfixed upstream on 4.51.3 and 5.23.0)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import hfpatches  # noqa: E402
from hfpatches.demos import meta_buffers as demo  # noqa: E402
from hfpatches.demos.meta_buffers import nan_for_uninitialised  # noqa: E402
from hfpatches.patches import meta_buffers as mb  # noqa: E402

PID = "meta_buffers"
nn = torch.nn


def round_trip(*args, **kw):
    with nan_for_uninitialised():
        return demo.meta_round_trip(*args, **kw)


def _apply():
    rep = hfpatches.apply(only=[PID])
    assert rep[PID].outcome == hfpatches.Outcome.APPLIED, rep[PID].reason
    return rep


def _meta(build, include_buffers=True):
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=include_buffers):
        return build()


def _recipes(model, device="cpu", recurse=True):
    """Run the patch's logic with torch's own to_empty and return {buffer: recipe}."""
    with nan_for_uninitialised():
        info = mb._to_empty(hfpatches.get_original(PID), model, device, recurse)
    return info["recomputed"] if info else {}


# ----------------------------------------------------------------------------- plain torch
_patterns = iter(range(1, 1 << 30))


def pattern():
    """Values no earlier (freed) tensor held, so uninitialised memory cannot pass for them."""
    return torch.arange(64, dtype=torch.float64) * 3.25 + next(_patterns) * 1000.5


class Holder(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("running", torch.full((4,), 5.0))                       # persistent
        self.register_buffer("table", table.clone(), persistent=False)
        self.register_buffer("nothing", None, persistent=False)


def test_probe_sees_the_bug_and_the_fix_and_revert_restores_identity():
    original = torch.nn.Module.__dict__["to_empty"]
    assert mb.PATCH.probe().bug_present, "torch's to_empty no longer loses non-persistent buffers: retire the patch?"
    rep = _apply()
    assert rep[PID].bug_present is True
    assert torch.nn.Module.__dict__["to_empty"] is not original
    assert not mb.PATCH.probe().bug_present
    hfpatches.revert([PID])
    assert torch.nn.Module.__dict__["to_empty"] is original
    assert mb.PATCH.probe().bug_present


def test_real_buffer_kept_everything_else_as_torch_leaves_it():
    want = pattern()
    plain = Holder(want)
    plain_before = {k: (v, v.data_ptr()) for k, v in [*plain.named_parameters(), *plain.named_buffers()]}
    with nan_for_uninitialised():
        plain.to_empty(device="cpu")
    assert not torch.equal(plain.table, want), "unpatched to_empty kept the buffer: bug not reproduced"

    _apply()
    want = pattern()
    m = Holder(want)
    before = {k: (v, v.data_ptr()) for k, v in [*m.named_parameters(), *m.named_buffers()]}
    with nan_for_uninitialised():
        assert m.to_empty(device="cpu") is m
    assert torch.equal(m.table, want) and m.table is before["table"][0]  # same device: the tensor itself stays
    assert m.nothing is None
    # parameters and persistent buffers: new, uninitialised storage exactly as torch gives them
    after = dict([*m.named_parameters(), *m.named_buffers()])
    plain_after = dict([*plain.named_parameters(), *plain.named_buffers()])
    for k in ("lin.weight", "lin.bias", "running"):
        assert after[k].data_ptr() != before[k][1], k
        assert (after[k] is before[k][0]) == (plain_after[k] is plain_before[k][0]), k
        assert type(after[k]) is type(plain_after[k]) and after[k].requires_grad == plain_after[k].requires_grad


def test_module_without_non_persistent_buffers_takes_the_fast_path(monkeypatch):
    _apply()

    def boom(*a, **k):
        raise AssertionError("planned a module that has no non-persistent buffers")

    monkeypatch.setattr(mb, "_plan", boom)
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert m.to_empty(device="cpu") is m
    for sub in m.modules():
        sub.to_empty(device="cpu", recurse=False)


def test_to_meta_and_shared_buffers():
    _apply()
    m = Holder(pattern())
    m.to_empty(device="meta")
    assert m.table.is_meta and m.lin.weight.is_meta
    shared = pattern()
    a, b = nn.Module(), nn.Module()
    a.register_buffer("s", shared, persistent=False)
    b.register_buffer("s", shared, persistent=False)
    both = nn.ModuleList([a, b, a])
    both.to_empty(device="cpu")
    assert torch.equal(a.s, shared) and torch.equal(b.s, shared)


class Opaque(nn.Module):
    """A buffer only its own code knows how to compute: no recipe can recover it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("cache", torch.randn(3), persistent=False)
        self.register_buffer("mask", torch.ones(3, dtype=torch.bool), persistent=False)


def test_unrecoverable_meta_buffer_is_named_in_one_warning():
    _apply()
    root = nn.Sequential(Opaque(), nn.Linear(2, 2)).to("meta")
    with pytest.warns(mb.UninitialisedBufferWarning) as got:
        root.to_empty(device="cpu")
    assert len(got) == 1, [str(w.message) for w in got]
    msg = str(got[0].message)
    assert "0.cache" in msg and "0.mask" in msg and "2 non-persistent" in msg and "Sequential" in msg
    assert got[0].filename == __file__  # points at the caller of to_empty
    leaf = Opaque().to("meta")
    with pytest.warns(mb.UninitialisedBufferWarning, match=r"Opaque\.cache"):
        leaf.to_empty(device="cpu", recurse=False)
    with pytest.warns(mb.UninitialisedBufferWarning, match=r"Opaque\.cache"):
        hfpatches.materialize(Opaque().to("meta"), "cpu")


# ----------------------------------------------------------------------------- tiny transformers models
def _tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(demo.tiny_llama_config()).eval()


@pytest.mark.parametrize("per_module", [False, True], ids=["recurse", "per_module_recurse_false"])
@pytest.mark.parametrize("include_buffers", [False, True], ids=["buffers_real", "buffers_meta"])
def test_tiny_llama_round_trip(include_buffers, per_module):
    from transformers import LlamaForCausalLM

    ref = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    cfg, sd = ref.config, ref.state_dict()

    def run():
        model, res = round_trip(lambda: LlamaForCausalLM(cfg), sd, include_buffers=include_buffers,
                                          per_module=per_module)
        assert not res.missing_keys and not res.unexpected_keys
        with torch.no_grad():
            return model(ids).logits

    bad = run()
    assert not torch.equal(bad, want), "unpatched round trip matched: bug not reproduced"
    _apply()
    got = run()
    assert torch.equal(got, want), f"patched: max |d| {demo.max_abs(got, want):.3g} (unpatched {demo.max_abs(bad, want):.3g})"


def test_recipes_used_per_stack(stack):
    """5.x: transformers' own _init_weights (on a throwaway); 4.51: its _init_weights does not
    touch buffers (detected, not trusted) -> rotary init function / BERT ids."""
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    cfg = demo.tiny_llama_config()
    got = _recipes(_meta(lambda: LlamaForCausalLM(cfg)))
    want = "_init_weights" if stack == "latest" else "rotary init function"
    assert got and set(got.values()) == {want}, got
    assert set(got) == ({"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} if stack == "latest"
                        else {"model.rotary_emb.inv_freq"})
    rot = _meta(lambda: LlamaForCausalLM(cfg)).model.rotary_emb
    assert set(_recipes(rot, recurse=False).values()) == {"rotary init function"}
    if stack == "affected":  # 4.x keeps original_inv_freq as a plain alias of inv_freq
        assert rot.original_inv_freq is rot.inv_freq and not rot.inv_freq.is_meta

    bcfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
    b = _meta(lambda: BertModel(bcfg))
    got = _recipes(b)
    want = "_init_weights" if stack == "latest" else "position/token_type ids"
    assert got == {"embeddings.position_ids": want, "embeddings.token_type_ids": want}
    assert torch.equal(b.embeddings.position_ids, torch.arange(32).expand(1, -1))
    assert torch.equal(b.embeddings.token_type_ids, torch.zeros(1, 32, dtype=torch.long))


def test_gpt_neo_local_and_global_masks(stack):
    """Per-layer constructor arguments (local vs global attention) decide the causal-mask buffer:
    recomputed by 5.x _init_weights, or on 4.51 by rebuilding the model from its config."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = GPTNeoConfig(vocab_size=128, max_position_embeddings=32, hidden_size=32, num_layers=2, num_heads=4,
                       attention_types=[[["global", "local"], 1]], window_size=4, intermediate_size=64)
    torch.manual_seed(0)
    ref = GPTNeoForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    bad, _ = round_trip(lambda: GPTNeoForCausalLM(cfg), ref.state_dict(), include_buffers=True)
    masks = [layer.attn.attention.bias for layer in bad.transformer.h]
    assert not all(torch.equal(a, r.attn.attention.bias) for a, r in zip(masks, ref.transformer.h))
    _apply()
    model = _meta(lambda: GPTNeoForCausalLM(cfg))
    got = _recipes(model)
    assert set(got.values()) == ({"_init_weights"} if stack == "latest" else {"rebuild from config"}), got
    model.tie_weights()
    model.load_state_dict(ref.state_dict())
    for a, r in zip(model.transformer.h, ref.transformer.h):
        assert torch.equal(a.attn.attention.bias, r.attn.attention.bias)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, want)


# ----------------------------------------------------------------------------- recipe safety
def _toy_classes():
    import transformers
    from transformers import PreTrainedModel

    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig

    class ToyConfig(base):
        model_type = "hfpatches_toy"

        def __init__(self, n_layers=3, width=4, **kw):
            self.n_layers, self.width = n_layers, width
            super().__init__(**kw)

    class Layer(nn.Module):
        def __init__(self, config, idx):  # the buffer depends on a constructor argument
            super().__init__()
            self.lin = nn.Linear(config.width, config.width)
            self.register_buffer("table", torch.arange(8.0) * (idx + 1), persistent=False)

    class Toy(PreTrainedModel):
        """4.x-style: _init_weights initialises parameters only (a no-op for buffers)."""

        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.layers = nn.ModuleList(Layer(config, i) for i in range(config.n_layers))
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, nn.Linear):
                module.weight.data.normal_()
                module.bias.data.zero_()

    class Writer(PreTrainedModel):
        """_init_weights that recomputes the buffer but also overwrites a child's parameters."""

        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.lin = nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(8.0) * 2, persistent=False)
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, Writer):
                module.table.copy_(torch.arange(8.0) * 2)
                module.lin.weight.data.fill_(7.0)

    return ToyConfig, Toy, Writer


def test_noop_init_weights_is_detected_and_config_rebuild_honours_constructor_args():
    ToyConfig, Toy, _ = _toy_classes()
    eager = Toy(ToyConfig())
    model = _meta(lambda: Toy(ToyConfig()))
    assert set(_recipes(model).values()) == {"rebuild from config"}
    for a, b in zip(model.layers, eager.layers):
        assert torch.equal(a.table, b.table)


def test_init_weights_runs_on_a_throwaway_never_on_the_model():
    _, _, Writer = _toy_classes()
    _apply()
    model = _meta(lambda: Writer(Writer.config_class()))
    model.lin.to_empty(device="cpu")           # FSDP-style, a child first, then loaded
    with torch.no_grad():
        model.lin.weight.fill_(3.0)
    model.to_empty(device="cpu", recurse=False)
    assert torch.equal(model.table, torch.arange(8.0) * 2)
    assert torch.equal(model.lin.weight, torch.full((4, 4), 3.0)), "a recipe wrote into the model's parameters"


def test_materialize_without_the_patch(caplog):
    from transformers import LlamaForCausalLM

    ref = _tiny_llama()
    original = torch.nn.Module.__dict__["to_empty"]
    model = _meta(lambda: LlamaForCausalLM(ref.config))
    with caplog.at_level(logging.INFO, logger="hfpatches"):
        assert hfpatches.materialize(model, "cpu") is model
    assert torch.nn.Module.__dict__["to_empty"] is original
    assert "recomputed" in caplog.text and "model.rotary_emb.inv_freq" in caplog.text
    model.load_state_dict(ref.state_dict())
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, ref(ids).logits)
    _apply()  # with the patch live, materialize uses torch's original underneath (no double work)
    model = _meta(lambda: LlamaForCausalLM(ref.config), include_buffers=False)
    hfpatches.materialize(model, "cpu", recurse=True)
    assert torch.equal(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)


# ----------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_smollm2_real_weights_bit_identical(smollm_dir):
    ref, sd, build = demo.smollm2_case(smollm_dir)
    batch, labels = demo.lm_batch(smollm_dir)
    want_loss, want = demo.lm_outputs(ref, batch, labels)
    for include in (False, True):
        model, res = round_trip(build, sd, include_buffers=include)
        assert res.missing_keys == ["lm_head.weight"] and not res.unexpected_keys  # tied, restored by tie_weights
        bad_loss, bad = demo.lm_outputs(model, batch, labels)
        assert not torch.equal(bad, want) and bad_loss != want_loss, (
            f"include_buffers={include}: unpatched loss {bad_loss} == from_pretrained {want_loss}: bug not reproduced")
    _apply()
    for include in (False, True):
        model, _ = round_trip(build, sd, include_buffers=include)
        loss, got = demo.lm_outputs(model, batch, labels)
        assert loss == want_loss and torch.equal(got, want), (
            f"include_buffers={include}: patched loss {loss} vs from_pretrained {want_loss}, "
            f"max |d logits| {demo.max_abs(got, want):.3g}")


@pytest.mark.parametrize("include_buffers", [False, True], ids=["buffers_real", "buffers_meta"])
def test_minilm_bert_real_weights(minilm_dir, include_buffers):
    ref, sd, build = demo.minilm_case(minilm_dir)
    batch = demo.bert_batch(minilm_dir)
    want = demo.bert_hidden(ref, batch)
    model, res = round_trip(build, sd, include_buffers=include_buffers)
    assert res.unexpected_keys == ["embeddings.position_ids"] and not res.missing_keys  # not loaded: non-persistent
    try:
        bad = demo.bert_hidden(model, batch)
    except IndexError:  # garbage position_ids
        pass
    else:
        assert not torch.equal(bad, want), "unpatched BertModel matched: bug not reproduced"
    _apply()
    model, _ = round_trip(build, sd, include_buffers=include_buffers)
    got = demo.bert_hidden(model, batch)
    assert torch.equal(got, want), f"max |d| {demo.max_abs(got, want):.3g}"


# ----------------------------------------------------------------------------- distributed
FSDP_SCRIPT = r'''
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
import hfpatches
from hfpatches.demos.meta_buffers import tiny_llama_config
from accelerate import init_empty_weights
from transformers import LlamaForCausalLM

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.use_deterministic_algorithms(True, warn_only=True)  # empty_like fills NaN: garbage is recognisable
torch.utils.deterministic.fill_uninitialized_memory = True
torch.manual_seed(0)
cfg = tiny_llama_config()
ref = LlamaForCausalLM(cfg).eval()
ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    want = ref(ids).logits

def fsdp1(include):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, StateDictType, FullStateDictConfig
    with init_empty_weights(include_buffers=include):
        m = LlamaForCausalLM(cfg)
    fm = FSDP(m, device_id=torch.device("cpu"), use_orig_params=True,
              param_init_fn=lambda mod: mod.to_empty(device=torch.device("cpu"), recurse=False))
    with FSDP.state_dict_type(fm, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
        fm.load_state_dict(ref.state_dict())
    with torch.no_grad():
        return fm.eval()(ids).logits

def fsdp2(include):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    with init_empty_weights(include_buffers=include):
        m = LlamaForCausalLM(cfg)
    for layer in m.model.layers:
        fully_shard(layer)
    fully_shard(m)
    m.to_empty(device="cpu")
    set_model_state_dict(m, ref.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        return m.eval()(ids).logits

for name, fn in (("fsdp1", fsdp1), ("fsdp2", fsdp2)):
    for include in (False, True):
        for patched in (False, True):
            row = dict(rank=rank, mode=name, include_buffers=include, patched=patched)
            try:
                if patched:
                    row["outcome"] = hfpatches.apply(only=["meta_buffers"])["meta_buffers"].outcome.value
                got = fn(include)
                row.update(equal=bool(torch.equal(got, want)), max_diff=(got - want).abs().max().item())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                hfpatches.revert(["meta_buffers"])
            with open(os.path.join(os.environ["MB_OUT"], f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp_two_process_gloo_cpu(tmp_path):
    """torchrun, 2 processes, gloo, CPU: FSDP1 ``param_init_fn=to_empty(recurse=False)`` and FSDP2
    ``fully_shard`` + ``to_empty``; both ranks must get the eager model's logits."""
    script = tmp_path / "fsdp_meta.py"
    script.write_text(textwrap.dedent(FSDP_SCRIPT))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1", "MB_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=540, env=env, cwd=root)
    rows = [json.loads(line) for f in sorted(tmp_path.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    assert proc.returncode == 0 and len(rows) == 16, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    errors = [r for r in rows if "error" in r]
    assert not errors, errors
    for r in rows:
        if r["patched"]:
            assert r["outcome"] == "APPLIED" and r["equal"], r
        else:
            assert not r["equal"], f"unpatched FSDP run matched the eager model: bug not reproduced: {r}"
