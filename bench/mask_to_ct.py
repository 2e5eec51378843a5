"""Mask -> CT on held-out masks: do generated organs get their real intensities? (issue 14, with and without body class)

For each class map (``plain``: GuideGen's 20 classes, where class 0 mixes outside air with all unlabelled tissue;
``body``: the same plus a derived "body" class, ``guidegen prepare --body_class true``) and each seed, the latent
generator is trained with the bundle's own command (``train.yaml`` + ``train_cpu.yaml``) on the demo data set built
with that map, on the latents of one given autoencoder (trained on images only, so it serves both maps). Each trained
generator then turns held-out masks into CTs with the bundle's own inference command. Each (map, seed) is trained
once per ``--prediction_types`` entry (the bundle's ``prediction_type`` key: the paper's ``epsilon`` noise target, or
``v_prediction``) and ``--mask_encodings`` entry (the bundle's ``mask_encoding`` key: how the mask reaches the latent
grid), side by side on the same data and autoencoder:

* ``ct_small``: slices 82-111 of the example CT (held out of the demo data set) with its TotalSegmentator v2 labels,
  prepared at the demo's voxel size (64 x 64 x 24 CT, 32 x 32 x 12 mask) and padded along z to the generator's
  32^3 mask by repeating its end slices (the torso continues); only the real 24 slices are scored;
* three phantoms made with a seed the training phantoms never used.

``--held_out_slices FIRST,STOP`` replaces ``ct_small`` by that slab of the example CT (with its v1 labels), held out
of the training data instead (see ``bench/ae_ablation.py``); its case is named ``example_<first>_<last>``.

Scores per case and class (background and tumor excluded; classes with >= ``--min_voxels`` CT voxels): the median HU of
the generated CT over the class's voxels against the real CT's median there; an organ "passes" within +-50 HU.
"Unlabelled body tissue" = the voxels the body class covers (for the plain map: the same derivation applied to the
held-out case, so both maps are scored on the same voxels); it passes within +-60 HU.
Beside the median, each organ's interquartile range (IQR) of HU in the generated CT against the real one's: a generator
should draw an organ's texture, not only its level.

Trivial baseline, scored in the same run (``paint``: no learning, no seed): every voxel of a held-out case painted with
its class's median HU over all voxels of that class in the generator's training set (on the CT grid). It gets a level
right wherever training and test agree, and has no texture (IQR 0).

``--shipped`` scores the repository's demo weights (the latent generator and the autoencoder it was trained with, made by
``scripts/train_demo.sh``) on the same held-out cases instead of training: one model, sampled with each seed.

Usage (prints JSON, writes <work_dir>/results.json; --markdown prints the table):
    .venv/bin/python bench/mask_to_ct.py --work_dir /tmp/mask_to_ct --autoencoder_path AE.pt --seeds 0,1,2 \
        --maps body,plain --prediction_types epsilon,v_prediction --max_epochs 300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.networks.schedulers.ddpm import DDPMPredictionType
# the same held-out slab and demo autoencoder as the autoencoder bench (bench/ on sys.path)
from ae_ablation import SHIPPED_MODEL as SHIPPED_AUTOENCODER, HeldOut, check_held_out_arguments, prepare_held_out_slab
from bundle_runs import run_logged, train_bundle
from custom_components.networks.latent_denoiser import MASK_ENCODINGS
from ldm_alignment import on_grid  # nearest-neighbour label resampling, as the alignment bench does

REPO = Path(__file__).resolve().parents[1]
SHARED_EXAMPLE = REPO.parent / "shared" / "data" / "totalsegmentator_example"
TRAIN_CONFIGS = ["bundles/guidegen_ldm/configs/train.yaml", "bundles/guidegen_ldm/configs/train_cpu.yaml"]
MAPS = ("plain", "body")
ORGAN_TOLERANCE_HU = 50.0
BODY_TOLERANCE_HU = 60.0
PREDICTION_TYPES = tuple(str(kind) for kind in DDPMPredictionType)  # the bundle's prediction_type values
UNNAMED_MASK_ENCODING = "onehot"  # its runs keep the folder and name they had before the encoding was a variant
DEFAULT_MASK_ENCODING = "fractions"  # the bundle's train.yaml default
HELD_OUT_PHANTOM_SEED = 1000
SHIPPED_GENERATOR = REPO / "bundles" / "guidegen_ldm" / "models" / "model.pt"


def _pad_z(path: Path, target: int, out: Path) -> tuple[int, int]:
    """Pad a volume along z to ``target`` slices by repeating its end slices; returns the real slices' range."""
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    before = (target - data.shape[2]) // 2
    after = target - data.shape[2] - before
    padded = np.pad(data, ((0, 0), (0, 0), (before, after)), mode="edge")
    affine = image.affine.copy()
    affine[:3, 3] -= affine[:3, 2] * before
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(padded.astype(data.dtype), affine), str(out))
    return before, before + data.shape[2]


