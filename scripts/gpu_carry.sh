#!/usr/bin/env bash
# Builds, on a CPU machine, what `loraflow run` needs on a GPU worker whose image lacks it (issue 31):
#   site.tgz   wheels for Python 3.12 / x86-64 unpacked into one folder and packed: Prefect 3.8.8 and its
#              dependencies, pandera, gguf, bitsandbytes (CUDA 13.0 and CPU libraries only), liger-kernel;
#              packages the image already holds (scripts/gpu_image_packages.txt) are left out;
#   smollm2/   SmolLM2-135M-Instruct's tokenizer files and config, for scripts/make_8b_model.py.
#
#   scripts/gpu_carry.sh [OUT_DIR]         # default: .gpu_flow/pack under the repository root
#
# On the GPU machine:  mkdir -p /tmp/gs && tar xzf OUT_DIR/site.tgz -C /tmp/gs && export PYTHONPATH=/tmp/gs/site:$PWD
# Prefect's side resolves with its dependencies (pip picks versions for 3.12); bitsandbytes and liger-kernel come
# without theirs (torch and triton are in the image; resolving them would pull CUDA wheels by the gigabyte).
# The device tool carries at most 64 MiB a call: the script fails if the pack is larger.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/.gpu_flow/pack}" && cd "${1:-$root/.gpu_flow/pack}" && pwd)
image_list=${GPU_IMAGE_PACKAGES:-$root/scripts/gpu_image_packages.txt}
smollm2=${SMOLLM2_DIR:-$HOME/.cache/loraflow/models/SmolLM2-135M-Instruct}
python=${PYTHON:-python3}
limit_mib=${CARRY_LIMIT_MIB:-60}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 "${platforms[@]}")
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

# ---- download: Prefect's side with dependencies, the GPU libraries without
"$python" -m pip download -q "${target[@]}" -d "$work/wheels" \
  "prefect==3.8.8" "fastapi>=0.139,<0.151" "sqlalchemy[asyncio]>=2.0,<2.1" "pydantic==2.14.3" "pyyaml==6.0.3" \
  "pandera==0.35.0" "gguf==0.19.0"
"$python" -m pip download -q --no-deps "${target[@]}" -d "$work/wheels" "bitsandbytes==0.50.2" "liger-kernel==0.8.5"

# ---- unpack what the image lacks
have=$(grep -v '^#' "$image_list" | tr ' ' '\n' | tr 'A-Z_.' 'a-z--')
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  if grep -qx "$name" <<<"$have"; then echo "in image: $(basename "$wheel")"; continue; fi
  "$python" -m zipfile -e "$wheel" "$work/site"
  echo "carry: $(basename "$wheel")"
done
find "$work/site" -path '*bitsandbytes/libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*cpu.so' -delete
find "$work/site" -name __pycache__ -prune -exec rm -rf {} +
tar czf "$out/site.tgz" -C "$work" site

# ---- SmolLM2's tokenizer and config (the 8B stand-in reuses its vocabulary)
mkdir -p "$out/smollm2"
for file in tokenizer.json tokenizer_config.json chat_template.jinja config.json generation_config.json; do
  [ -f "$smollm2/$file" ] && cp "$smollm2/$file" "$out/smollm2/"
done
[ -f "$out/smollm2/tokenizer.json" ] || { echo "no SmolLM2 tokenizer at $smollm2 (run loraflow once, or set SMOLLM2_DIR)" >&2; exit 1; }

size_mib=$(( $(du -sk "$out" | cut -f1) / 1024 ))
echo "pack: $out ($size_mib MiB)"
[ "$size_mib" -le "$limit_mib" ] || { echo "the pack is over ${limit_mib} MiB: the device tool carries 64 MiB a call" >&2; exit 1; }
