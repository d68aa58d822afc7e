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

from hfpatches._engine import run_check, run_probe  # noqa: E402,F401
import hfpatches  # noqa: E402
from hfpatches.demos import meta_buffers as demo  # noqa: E402
from hfpatches.demos.meta_buffers import nan_for_uninitialised  # noqa: E402
from hfpatches.patches.meta_buffers import impl as mb  # noqa: E402

PID = "meta_buffers"


@pytest.fixture(scope="session")
def stack() -> str:
    """'latest' on transformers 5.x, else 'affected': what the expectations below depend on is the
    transformers major version (its rotary/init code), not the stack's name."""
    import transformers

    return "latest" if int(transformers.__version__.split(".")[0]) >= 5 else "affected"
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
    assert run_probe("meta_buffers").bug_present, "torch's to_empty no longer loses non-persistent buffers: retire the patch?"
    rep = _apply()
    assert rep[PID].bug_present is True
    assert torch.nn.Module.__dict__["to_empty"] is not original
    assert not run_probe("meta_buffers").bug_present
    hfpatches.revert([PID])
    assert torch.nn.Module.__dict__["to_empty"] is original
    assert run_probe("meta_buffers").bug_present


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
    """A module's own class constructor where it holds its config (rotary modules), BERT-style ids
    for embeddings (they keep no config), else the owning model's constructor replayed (rebuild
    from config); the same whole-model and per module."""
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    cfg = demo.tiny_llama_config()
    got = _recipes(_meta(lambda: LlamaForCausalLM(cfg)))
    assert got and set(got.values()) == {"class constructor"}, got
    assert set(got) == ({"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"} if stack == "latest"
                        else {"model.rotary_emb.inv_freq"})
    rot = _meta(lambda: LlamaForCausalLM(cfg)).model.rotary_emb
    assert set(_recipes(rot, recurse=False).values()) == {"class constructor"}
    if stack == "affected":  # 4.x keeps original_inv_freq as a plain alias of inv_freq
        assert rot.original_inv_freq is rot.inv_freq and not rot.inv_freq.is_meta

    bcfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32)
    for per_module in (False, True):
        b = _meta(lambda: BertModel(bcfg))
        got = _recipes(b.embeddings, recurse=False) if per_module else _recipes(b)
        prefix = "BertEmbeddings" if per_module else "embeddings"
        want = "position/token_type ids"
        assert got == {f"{prefix}.position_ids": want, f"{prefix}.token_type_ids": want}
        assert torch.equal(b.embeddings.position_ids, torch.arange(32).expand(1, -1))
        assert torch.equal(b.embeddings.token_type_ids, torch.zeros(1, 32, dtype=torch.long))


def test_swapped_in_rotary_with_its_own_config():
    """A transformers rotary module the user put in with another config (another theta): it is
    recomputed from the config it holds, not from the model's."""
    from transformers import LlamaForCausalLM

    cfg = demo.tiny_llama_config()
    other = demo.tiny_llama_config()
    other.rope_theta = 123.0
    if isinstance(getattr(other, "rope_parameters", None), dict):  # 5.x reads the theta from here
        other.rope_parameters = {**other.rope_parameters, "rope_theta": 123.0}

    def build():
        model = LlamaForCausalLM(cfg)
        model.model.rotary_emb = type(model.model.rotary_emb)(other)
        return model

    eager = build()
    assert not torch.equal(eager.model.rotary_emb.inv_freq, LlamaForCausalLM(cfg).model.rotary_emb.inv_freq)
    _apply()
    for per_module in (False, True):
        model = _meta(build, include_buffers=True)
        messages = _materialise(model, per_module)
        _never_silently_wrong(model, {n: b for n, b in eager.named_buffers()}, messages, exact=True)


def test_gpt_neo_local_and_global_masks():
    """Per-layer constructor arguments (local vs global attention) decide the causal-mask buffer:
    recomputed by replaying the model's constructor (5.x: including its _init_weights)."""
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
    assert set(got.values()) == {"rebuild from config"}, got
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


