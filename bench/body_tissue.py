"""Where the unlabelled body tissue lies, what HU it has, and what the latent grid sees of the mask (issue 14).

Two reports on prepared data sets with a body class (``guidegen prepare --body_class``, or ``bench/mask_to_ct.py``'s
``body`` map):

- **body tissue by distance**: median HU of the body-class voxels in bins of distance (CT voxels) to the outside air
  and to the nearest organ (any class other than background and body), for the real CT of every case in the given
  datalists and, with ``--runs``, for the CTs generated from their masks (``<run>/generated/<case_id>/ct.nii.gz``,
  as ``bench/mask_to_ct.py`` writes them). A case's ``scored_z`` range (``mask_to_ct.py``'s held-out slab) limits
  the voxels scored.
- **latent grid** (``--mask_factor``): of the latent voxels whose ``k³`` block of mask voxels holds anything but
  background, the share holding more than one class, and the shares whose subsampled label (the ``onehot`` mask
  encoding keeps the block's first voxel) is a minority class of the block or ties for the majority: what the
  ``fractions`` encoding keeps and ``onehot`` loses.

Usage (the mid-slab runs of BENCHMARKS.md, "Mask as class fractions on the latent grid"):
    .venv/bin/python bench/body_tissue.py --datalists /tmp/m2c_mid/body/held_out/datalist.json,/tmp/m2c_mid/body/train_data/datalist.json \\
        --runs /tmp/m2c_mid/body/v_prediction/seed2,/tmp/m2c_mid/body/v_prediction_fractions/seed0 --mask_factor 2

Prints one JSON object per case and run, then the markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ldm_alignment import on_grid  # bench/ is on sys.path when this file runs

AIR_MARGIN = 2.0
"""Body voxels at most this far (CT voxels) from the outside air form the skin/subcutaneous bin."""
ORGAN_BINS = ((0.0, 2.0), (2.0, 4.0), (4.0, 8.0))
"""Distance bins (CT voxels, (low, high]) to the nearest organ, for body voxels farther than AIR_MARGIN from the air."""
BIN_NAMES = ("≤ 2 from the air", "> 2 from the air, ≤ 2 from an organ", "2–4 from an organ", "4–8 from an organ", "all")


def distance_bins(labels: np.ndarray, body_index: int) -> list[np.ndarray]:
    """Boolean masks of the body-class voxels per bin of :data:`BIN_NAMES` (the last: every body voxel).

    Args:
        labels: class indices on the CT grid.
        body_index: the class map's body class.

    Returns:
        One mask per bin, each the shape of ``labels``.
    """
    body = labels == body_index
    organ = (labels != 0) & ~body
    to_organ = ndimage.distance_transform_edt(~organ) if organ.any() else np.full(labels.shape, np.inf)
    to_air = ndimage.distance_transform_edt(labels != 0)
    inner = body & (to_air > AIR_MARGIN)
    bins = [body & (to_air <= AIR_MARGIN)]
    bins += [inner & (to_organ > low) & (to_organ <= high) for low, high in ORGAN_BINS]
    return [*bins, body]


def latent_grid_mixing(mask: np.ndarray, factor: int) -> dict[str, float]:
    """How many latent voxels cover more than one class, and how often subsampling keeps a minority class.

    Args:
        mask: class indices on the mask grid (each size divisible by ``factor``).
        factor: mask voxels per latent voxel along each axis (the latent generator's ``mask_factor``).

    Returns:
        ``latent_voxels`` (those whose block holds anything but background), ``mixed`` (share with > 1 class),
        ``subsample_minority`` (share whose first block voxel, the ``onehot`` encoding's, has a class with fewer
        voxels in the block than its most frequent class) and ``subsample_tied`` (share where that class ties with
        another for the most voxels).
    """
    if any(s % factor for s in mask.shape):
        raise ValueError(f"mask shape {mask.shape} is not divisible by the mask factor {factor}")
    blocks = mask.reshape(mask.shape[0] // factor, factor, mask.shape[1] // factor, factor, mask.shape[2] // factor, factor)
    blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, factor**3)
    blocks = blocks[(blocks != 0).any(axis=1)]
    if not len(blocks):
        return {"latent_voxels": 0, "mixed": float("nan"), "subsample_minority": float("nan"), "subsample_tied": float("nan")}
    counts = np.stack([(blocks == c).sum(axis=1) for c in range(int(mask.max()) + 1)], axis=1)
    most = counts.max(axis=1)
    mixed = (counts > 0).sum(axis=1) > 1
    kept_count = counts[np.arange(len(blocks)), blocks[:, 0]]
    tied = (kept_count == most) & ((counts == most[:, None]).sum(axis=1) > 1)
    return {"latent_voxels": int(len(blocks)), "mixed": round(float(mixed.mean()), 3),
            "subsample_minority": round(float((kept_count < most).mean()), 3), "subsample_tied": round(float(tied.mean()), 3)}


def load_cases(datalist: Path) -> tuple[list[dict], int]:
    """Every case of a prepared datalist (training and validation) with absolute paths, and its body class."""
    from custom_components.data.class_map import load_class_map

    data = json.loads(datalist.read_text())
    class_map = load_class_map(datalist.parent / data.get("class_map", "class_map.json"))
    if class_map.body_index is None:
        raise SystemExit(f"{datalist}: its class map has no body class; prepare the data with --body_class")
    cases = []
    for item in [*data.get("training", []), *data.get("validation", [])]:
        cases.append({**item, "image": datalist.parent / item["image"], "label": datalist.parent / item["label"]})
    return cases, class_map.body_index


def medians(ct: np.ndarray, bins: list[np.ndarray]) -> list[float | None]:
    return [round(float(np.median(ct[b])), 1) if b.any() else None for b in bins]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalists", required=True, help="comma-separated prepared datalists with a body class")
    parser.add_argument("--runs", default="", help="comma-separated folders holding generated/<case_id>/ct.nii.gz")
    parser.add_argument("--mask_factor", type=int, default=2, help="mask voxels per latent voxel per axis (0: skip)")
    args = parser.parse_args()
    datalists = [Path(p) for p in args.datalists.split(",") if p]
    runs = [Path(p) for p in args.runs.split(",") if p]
    for path in [*datalists, *runs]:
        if not path.exists():
            parser.error(f"{path} does not exist")
    if args.mask_factor < 0:
        parser.error("--mask_factor must be >= 0")

    rows: list[tuple[str, list[float | None]]] = []
    grid_rows: list[tuple[str, dict[str, float]]] = []
    for datalist in datalists:
        cases, body_index = load_cases(datalist)
        for item in cases:
            mask = np.asarray(nib.load(str(item["label"])).dataobj).astype(np.int64)
            real = np.asarray(nib.load(str(item["image"])).dataobj, dtype=np.float32)
            labels = on_grid(mask, real.shape)
            z0, z1 = item.get("scored_z", (0, real.shape[2]))
            bins = [b[..., z0:z1] for b in distance_bins(labels, body_index)]
            real = real[..., z0:z1]
            rows.append((f"{item['case_id']}, real", medians(real, bins)))
            print(json.dumps({"case": item["case_id"], "source": "real", "medians": dict(zip(BIN_NAMES, rows[-1][1])),
                              "voxels": [int(b.sum()) for b in bins]}))
            if args.mask_factor:
                mz0, mz1 = item.get("scored_mask_z", (0, mask.shape[2]))
                grid = latent_grid_mixing(mask[..., mz0:mz1], args.mask_factor)
                grid_rows.append((item["case_id"], grid))
                print(json.dumps({"case": item["case_id"], "latent_grid": grid}))
            for run in runs:
                generated = run / "generated" / item["case_id"] / "ct.nii.gz"
                if not generated.is_file():
                    continue
                fake = np.asarray(nib.load(str(generated)).dataobj, dtype=np.float32)[..., z0:z1]
                if fake.shape != real.shape:
                    raise SystemExit(f"{generated}: shape {fake.shape} differs from the real CT's {real.shape}")
                rows.append((f"{item['case_id']}, generated ({run})", medians(fake, bins)))
                print(json.dumps({"case": item["case_id"], "source": str(run), "medians": dict(zip(BIN_NAMES, rows[-1][1]))}))

    print("\n| body-class voxels, median HU | " + " | ".join(BIN_NAMES) + " |")
    print("| --- " * (len(BIN_NAMES) + 1) + "|")
    for name, values in rows:
        print(f"| {name} | " + " | ".join("—" if v is None else f"{v:.0f}" for v in values) + " |")
    if grid_rows:
        print("\n| case | latent voxels (not all background) | mixed (> 1 class) | subsampled class a minority | tied |")
        print("| --- | --- | --- | --- | --- |")
        for name, grid in grid_rows:
            print(f"| {name} | {grid['latent_voxels']} | {grid['mixed']:.0%} | {grid['subsample_minority']:.0%} "
                  f"| {grid['subsample_tied']:.0%} |")


if __name__ == "__main__":
    main()
