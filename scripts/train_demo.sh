#!/usr/bin/env bash
# Train the demo weights of all three GuideGen stages on the demo data set, on CPU.
#
#   scripts/train_demo.sh                          # ~2.8 hours on 2 shared CPU cores; writes bundles/guidegen_*/models/model.pt
#   STAGES="autoencoder ldm" scripts/train_demo.sh # only these stages (the latent generator needs the autoencoder)
#   FRESH=1 scripts/train_demo.sh                  # forget earlier (interrupted or finished) runs and start over
#
# What it does: builds the demo data set (procedural phantoms + the real example CT, mask 32^3, CT 64^3),
# trains TCSS, then the autoencoder, then the latent generator on it with each bundle's train_cpu.yaml, copies each
# model into its bundle's models/model.pt, stores the two U-Nets' weights as float16 and records each model's md5 in
# the bundle's large_files.yml.
# Resumable: each stage trains in $LOG_DIR/<bundle>/ (checkpoints, MLflow runs, log), so a killed run continues from
# its last checkpoint when the script is run again, and a finished stage is skipped. Every stage of a run starts from
# scratch, so the committed weights are exactly what this script makes; retraining the autoencoder also restarts the
# latent generator, whose latents it encodes. Epoch counts can be changed through the environment (TCSS_EPOCHS,
# AE_EPOCHS, LDM_EPOCHS); PYTHON picks the interpreter (default .venv/bin/python).
# The demo models learn a 32^3 torso layout and 64^3 CT texture from 7 training cases: they show the
# pipeline working end to end, they are not a model of human anatomy (see README, "Demo weights").
# The example CT's last 30 slices (TotalSegmentator's ct_small) are held out of the demo data set: the autoencoder
# benchmark (bench/ae_ablation.py) judges reconstructions on them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TCSS_EPOCHS=${TCSS_EPOCHS:-250}
# The demo data set trains on 7 cases (2 phantoms validate). The budgets measured in BENCHMARKS.md trained on all 9:
AE_EPOCHS=${AE_EPOCHS:-1000}   # 4 steps of two 32^3 patches per epoch: 4000 steps, cosine lr (the issue 14 recipe)
LDM_EPOCHS=${LDM_EPOCHS:-1000} # 7 steps per epoch: 7000 steps, v-prediction (the 7200-step mask -> CT runs)
STAGES=${STAGES:-tcss autoencoder ldm}
LOG_DIR=${LOG_DIR:-outputs/train_demo}

for name in $STAGES; do
  case $name in tcss | autoencoder | ldm) ;; *) echo "[train_demo] unknown stage '$name' in STAGES (tcss, autoencoder, ldm)" >&2; exit 2 ;; esac
done
if [[ ${FRESH:-0} == 1 ]]; then rm -rf "$LOG_DIR"; fi
mkdir -p "$LOG_DIR"

stage() {  # stage <name> <bundle> <epochs>: train one bundle in its own run folder (resuming it), then install its model
  local name=$1 bundle=$2 epochs=$3
  local run="$LOG_DIR/$bundle"
  if [[ -f $run/done ]]; then
    echo "[train_demo] $name: finished earlier ($(cat "$run/done")); FRESH=1 retrains" >&2
    return
  fi
  local how="from scratch"
  if compgen -G "$run/models/checkpoint_epoch=*.pt" >/dev/null; then how="resumed from its last checkpoint"; fi
  mkdir -p "$run"
  local start=$SECONDS
  echo "[train_demo] $name: training $epochs epochs, $how (log: $run/train.log)" >&2
  "$PYTHON" -m monai.bundle run training \
    --config_file "['bundles/$bundle/configs/train.yaml','bundles/$bundle/configs/train_cpu.yaml']" \
    --resume true --max_epochs "$epochs" --datalist demo/datalist.json \
    --ckpt_dir "$run/models" --output_dir "$run/outputs" >>"$run/train.log" 2>&1 || {
      echo "[train_demo] $name stopped; the end of $run/train.log (run the script again to resume):" >&2
      tail -n 30 "$run/train.log" >&2
      exit 1
    }
  if [[ $bundle != guidegen_autoencoder ]]; then
    # The U-Nets' float32 weights are ~31 MB each: float16 storage (~16 MB) keeps every shipped file under 25 MB. The
    # autoencoder (3 MB) stays float32: the latent generator's latents were encoded with it, and it records its SHA-256.
    "$PYTHON" -c "from custom_components.engines import compact_model_file; compact_model_file('$run/models/model.pt')"
  fi
  cp "$run/models/model.pt" "bundles/$bundle/models/model.pt"
  echo "$((SECONDS - start)) s, $how" >"$run/done"
  echo "[train_demo] $name: done in $((SECONDS - start)) s ($how)" >&2
  echo "$bundle $((SECONDS - start)) s, $how" >>"$LOG_DIR/times.txt"
}

start_all=$SECONDS
"$PYTHON" -m custom_components.cli demo-data --output_dir demo
for name in tcss autoencoder ldm; do  # in this order whatever STAGES lists: stage 3 encodes with stage 2's model
  [[ " $STAGES " == *" $name "* ]] || continue
  case $name in
    tcss) stage "stage 1 (TCSS)" guidegen_tcss "$TCSS_EPOCHS" ;;
    autoencoder)
      if [[ ! -f $LOG_DIR/guidegen_autoencoder/done ]]; then rm -rf "$LOG_DIR/guidegen_ldm"; fi  # new latents: retrain stage 3
      stage "stage 2 (autoencoder)" guidegen_autoencoder "$AE_EPOCHS" ;;
    ldm) stage "stage 3 (latent generator)" guidegen_ldm "$LDM_EPOCHS" ;;
  esac
done
"$PYTHON" -c "from custom_components.packaging import write_large_files, BUNDLE_NAMES; [print(write_large_files(n)) for n in BUNDLE_NAMES]"
echo "total $((SECONDS - start_all)) s ($STAGES)" >>"$LOG_DIR/times.txt"
echo "[train_demo] stages '$STAGES' trained in $((SECONDS - start_all)) s; weights in bundles/guidegen_*/models/model.pt" >&2