def build_data(work_dir: Path, map_name: str, held_out: HeldOut) -> tuple[Path, Path]:
    """The demo training set and the held-out set (slab + unseen phantoms) of one class map."""
    from custom_components.data.class_map import load_class_map
    from custom_components.data.demo.dataset import build_demo_dataset

    body = map_name == "body"
    root = work_dir / map_name
    train = build_demo_dataset(root / "train_data", val_fraction=0.0, progress=False, body_class=body, held_out_slices=held_out.slices)
    phantoms = build_demo_dataset(
        root / "held_out_phantoms", num_phantoms=3, include_example_ct=False, val_fraction=0.0,
        seed=HELD_OUT_PHANTOM_SEED, progress=False, body_class=body,
    )  # fmt: skip
    slab = root / "held_out_slab"
    prepare_held_out_slab(work_dir, held_out, slab, class_map=load_class_map(None, body_class=body))

    # one held-out datalist: the slab padded to the generator's mask size, then the unseen phantoms
    train_list = json.loads(Path(train).read_text())
    mask_size, image_size = train_list["prepare_settings"]["mask_size"], train_list["prepare_settings"]["image_size"]
    slab_list = json.loads((slab / "datalist.json").read_text())
    held = root / "held_out"
    cases = []
    for item in slab_list["training"]:
        name = f"{held_out.case_id}.nii.gz"
        label_range = _pad_z(slab / item["label"], mask_size[2], held / "labels" / name)
        image_range = _pad_z(slab / item["image"], image_size[2], held / "images" / name)
        cases.append({**item, "image": f"images/{name}", "label": f"labels/{name}",
                      "scored_z": list(image_range), "scored_mask_z": list(label_range)})
    phantom_list = json.loads(Path(phantoms).read_text())
    for item in phantom_list["training"]:
        for key in ("image", "label"):
            target = held / f"{key}s" / f"heldout_{Path(item[key]).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(phantoms).parent / item[key], target)
            item = {**item, key: str(target.relative_to(held))}
        cases.append({**item, "case_id": f"heldout_{item['case_id']}", "scored_z": [0, image_size[2]]})
    shutil.copyfile(Path(train).parent / "class_map.json", held / "class_map.json")
    held_list = {**train_list, "name": f"held_out_{map_name}", "training": [], "validation": cases}
    (held / "datalist.json").write_text(json.dumps(held_list, indent=1))
    return Path(train), held / "datalist.json"


def variant(prediction: str, encoding: str) -> str:
    """A generator recipe's name in folders and results: the prediction type, and the mask encoding unless onehot."""
    return prediction if encoding == UNNAMED_MASK_ENCODING else f"{prediction}_{encoding}"


def run_folder(work_dir: Path, map_name: str, recipe: str, seed: int) -> Path:
    """Where one generator (class map, recipe from :func:`variant`, seed) is trained and its CTs are written."""
    return work_dir / map_name / recipe / f"seed{seed}"


