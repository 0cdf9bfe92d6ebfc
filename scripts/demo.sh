#!/usr/bin/env bash
# `make demo`: show what the engine does today with the bundled tiny sd1 model.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=build/bin/diffuse
model=tests/data/sd1/model/tiny-sd1.safetensors
if "$bin" --help 2>/dev/null | grep -q "generate"; then
  echo "== generating out.png with the bundled tiny sd1 model (random weights: it draws noise) =="
  "$bin" generate -m "$model" -p "a photograph of an astronaut riding a horse" -W 64 -H 64 --steps 5 -s 42 -o out.png
  echo "Run a real checkpoint: $bin generate -m /path/to/v1-5-pruned-emaonly.safetensors -p \"a cat\" -o cat.png"
else
  echo "== diffuse info on the bundled tiny sd1 model =="
  "$bin" info "$model"
  echo
  echo "Image generation (diffuse generate) is not implemented yet: the engine core, model files and"
  echo "CPU kernels are in place; models and pipelines are the next issues. Try a real checkpoint now:"
  echo "  $bin info /path/to/v1-5-pruned-emaonly.safetensors"
  echo "  $bin bench ops"
fi
