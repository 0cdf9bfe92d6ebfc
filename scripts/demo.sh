#!/usr/bin/env bash
# `make demo`: show what the engine does today with the bundled tiny sd1 model.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=build/bin/diffuse
model=tests/data/sd1/model/tiny-sd1.safetensors
if "$bin" --help 2>/dev/null | grep -q "generate"; then
  echo "== generating out.png with the bundled tiny SD 1.x test model =="
  echo "   (its weights are random: the picture is noise, not an astronaut)"
  "$bin" generate -m "$model" -p "a photograph of an astronaut riding a horse" -W 256 -H 256 --steps 10 -s 42 -o out.png
  "$bin" info out.png
  echo
  echo "Run a real checkpoint (SD 1.x/2.x/XL, .safetensors, .ckpt or a diffusers folder):"
  echo "  $bin generate -m /path/to/v1-5-pruned-emaonly.safetensors -p \"a cat on a sofa\" -o cat.png"
else
  echo "== diffuse info on the bundled tiny sd1 model =="
  "$bin" info "$model"
  echo
  echo "Image generation (diffuse generate) is not implemented yet: the engine core, model files and"
  echo "CPU kernels are in place; models and pipelines are the next issues. Try a real checkpoint now:"
  echo "  $bin info /path/to/v1-5-pruned-emaonly.safetensors"
  echo "  $bin bench ops"
fi
