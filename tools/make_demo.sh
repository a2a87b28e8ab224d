#!/usr/bin/env bash
# Remakes weights/demo/ (the default that runs when no official FLUX checkpoint is in weights/) from scratch:
# synthetic scenes -> tiny autoencoder -> tiny RGB-conditioned FLUX base (Kontext-style) -> the default scheme B's
# warmup (train.py's defaults: the weights that sampling and the quick start's training both read).
# Every step is one of the project's own commands, run from the repository root; step counts can be overridden:
# AE_STEPS=... tools/make_demo.sh. CONDITION_CACHE=1 trains the base and the warmup with --condition-cache (the
# condition cache); with FLUX_IR_WEIGHTS=DIR the weights go to DIR/demo/ instead of weights/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
AE_STEPS=${AE_STEPS:-3000}
AE_FULL_STEPS=${AE_FULL_STEPS:-400}
BASE_STEPS=${BASE_STEPS:-1500}
BASE_MORE_STEPS=${BASE_MORE_STEPS:-2500}
WARMUP_STEPS=${WARMUP_STEPS:-3000}
export FLUX_IR_WEIGHTS=${FLUX_IR_WEIGHTS:-weights}
CC=""; [ "${CONDITION_CACHE:-0}" = 1 ] && CC="--condition-cache"
start=$(date +%s)
[ -d data/synth ] || python -m tools.synth data/synth --count 512 --size 128 --seed 0
[ -d data/synth-test ] || python -m tools.synth data/synth-test --count 64 --size 128 --seed 1
# the autoencoder: first on cheap 32px crops, then on whole images (GroupNorm statistics of a crop are not a whole
# image's, so the last steps must see whole images)
python -m tools.train_ae --data data/synth --steps "$AE_STEPS" --batch-size 12 --crop 32 --out runs/demo-ae \
    --overwrite
python -m tools.train_ae --data data/synth --steps "$AE_FULL_STEPS" --batch-size 4 --crop 0 --lr 3e-4 \
    --warmup-steps 20 --init runs/demo-ae/ae.safetensors --out "$FLUX_IR_WEIGHTS/demo" --overwrite
# the base: RGB -> IR only (the analog of the pretrained model), then a second cosine cycle from its output
python train.py --stage base --scheme none $CC --data data/synth --steps "$BASE_STEPS" --batch-size 16 --out runs/demo-base --overwrite
python train.py --stage base --scheme none $CC --data data/synth --steps "$BASE_MORE_STEPS" --batch-size 16 --lr 4e-4 --overwrite \
    --init runs/demo-base/final.safetensors --out runs/demo-base2
cp runs/demo-base2/final.safetensors "$FLUX_IR_WEIGHTS/demo/flux.safetensors"
# scheme B as train.py trains it by default (its form, token width and learning rate are train.py's defaults)
python train.py --stage warmup $CC --data data/synth --steps "$WARMUP_STEPS" --batch-size 16 --overwrite \
    --out runs/demo-warmup
cp runs/demo-warmup/final.safetensors "$FLUX_IR_WEIGHTS/demo/xattn.safetensors"
echo "make_demo.sh: done in $(( $(date +%s) - start )) s"