def train_and_generate(
    map_name: str, prediction: str, encoding: str, seed: int, args: argparse.Namespace, train_list: Path, held_list: Path
) -> tuple[Path, float]:
    """Train one generator (resumable; skipped when done) and generate CTs for the held-out masks."""
    folder = run_folder(args.work_dir, map_name, variant(prediction, encoding), seed)
    model, seconds = train_bundle(folder, TRAIN_CONFIGS, train_list, args.max_epochs, seed, args.threads,
                                  {"autoencoder_path": args.autoencoder_path, "prediction_type": prediction,
                                   "mask_encoding": encoding})
    return generate(folder, model, args.autoencoder_path, seed, args, held_list), seconds


def generate(folder: Path, model: Path, autoencoder: Path, seed: int, args: argparse.Namespace, held_list: Path) -> Path:
    """CTs for the held-out masks from one generator, with the bundle's inference command (skipped when done)."""
    generated = folder / "generated"
    if not (generated / "done").is_file():
        run_logged([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "bundles/guidegen_ldm/configs/inference.yaml",
              "--model_path", str(model), "--autoencoder_path", str(autoencoder), "--datalist", str(held_list),
              "--split", "validation", "--output_dir", str(generated), "--num_inference_steps", str(args.steps),
              "--seed", str(seed), "--class_map_path", str(held_list.parent / "class_map.json")], folder / "generate.log", args.threads)
        (generated / "done").write_text("")
    return generated


def score(held_list: Path, generated: Path, min_voxels: int) -> dict[str, dict[str, object]]:
    """Per held-out case: per organ real vs generated median HU, and the unlabelled body tissue's."""
    from custom_components.data.body import add_body_class
    from custom_components.data.class_map import load_class_map

    data = json.loads(held_list.read_text())
    class_map = load_class_map(held_list.parent / "class_map.json")
    names = list(class_map.class_names)
    excluded = {0, class_map.tumor_index, class_map.body_index}
    out: dict[str, dict[str, object]] = {}
    for item in data["validation"]:
        real = np.asarray(nib.load(str(held_list.parent / item["image"])).dataobj, dtype=np.float32)
        fake = np.asarray(nib.load(str(generated / item["case_id"] / "ct.nii.gz")).dataobj, dtype=np.float32)
        labels = on_grid(np.asarray(nib.load(str(held_list.parent / item["label"])).dataobj), real.shape)
        z0, z1 = item["scored_z"]
        real, fake, labels = real[..., z0:z1], fake[..., z0:z1], labels[..., z0:z1]
        organs = {}
        for c in np.unique(labels):
            if int(c) in excluded or (labels == c).sum() < min_voxels:
                continue
            r, g = float(np.median(real[labels == c])), float(np.median(fake[labels == c]))
            real_iqr, fake_iqr = (float(np.subtract(*np.percentile(v[labels == c], [75, 25]))) for v in (real, fake))
            organs[names[int(c)]] = {"real": round(r, 1), "generated": round(g, 1), "error": round(g - r, 1),
                                     "real_iqr": round(real_iqr, 1), "generated_iqr": round(fake_iqr, 1)}
        if class_map.body_index is not None:
            body = labels == class_map.body_index
        else:  # the same derivation as prepare --body_class, on the scored grid
            body = add_body_class(labels.astype(np.uint8), real, 255) == 255
        body_error = float(np.median(fake[body]) - np.median(real[body])) if body.sum() >= min_voxels else float("nan")
        within = [abs(v["error"]) <= ORGAN_TOLERANCE_HU for v in organs.values()]
        iqr_errors = [abs(v["generated_iqr"] - v["real_iqr"]) for v in organs.values()]
        out[item["case_id"]] = {
            "organs": organs, "organ_pass_fraction": round(float(np.mean(within)), 3) if within else float("nan"),
            "organ_iqr_error": round(float(np.median(iqr_errors)), 1) if iqr_errors else float("nan"),
            "body_real": round(float(np.median(real[body])), 1) if body.any() else None,
            "body_error": round(body_error, 1),
        }
    return out


