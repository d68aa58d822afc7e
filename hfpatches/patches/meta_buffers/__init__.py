"""``meta_buffers``: ``Module.to_empty`` keeps non-persistent buffers (meta init -> to_empty -> load).

Bug
    ``to_empty`` gives every tensor new, uninitialised storage. Non-persistent buffers (rotary
    ``inv_freq``, BERT ``position_ids`` / ``token_type_ids``, causal ``bias`` masks) are in no state
    dict, so ``load_state_dict`` never repairs them: after meta init -> ``to_empty`` -> load (also
    FSDP's per-module ``to_empty(recurse=False)``) the model gives wrong, run-to-run different outputs.
Affected
    torch >= 2.1 with transformers 4.x-5.x (seen on 4.51.3 and 5.23.0); unfixed upstream.
Upstream
    huggingface/transformers#34234, #36577, #25555, #45902, #48932 (core fix declined);
    pytorch/pytorch#105840 (FSDP ``param_init_fn`` with ``to_empty(recurse=False)``).
Probe
    A tiny module's non-persistent CPU buffer: still there after ``Module.to_empty(device="cpu")``?
What changes
    ``torch.nn.Module.to_empty`` calls torch's, then, for the non-persistent buffers it emptied: a
    buffer that held data keeps it (the tensor itself when device and dtype match); a buffer on
    meta is recomputed on the CPU and copied in, only by a recipe written for its class: (1) a
    transformers class whose constructor takes only ``config`` (and ``device``), replayed from the
    config the module holds, recorded in this thread only (``_Recording``: a ``TorchFunctionMode``;
    nothing process-global is touched); (2) BERT-style ids of classes whose ``__init__`` registers
    exactly that expression, at its shape; (3) the owning ``PreTrainedModel``'s constructor
    replayed the same way, the buffer taken from a counterpart of the same class, shape and dtype.
    Anything else is named in one ``UninitialisedBufferWarning``.
    ``hfpatches.materialize(model, device)`` does the same explicitly, with or without the patch.
    Rationale and affected versions: docs/patches/meta_buffers.md.
"""
from hfpatches._declare import Patch, Target

PATCH = Patch(
    id="meta_buffers",
    summary="meta-device init -> to_empty -> load_state_dict keeps non-persistent buffers "
            "(rotary inv_freq, BERT position_ids, ...) instead of leaving uninitialised memory",
    upstream=("huggingface/transformers#34234", "huggingface/transformers#36577",
              "huggingface/transformers#25555", "huggingface/transformers#45902",
              "huggingface/transformers#48932", "pytorch/pytorch#105840"),
    requires=("torch>=2.1", "transformers>=4.0"),
    fixed_in=None,
    targets=(Target("torch", "nn.Module.to_empty", params=("self", "device", "recurse")),),
    affected="seen on transformers 4.51.3 and 5.23.0",
)