def test_config_rebuild_honours_constructor_args():
    ToyConfig, Toy, _ = _toy_classes()
    eager = Toy(ToyConfig())
    model = _meta(lambda: Toy(ToyConfig()))
    assert set(_recipes(model).values()) == {"rebuild from config"}
    for a, b in zip(model.layers, eager.layers):
        assert torch.equal(a.table, b.table)


def test_rebuild_runs_on_a_throwaway_never_on_the_model():
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
from hfpatches._engine import run_probe
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
# skip interpreter teardown: a gloo/torch thread destroyed while joinable at exit has aborted a rank
# ("terminate called without an active exception") after every row was written
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
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


# ----------------------------------------------------------------------------- issue 12: no process-global state
def _torch_globals() -> dict:
    """What a patch could change for every thread: torch.nn.Module's and torch.Tensor's methods,
    torch's factory functions, torch.nn.init, and the device that ``torch.device(...)`` records."""
    import torch.utils._device as device_mod

    return {"Module": dict(vars(nn.Module)), "Tensor": dict(vars(torch.Tensor)),
            "torch": {n: getattr(torch, n) for n in ("empty", "zeros", "ones", "full", "arange", "tensor")},
            "init": dict(vars(torch.nn.init)), "CURRENT_DEVICE": device_mod.CURRENT_DEVICE}


def _eager_param_devices() -> set:
    """Device types of the parameters of modules built eagerly (no meta context in this thread)."""
    return {p.device.type for m in (nn.Linear(3, 3), nn.Embedding(4, 2), nn.LayerNorm(2)) for p in m.parameters()}