def paint_class_medians(train_list: Path, held_list: Path, out: Path) -> Path:
    """The ``paint`` baseline: each held-out case's mask painted with the training set's per-class median HU.

    Args:
        train_list: the generator's training datalist (its ``training`` cases give the class medians).
        held_list: the held-out datalist (its ``validation`` cases are painted).
        out: folder receiving ``<case_id>/ct.nii.gz`` (the layout ``score`` reads).

    Returns:
        ``out``.
    """
    values: dict[int, list[np.ndarray]] = {}
    for item in json.loads(train_list.read_text())["training"]:
        image = np.asarray(nib.load(str(train_list.parent / item["image"])).dataobj, dtype=np.float32)
        labels = on_grid(np.asarray(nib.load(str(train_list.parent / item["label"])).dataobj), image.shape)
        for c in np.unique(labels):
            values.setdefault(int(c), []).append(image[labels == c])
    medians = {c: float(np.median(np.concatenate(parts))) for c, parts in values.items()}
    for item in json.loads(held_list.read_text())["validation"]:
        image = nib.load(str(held_list.parent / item["image"]))
        labels = on_grid(np.asarray(nib.load(str(held_list.parent / item["label"])).dataobj), image.shape)
        painted = np.full(image.shape, medians[0], dtype=np.float32)  # a class the training never saw: background's level
        for c in np.unique(labels):
            painted[labels == c] = medians.get(int(c), medians[0])
        (out / item["case_id"]).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(painted, image.affine), str(out / item["case_id"] / "ct.nii.gz"))
    return out


def write_previews(
    folder: Path, work_dir: Path, runs: list[tuple[str, str]], seed: int, cases: tuple[str, ...],
) -> list[Path]:
    """Per held-out case, a PNG: the real CT, then per (class map, recipe) run its mask and generated CT."""
    from PIL import Image

    from ae_ablation import labelled_rows
    from custom_components.data.preview import render_preview
    from custom_components.data.writers import save_preview

    written = []
    for case in cases:
        rows: list[tuple[str, Image.Image]] = []
        for index, (map_name, recipe) in enumerate(runs):
            held = work_dir / map_name / "held_out"
            item = next(i for i in json.loads((held / "datalist.json").read_text())["validation"] if i["case_id"] == case)
            image = nib.load(str(held / item["image"]))
            spacing = tuple(float(v) for v in image.header.get_zooms()[:3])
            labels = np.asarray(nib.load(str(held / item["label"])).dataobj)
            z0, z1 = item["scored_z"]
            real = np.asarray(image.dataobj, dtype=np.float32)[..., z0:z1]
            generated = run_folder(work_dir, map_name, recipe, seed) / "generated" / case / "ct.nii.gz"
            fake = np.asarray(nib.load(str(generated)).dataobj, dtype=np.float32)[..., z0:z1]
            grid_labels = on_grid(labels, image.shape)[..., z0:z1]
            num_classes = int(labels.max()) + 1
            if index == 0:
                rows.append(("real CT", render_preview(real, None, num_classes, spacing=spacing, height=160)))
            rows.append((f"{map_name} map: mask", render_preview(real, grid_labels, num_classes, spacing=spacing, height=160, alpha=0.6)))
            rows.append((f"{map_name}, {recipe}", render_preview(fake, None, num_classes, spacing=spacing, height=160)))
        written.append(save_preview(labelled_rows(rows, label_width=170), folder / f"mask_to_ct_{case}.png"))
    return written


