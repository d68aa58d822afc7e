"""``meta_buffers``: meta init -> ``to_empty`` -> load keeps the non-persistent buffers.

Bug
    ``Module.to_empty`` gives every tensor new, uninitialised storage. Non-persistent buffers
    (rotary ``inv_freq``, BERT ``position_ids``, causal masks) are in no state dict, so loading
    never repairs them: the model runs with garbage (wrong, run-to-run different outputs).
Affected
    torch >= 2.1 with transformers 4.x-5.x (seen on 4.51.3 and 5.23.0); not fixed upstream.
Upstream
    huggingface/transformers#34234, #36577, #48932; pytorch/pytorch#105840 (FSDP param_init_fn).
Probe
    a tiny module with a non-persistent CPU buffer: are its values still there after the
    installed ``to_empty(device="cpu")``?
What changes
    ``torch.nn.Module.to_empty`` keeps the values of non-persistent buffers that held data, and
    recomputes those that were on ``meta`` with recipes written for the classes they know
    (transformers' own initialisers, rotary embeddings); anything else is named in one
    ``UninitialisedBufferWarning``. Nothing process-global is changed while it runs.
    ``hfpatches.materialize(model, device)`` does the same explicitly.
    Rationale: docs/patches/meta_buffers.md.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="meta_buffers",
    summary="meta-device init -> to_empty -> load_state_dict keeps non-persistent buffers "
            "(rotary inv_freq, BERT position_ids, ...) instead of leaving uninitialised memory",
    upstream=("huggingface/transformers#34234", "huggingface/transformers#36577",
              "huggingface/transformers#48932", "pytorch/pytorch#105840"),
    requires=("torch>=2.1", "transformers>=4.0"),
    fixed_in=None,
    targets=(Target("torch", "nn.Module.to_empty", params=("self", "device", "recurse")),),
    affected="torch>=2.1 with transformers 4.x-5.x (seen on 4.51.3 and 5.23.0); unfixed",
)