def _spy_model(seen: list):
    """A PreTrainedModel whose buffer no name-based recipe knows and whose ``_init_weights`` does
    not touch buffers, so the patch must rebuild it from its config. While that rebuild runs, its
    layer's constructor snapshots torch's global state and builds modules eagerly in another thread."""
    import threading

    from transformers import PreTrainedModel

    ToyConfig, _, _ = _toy_classes()

    class SpyLayer(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.lin = nn.Linear(config.width, config.width)
            self.register_buffer("table", torch.arange(8.0) * 3 + 1, persistent=False)
            box = {}
            t = threading.Thread(target=lambda: box.update(devices=_eager_param_devices()))
            t.start()
            t.join()
            seen.append((_torch_globals(), box["devices"]))

    class Spy(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.layer = SpyLayer(config)
            self.post_init()

        def _init_weights(self, module):
            pass

    return ToyConfig, Spy


def test_rebuild_changes_no_global_state_and_no_other_thread():
    """Issue 12 item 4: the rebuild recipe used accelerate.init_empty_weights, which replaces
    nn.Module.register_parameter process-wide while it runs: another thread's eager build got meta
    parameters. Checked from inside the rebuild itself, so no timing luck is involved."""
    seen: list = []
    ToyConfig, Spy = _spy_model(seen)
    model = _meta(lambda: Spy(ToyConfig()))
    seen.clear()  # the user's own meta build above is not the patch's business
    _apply()
    before = _torch_globals()
    with nan_for_uninitialised():
        model.to_empty(device="cpu")
    assert torch.equal(model.layer.table, torch.arange(8.0) * 3 + 1)
    assert seen, "the patch did not rebuild the model: this test no longer tests the rebuild"
    for state, devices in seen:
        assert devices == {"cpu"}, f"a module built eagerly in another thread got {devices} parameters"
        changed = {f"{k}.{a}" for k in before if k != "CURRENT_DEVICE"
                   for a in set(before[k]) | set(state[k]) if before[k].get(a) is not state[k].get(a)}
        changed |= {"torch.utils._device.CURRENT_DEVICE"} if state["CURRENT_DEVICE"] != before["CURRENT_DEVICE"] else set()
        assert not changed, f"global torch state changed while the patch rebuilt the model: {changed}"
    assert _torch_globals() == before


def _race(materialise, workers: list, rounds: int = 12) -> list:
    """Run ``workers`` (each loops until told to stop) while this thread calls ``materialise``
    ``rounds`` times; threads interleave often (switch interval 10 us, restored after)."""
    import threading

    done, errors = threading.Event(), []

    def loop(work):
        try:
            while not done.is_set():
                work()
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        for _ in range(rounds):
            materialise()
    finally:
        done.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(switch)
    return errors


def test_threads_building_eagerly_while_the_patch_materialises():
    """Issue 12 item 4, as a user sees it: (1) worker threads build modules eagerly while the main
    thread materialises meta models with the patch: no eager build may get a meta parameter;
    (2) a worker uses its own accelerate.init_empty_weights meanwhile: afterwards
    nn.Module.register_parameter is torch's own again (two overlapping global patches used to
    leave it patched)."""
    from accelerate import init_empty_weights

    ToyConfig, Toy, _ = _toy_classes()
    cfg = ToyConfig(n_layers=6)
    register_parameter = nn.Module.__dict__["register_parameter"]
    _apply()

    def materialise():
        with torch.device("meta"):  # the user's meta build; torch's function mode stack is per thread
            model = Toy(cfg)
        with nan_for_uninitialised():
            model.to_empty(device="cpu")
        assert torch.equal(model.layers[5].table, torch.arange(8.0) * 6)

    builds, meta_builds = [0], [0]

    def eager():
        devices = _eager_param_devices()
        builds[0] += 1
        meta_builds[0] += "meta" in devices

    errors = _race(materialise, [eager, eager, eager])
    assert not errors, errors
    assert builds[0] > 0
    assert meta_builds[0] == 0, f"{meta_builds[0]} of {builds[0]} eager builds in other threads got meta parameters"

    def users_own_meta_init():
        with init_empty_weights():
            nn.Linear(2, 2)

    errors = _race(materialise, [users_own_meta_init])
    assert not errors, errors
    assert nn.Module.__dict__["register_parameter"] is register_parameter, "register_parameter left patched"


# ----------------------------------------------------------------------------- issue 12: no guessing
def _materialise(model, per_module: bool) -> list:
    """The patched ``to_empty`` on the whole model, or FSDP-style on each module with
    ``recurse=False``; uninitialised memory is NaN. Returns the warnings' messages."""
    import warnings

    with nan_for_uninitialised(), warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always", mb.UninitialisedBufferWarning)
        for m in (list(model.modules()) if per_module else [model]):
            m.to_empty(device="cpu", recurse=not per_module)
    return [str(w.message) for w in got if issubclass(w.category, mb.UninitialisedBufferWarning)]


def _never_silently_wrong(model, want: dict, messages: list, *, exact: bool):
    """Each non-persistent buffer of ``want`` (name -> eager value) is right, or (``exact=False``)
    named in the warning: never a silently wrong value."""
    got = dict(model.named_buffers())
    warned = " ".join(messages)
    wrong = [n for n, v in want.items() if not torch.equal(got[n], v) and (exact or n.split(".")[-1] not in warned)]
    assert not wrong, {n: (got[n].flatten()[:4].tolist(), want[n].flatten()[:4].tolist()) for n in wrong}
    if exact:  # and not named in a warning either
        assert not [n for n in want if n.split(".")[-1] in warned], messages


class CustomRotary(nn.Module):
    """Not a transformers class: holds a config but computes inv_freq its own way (base 7, not
    the config's theta). No recipe was written for it: its buffers must be named in the warning."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = "default"
        dim = config.hidden_size // config.num_attention_heads
        self.register_buffer("inv_freq", 1.0 / (7.0 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False)


@pytest.mark.parametrize("per_module", [False, True], ids=["whole", "per_module"])
def test_unknown_rotary_module_is_warned_not_guessed(per_module):
    """Issue 12 item 6: a non-transformers rotary module holding a config got inv_freq from the
    config's rope_theta (wrong, no warning), alone or put into a transformers model."""
    from transformers import LlamaForCausalLM

    cfg = demo.tiny_llama_config()
    _apply()
    alone = _meta(lambda: CustomRotary(cfg), include_buffers=True)
    messages = _materialise(alone, per_module)
    assert any("inv_freq" in m for m in messages), f"no warning for CustomRotary.inv_freq: {messages}"
    assert torch.isnan(alone.inv_freq).all(), f"guessed {alone.inv_freq.tolist()}"

    def build():
        model = LlamaForCausalLM(cfg)
        model.model.rotary_emb = CustomRotary(cfg)  # the user's own rotary inside a transformers model
        return model

    eager = build()
    model = _meta(build, include_buffers=True)
    messages = _materialise(model, per_module)
    assert any("rotary_emb.inv_freq" in m or "CustomRotary.inv_freq" in m for m in messages), messages
    assert not torch.equal(model.model.rotary_emb.inv_freq, eager.model.rotary_emb.inv_freq)  # unknowable: NaN
    assert torch.isnan(model.model.rotary_emb.inv_freq).all(), f"guessed {model.model.rotary_emb.inv_freq.tolist()}"


def _modernbert_config(**kw):
    from transformers import ModernBertConfig

    return ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=64, global_rope_theta=160000.0,
                            local_rope_theta=10000.0, global_attn_every_n_layers=3, local_attention=16,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
                            attn_implementation="sdpa", **kw)


@pytest.mark.parametrize("per_module", [False, True], ids=["whole", "per_module"])
def test_modernbert_with_rope_theta_in_config(stack, per_module):
    """Issue 12 items 6 and 11: a ModernBERT config carrying ``rope_theta`` gave every layer the
    inv_freq of that theta on 4.51 (global and local thetas ignored); on 5.x per-module
    materialisation left the per-layer-type buffers uninitialised. Whole model: exact on both
    stacks. Per module: exact on 5.x; on 4.51 the rotary module's theta is a constructor argument
    it does not keep, so its buffer cannot be known from the module alone: named in the warning."""
    from transformers import ModernBertModel

    cfg = _modernbert_config(rope_theta=500.0)
    torch.manual_seed(0)
    eager = ModernBertModel(cfg)
    want = {n: b for n, b in eager.named_buffers() if "freq" in n}
    assert len({tuple(b.tolist()) for b in want.values()}) == 2  # a global and a local theta
    _apply()
    model = _meta(lambda: ModernBertModel(cfg), include_buffers=True)
    messages = _materialise(model, per_module)
    _never_silently_wrong(model, want, messages, exact=not per_module or stack == "latest")


def _llama_config(rope_scaling):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, rope_scaling=rope_scaling)


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
                 "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0], "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("per_module", [False, True], ids=["whole", "per_module"])
