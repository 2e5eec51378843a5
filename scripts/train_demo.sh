#!/usr/bin/env bash
# Train the demo weights of all three GuideGen stages on the demo data set, on CPU, from scratch.
#
#   scripts/train_demo.sh            # ~1 hour on 2 CPU cores; writes bundles/guidegen_*/models/model.pt
#
# What it does: builds the demo data set (procedural phantoms + the real example CT, mask 32^3, CT 64^3),
# trains TCSS, then the autoencoder, then the latent generator on it with each bundle's train_cpu.yaml, and
# stores the two U-Nets' weights as float16 and records each model's md5 in the bundle's large_files.yml. Each stage starts from scratch (resume false),
# so the committed weights are exactly what this script makes. Epoch counts can be changed through the
# environment (TCSS_EPOCHS, AE_EPOCHS, LDM_EPOCHS); PYTHON picks the interpreter (default .venv/bin/python).
# The demo models learn a 32^3 torso layout and 64^3 CT texture from 7 training cases: they show the
# pipeline working end to end, they are not a model of human anatomy (see README, "Demo weights").
# The example CT's last 30 slices (TotalSegmentator's ct_small) are held out of the demo data set: the autoencoder
# benchmark (bench/ae_ablation.py) judges reconstructions on them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TCSS_EPOCHS=${TCSS_EPOCHS:-250}
AE_EPOCHS=${AE_EPOCHS:-800}  # 5 steps of two 32^3 patches per epoch: 4000 steps, cosine lr (issue 14 recipe)
LDM_EPOCHS=${LDM_EPOCHS:-300}
LOG_DIR=${LOG_DIR:-outputs/train_demo}
mkdir -p "$LOG_DIR"

stage() {  # stage <name> <bundle> <extra args...>: train one bundle from scratch, log and time it
  local name=$1 bundle=$2
  shift 2
  local start=$SECONDS
  echo "[train_demo] $name: training (log: $LOG_DIR/$bundle.log)" >&2
  "$PYTHON" -m monai.bundle run training \
    --config_file "['bundles/$bundle/configs/train.yaml','bundles/$bundle/configs/train_cpu.yaml']" \
    --resume false --datalist demo/datalist.json "$@" >"$LOG_DIR/$bundle.log" 2>&1 || {
      echo "[train_demo] $name failed; the end of its log:" >&2
      tail -n 30 "$LOG_DIR/$bundle.log" >&2
      exit 1
    }
  echo "[train_demo] $name: done in $((SECONDS - start)) s" >&2
  echo "$bundle $((SECONDS - start))" >>"$LOG_DIR/times.txt"
}

: >"$LOG_DIR/times.txt"
start_all=$SECONDS
"$PYTHON" -m custom_components.cli demo-data --output_dir demo
stage "stage 1 (TCSS)" guidegen_tcss --max_epochs "$TCSS_EPOCHS"
stage "stage 2 (autoencoder)" guidegen_autoencoder --max_epochs "$AE_EPOCHS"
stage "stage 3 (latent generator)" guidegen_ldm --max_epochs "$LDM_EPOCHS"
# The two U-Nets' float32 weights are ~31 MB each: store them as float16 (~16 MB) so every shipped file stays under
# 25 MB. The autoencoder (4.6 MB) stays float32: the latent generator's training latents were encoded with it, and it
# records that file's SHA-256.
"$PYTHON" -c "from custom_components.engines import compact_model_file; [compact_model_file(f'bundles/{n}/models/model.pt') for n in ('guidegen_tcss', 'guidegen_ldm')]"
"$PYTHON" -c "from custom_components.packaging import write_large_files, BUNDLE_NAMES; [print(write_large_files(n)) for n in BUNDLE_NAMES]"
echo "total $((SECONDS - start_all))" >>"$LOG_DIR/times.txt"
echo "[train_demo] all stages trained in $((SECONDS - start_all)) s; weights in bundles/guidegen_*/models/model.pt" >&2
