"""The checkpoint file names transformers writes and reads, in one place (``loading``, the
``flash_attn_bert_prefix`` patch)."""

SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
ADAPTER_NAME = "adapter_model.safetensors"