@pytest.mark.parametrize("rope", sorted(ROPE_SCALINGS))
def test_llama_rope_scaling_types(rope, per_module):
    """Issue 12 item 11: per-module materialisation left inv_freq uninitialised for llama3 / yarn /
    longrope on 4.51 (the rope init function was called without its ``device`` argument)."""
    from transformers import LlamaForCausalLM

    cfg = _llama_config(ROPE_SCALINGS[rope])
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    _apply()
    model = _meta(lambda: LlamaForCausalLM(cfg), include_buffers=True)
    messages = _materialise(model, per_module)
    _never_silently_wrong(model, {n: b for n, b in ref.named_buffers()}, messages, exact=True)
    model.tie_weights()
    model.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, want)


@pytest.mark.parametrize("per_module", [False, True], ids=["whole", "per_module"])
def test_gemma3_local_and_global_rotary(stack, per_module):
    """Issue 12 item 11: Gemma3's sliding and full attention use different rotary bases (4.51: two
    modules, the local one holding a copied config; 5.x: one module with per-layer-type buffers,
    left uninitialised per module before)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma3ForCausalLM"):
        pytest.skip("no Gemma3 in this transformers")
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           sliding_window=8, rope_theta=100000.0, rope_local_base_freq=10.0,
                           attn_implementation="eager", **({"sliding_window_pattern": 2} if stack == "affected"
                                                          else {"layer_types": ["sliding_attention", "full_attention"]}))
    torch.manual_seed(0)
    ref = Gemma3ForCausalLM(cfg).eval()
    want = {n: b for n, b in ref.named_buffers() if "freq" in n}
    assert len({tuple(b.tolist()) for b in want.values()}) >= 2
    _apply()
    model = _meta(lambda: Gemma3ForCausalLM(cfg), include_buffers=True)
    messages = _materialise(model, per_module)
    _never_silently_wrong(model, want, messages, exact=True)




@pytest.mark.parametrize("per_module", [False, True], ids=["whole", "per_module"])
def test_user_position_ids_are_not_overwritten(per_module):
    """Issue 12 item 6: a user-registered position_ids on a BERT embeddings module was overwritten
    with 0..N: (a) a shorter one registered on BertEmbeddings itself, (b) a user subclass of
    BertEmbeddings counting from 2 (RoBERTa style) put into a BertModel. Neither is what any
    recipe was written for: named in the warning, never replaced by 0..N."""
    from transformers import BertConfig, BertModel
    from transformers.models.bert.modeling_bert import BertEmbeddings

    class MyEmbeddings(BertEmbeddings):
        def __init__(self, config):
            super().__init__(config)
            n = config.max_position_embeddings
            self.register_buffer("position_ids", torch.arange(2, n + 2).expand((1, -1)), persistent=False)

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)

    def shorter():
        model = BertModel(cfg)
        model.embeddings.register_buffer("position_ids", torch.arange(5, 21).view(1, 16), persistent=False)
        return model

    def subclassed():
        model = BertModel(cfg)
        model.embeddings = MyEmbeddings(cfg)
        return model

    _apply()
    for build in (shorter, subclassed):
        eager = build()
        model = _meta(build, include_buffers=True)
        messages = _materialise(model, per_module)
        got = model.embeddings.position_ids
        assert not torch.equal(got, torch.arange(got.shape[-1]).expand(got.shape)), f"{build.__name__}: overwritten with 0..N"
        assert torch.equal(got, eager.embeddings.position_ids) or any("position_ids" in m for m in messages), (
            f"{build.__name__}: position_ids {got.tolist()} neither right nor warned: {messages}")
        # the untouched token_type_ids of the real BertEmbeddings: recomputed. Of the user's subclass
        # (a class no recipe was written for): recomputed by nothing, named in the warning
        if build is shorter:
            assert torch.equal(model.embeddings.token_type_ids, eager.embeddings.token_type_ids)
        else:
            assert any("token_type_ids" in m for m in messages), messages


def test_replay_refuses_random_buffers_and_writes_it_cannot_see():
    """The recorded rebuild recovers a buffer only from its exact lineage: a buffer drawn at random
    in __init__ cannot be recomputed (a fresh draw would pass for it), and one written through raw
    storage is invisible to the log: both named in the warning; a plain one next to them recovered."""
    import transformers
    from transformers import PreTrainedModel

    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig

    class Cfg(base):
        model_type = "hfpatches_rng_toy"

    class Model(PreTrainedModel):
        config_class = Cfg

        def __init__(self, config):
            super().__init__(config)
            self.lin = nn.Linear(2, 2)
            self.register_buffer("noise", torch.rand(4) * 2, persistent=False)
            self.register_buffer("plain", torch.arange(4.0) + 0.5, persistent=False)
            hidden = torch.zeros(4)
            hidden.untyped_storage()  # a caller could write through it: the log would not see that
            self.register_buffer("hidden", hidden + 1, persistent=False)
            self.post_init()

        def _init_weights(self, module):
            pass

    _apply()
    model = _meta(lambda: Model(Cfg()), include_buffers=True)
    messages = _materialise(model, per_module=False)
    assert len(messages) == 1 and "noise" in messages[0] and "hidden" in messages[0], messages
    assert "plain" not in messages[0] and torch.equal(model.plain, torch.arange(4.0) + 0.5)
    assert torch.isnan(model.noise).all() and torch.isnan(model.hidden).all()
