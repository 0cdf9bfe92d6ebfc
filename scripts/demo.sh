#!/usr/bin/env bash
# `make demo`: draws with the bundled demo model (data/models/, trained from scratch by diffuse on
# coloured shapes: `make demo-model`), then says how to run a real checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=build/bin/diffuse
model=data/models/diffuse-shapes-64.safetensors
out=demo-out
mkdir -p "$out"
if [ -f "$model" ]; then
  echo "== the demo model: $model (a tiny SD 1.x-architecture model diffuse trained itself; see the README's model card) =="
  prompt="a red circle on the left on a blue background"
  "$bin" generate -q -m "$model" -p "$prompt" -s 42 -o "$out/red-circle.png"
  echo "   \"$prompt\" -> $out/red-circle.png"
  cat > "$out/prompts.txt" <<'EOF'
a red circle on the left on a blue background
a large yellow square in the centre, black background
a green triangle at the top on a white background
a small white circle at the bottom, purple background
an orange square on the right with a blue background
a blue triangle on the left on a yellow background
a purple circle in the middle, green background
a black square at the top on an orange background
EOF
  "$bin" generate -q -m "$model" --prompt-file "$out/prompts.txt" -s 1 -o "$out/prompt.png" --grid "$out/grid.png" \
    --grid-cols 4
  echo "   8 prompts ($out/prompts.txt, left to right, top to bottom) -> $out/grid.png (each also as $out/prompt*.png)"
else
  echo "== $model is not there: run 'make demo-model' to train it (about 2.5 hours on 2 cores) =="
  echo "   meanwhile, the tiny random-weight test model (its picture is noise):"
  "$bin" generate -q -m tests/data/sd1/model/tiny-sd1.safetensors -p "a red circle on the left on a blue background" \
    -W 64 -H 64 --steps 10 -s 42 -o "$out/tiny.png"
  echo "   -> $out/tiny.png"
fi
echo
echo "Run a real checkpoint (SD 1.x/2.x/XL, .safetensors, .ckpt or a diffusers folder):"
echo "  $bin generate -m /path/to/v1-5-pruned-emaonly.safetensors -p \"a cat on a sofa\" -o cat.png"