def summarise(per_seed: dict[int, dict[str, dict[str, object]]]) -> dict[str, object]:
    cases = sorted({case for seed in per_seed.values() for case in seed})
    summary: dict[str, object] = {}
    for case in cases:
        fractions = [per_seed[s][case]["organ_pass_fraction"] for s in per_seed]
        body = [abs(per_seed[s][case]["body_error"]) for s in per_seed]
        iqr = [per_seed[s][case].get("organ_iqr_error", float("nan")) for s in per_seed]
        summary[case] = {
            "organ_pass_fraction": {"median": float(np.median(fractions)), "min": float(np.min(fractions)), "max": float(np.max(fractions))},
            "abs_body_error_hu": {"median": float(np.median(body)), "min": float(np.min(body)), "max": float(np.max(body))},
            "organ_iqr_error_hu": {"median": float(np.median(iqr)), "min": float(np.min(iqr)), "max": float(np.max(iqr))},
        }
    return summary


def markdown(results: dict[str, object]) -> str:
    lines = [
        "| class map, model | held-out case | organs within ±50 HU (median [min, max] over seeds) | abs. error, unlabelled body tissue (HU) | organ IQR error (HU, median over organs) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for map_name, entry in results["maps"].items():
        for case, values in entry["summary"].items():
            f, b = values["organ_pass_fraction"], values["abs_body_error_hu"]
            q = values.get("organ_iqr_error_hu")
            iqr = f"{q['median']:.0f} [{q['min']:.0f}, {q['max']:.0f}]" if q else "—"
            lines.append(f"| {map_name} | {case} | {f['median']:.2f} [{f['min']:.2f}, {f['max']:.2f}] | "
                         f"{b['median']:.0f} [{b['min']:.0f}, {b['max']:.0f}] | {iqr} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/mask_to_ct"))
    parser.add_argument("--autoencoder_path", type=Path, help="an autoencoder trained on images only (mask_input false)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--maps", default="body,plain", help="comma-separated subset of: " + ", ".join(MAPS))
    parser.add_argument("--prediction_types", default="epsilon,v_prediction",
                        help="comma-separated: what the generator predicts (the bundle's prediction_type key), one run per type")
    parser.add_argument("--mask_encodings", default=DEFAULT_MASK_ENCODING,
                        help="comma-separated subset of " + ", ".join(MASK_ENCODINGS)
                             + ": how the mask reaches the latent grid (the bundle's mask_encoding key), one run per encoding")
    parser.add_argument("--max_epochs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min_voxels", type=int, default=20, help="smallest class (CT voxels) that is scored")
    parser.add_argument("--held_out_ct", type=Path, default=SHARED_EXAMPLE / "ct_small.nii.gz")
    parser.add_argument("--held_out_seg", type=Path, default=SHARED_EXAMPLE / "seg_small_total_v2.nii.gz")
    parser.add_argument("--held_out_slices", help="FIRST,STOP: hold out these slices of the example CT instead of ct_small (e.g. 52,82)")
    parser.add_argument("--previews", type=Path, help="also write PNGs of two held-out cases (real, mask, generated per map, first seed) here")
    parser.add_argument(
        "--shipped", action="store_true",
        help="score the repository's demo weights (bundles/guidegen_{ldm,autoencoder}/models/model.pt) instead of training: "
             "--seeds are then sampling seeds, the class map is the generator's, --autoencoder_path is not taken",
    )  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="print <work_dir>/results.json as a table and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads((args.work_dir / "results.json").read_text())))
        return
    if args.shipped:
        if args.autoencoder_path is not None:
            parser.error("--shipped scores the shipped latent generator with the shipped autoencoder it was trained on: drop --autoencoder_path")
        trained_only = [f"--{name}" for name in ("maps", "prediction_types", "mask_encodings", "max_epochs")
                        if getattr(args, name) != parser.get_default(name)]
        if trained_only:
            parser.error(f"--shipped trains nothing, so {', '.join(trained_only)} would be ignored: drop them (the class map, "
                         "prediction type and mask encoding are the shipped generator's)")
        from custom_components.networks.checkpoints import read_checkpoint_info

        args.autoencoder_path = SHIPPED_AUTOENCODER
        args.maps = "body" if read_checkpoint_info(SHIPPED_GENERATOR, stage="ldm")["num_classes"] == 21 else "plain"
    maps = [m.strip() for m in args.maps.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    predictions = [p.strip() for p in args.prediction_types.split(",") if p.strip()]
    if [m for m in maps if m not in MAPS] or not seeds or args.max_epochs < 1 or args.threads < 1 or args.steps < 1:
        parser.error(f"--maps from {MAPS}, >= 1 seed, --max_epochs/--threads/--steps >= 1")
    if not predictions or [p for p in predictions if p not in PREDICTION_TYPES]:
        parser.error(f"--prediction_types {args.prediction_types!r}: a comma-separated subset of {PREDICTION_TYPES}")
    encodings = [e.strip() for e in args.mask_encodings.split(",") if e.strip()]
    if not encodings or [e for e in encodings if e not in MASK_ENCODINGS]:
        parser.error(f"--mask_encodings {args.mask_encodings!r}: a comma-separated subset of {MASK_ENCODINGS}")
    if args.autoencoder_path is None or not args.autoencoder_path.is_file():
        parser.error(f"--autoencoder_path {args.autoencoder_path}: not a file (train one with bench/ae_ablation.py or scripts/train_demo.sh)")
    check_held_out_arguments(parser, args)
    args.work_dir = args.work_dir.resolve()
    held_out = HeldOut(args.work_dir, args.held_out_ct, args.held_out_seg, args.held_out_slices)
    args.autoencoder_path = args.autoencoder_path.resolve()
    results_path = args.work_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"maps": {}}
    recipes = [(p, e) for p in predictions for e in encodings]
    runs = [(map_name, ("shipped", "")) for map_name in maps] if args.shipped else [(m, r) for m in maps for r in recipes]
    data = {map_name: build_data(args.work_dir, map_name, held_out) for map_name in maps}
    for map_name, (train_list, held_list) in data.items():  # the trivial baseline, once per map (no seed: it does not learn)
        painted = paint_class_medians(train_list, held_list, args.work_dir / map_name / "paint")
        per_case = score(held_list, painted, args.min_voxels)
        results["maps"][f"{map_name}, paint (baseline)"] = {"per_seed": {"-": per_case}, "summary": summarise({"-": per_case})}
    for map_name, (prediction, encoding) in runs:
        train_list, held_list = data[map_name]
        recipe = "shipped" if args.shipped else variant(prediction, encoding)
        per_seed = {}
        for seed in seeds:
            if args.shipped:  # one model, sampled with each seed
                folder, seconds = run_folder(args.work_dir, map_name, recipe, seed), float("nan")
                generated = generate(folder, SHIPPED_GENERATOR, SHIPPED_AUTOENCODER, seed, args, held_list)
            else:
                generated, seconds = train_and_generate(map_name, prediction, encoding, seed, args, train_list, held_list)
            per_seed[seed] = score(held_list, generated, args.min_voxels)
            print(f"[mask_to_ct] {map_name} {recipe} seed {seed} ({seconds:.0f} s): "
                  + json.dumps({c: (v["organ_pass_fraction"], v["body_error"]) for c, v in per_seed[seed].items()}), file=sys.stderr, flush=True)
        results["maps"][f"{map_name}, {recipe}"] = {"per_seed": per_seed, "summary": summarise(per_seed)}
        results.update({"max_epochs": args.max_epochs, "steps": args.steps, "seeds": seeds,
                        "autoencoder": str(args.autoencoder_path), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
        results_path.write_text(json.dumps(results, indent=1))
    if args.previews is not None:
        recipe_runs = [(m, "shipped" if args.shipped else variant(*r)) for m, r in runs]
        for path in write_previews(args.previews, args.work_dir, recipe_runs, seeds[0], (held_out.case_id, "heldout_phantom_000")):
            print(f"[mask_to_ct] preview {path}", file=sys.stderr)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
