"""The ``guidegen`` command line (built with python-fire).

Each command is a plain function whose docstring is its ``--help``. Bad input ends the command with a
one-paragraph message on stderr and exit status 2 instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import fire

from custom_components.errors import GuideGenInputError

__all__ = ["prepare", "demo_data", "package", "main"]


def prepare(
    *,
    images_dir: str,
    segmentations_dir: str,
    records: str,
    output_dir: str,
    tumors_dir: str | None = None,
    class_map: str | None = None,
    ts_version: str = "auto",
    mask_size: Any = 128,
    image_size: Any = 256,
    body_threshold_hu: float = -500.0,
    margin_mm: float = 10.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Turn CTs + TotalSegmentator labels + tumor masks + clinical records into a GuideGen training set.

    Writes OUTPUT_DIR/images/<id>.nii.gz (CT, int16 HU), labels/<id>.nii.gz (uint8 class indices),
    previews/<id>.png (three views with the labels overlaid), cases/<id>.json (record, prompt, provenance, voxel counts), class_map.json and datalist.json (MONAI
    datalist with "training"/"validation" lists of {image, label, text, record}). Volumes are reoriented to
    RAS, cropped to the torso and resized; affines keep the true spacing. Cases whose outputs are up to date
    are skipped, so re-running after an interruption continues where it stopped. A bad case is reported and
    left out; the others are still written. Exit status 1 if any case failed, 2 on bad options.

    Args:
        images_dir: folder of CT files <case_id>.nii.gz (or .nii, or nnU-Net style <case_id>_0000.nii.gz).
        segmentations_dir: per case either a multi-label file <case_id>.nii.gz or a folder <case_id>/ of
            one file per structure (<structure>.nii.gz, TotalSegmentator's default output).
        records: CSV or JSON with one record per case: case_id (required), age, sex, race, diagnosis,
            tumor_organ, tumor_count, tumor_size_mm, stage, remarks. Turned into the prompt "The patient is
            {demographics}. In this imaging, the patient's condition is described as {clinical information}".
        output_dir: where the prepared data set is written (created if needed).
        tumors_dir: optional folder of tumor masks <case_id>.nii.gz (non-zero = tumor), painted over the organs
            with the class map's tumor class. Cases without a file get no tumor label.
        class_map: class map JSON; default: GuideGen's 20 classes (background, 18 organs, tumor).
        ts_version: TotalSegmentator labelling of the segmentations: auto (from the header label table, the
            structure file names, or label values when unambiguous), v1 or v2.
        mask_size: label volume size: one number (128) or three (128,128,96); "none" keeps the cropped grid.
            Paper: 128.
        image_size: CT size, same forms as mask_size. Paper: 256.
        body_threshold_hu: HU above which a voxel counts as body when finding the torso outline.
        margin_mm: margin around the torso crop, in mm.
        val_fraction: share of cases put in the validation list (deterministic, seeded).
        seed: seed of the training/validation split.
        overwrite: redo every case even if its outputs are up to date.

    Returns:
        the path of the datalist written.
    """
    from custom_components.data.prepare import PrepareSettings, prepare_dataset

    settings = PrepareSettings(
        mask_size=mask_size,
        image_size=image_size,
        body_threshold_hu=float(body_threshold_hu),
        margin_mm=float(margin_mm),
        ts_version=str(ts_version),
        val_fraction=float(val_fraction),
        seed=int(seed),
    )
    report = prepare_dataset(
        images_dir, segmentations_dir, records, output_dir, tumors_dir, class_map, settings, overwrite=overwrite
    )
    print(f"prepared {len(report.prepared)}, up to date {len(report.skipped)}, failed {len(report.failed)}", file=sys.stderr)
    for case_id, reason in report.failed.items():
        print(f"  FAILED {case_id}: {reason}", file=sys.stderr)
    if report.failed:
        print(f"datalist (without the failed cases): {report.datalist}", file=sys.stderr)
        sys.exit(1)
    return str(report.datalist)


def demo_data(
    *,
    output_dir: str = "demo",
    num_phantoms: int = 8,
    mask_size: Any = 32,
    image_size: Any = 64,
    include_example_ct: bool = True,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Build the demo data set: procedural torso phantoms plus the real TotalSegmentator example CT.

    Phantoms are generated with organ-specific HU and texture and with tumors in the organ their record
    names; they are written as raw CT + TotalSegmentator-v1 segmentation + tumor mask + records under
    OUTPUT_DIR/raw/, then run through `guidegen prepare` like real data, together with the real abdominal
    example CT (3 mm, TotalSegmentator v1 labels) shipped in the package. Small default sizes let every
    stage train on 2 CPU cores; use --mask_size 128 --image_size 256 for the paper's sizes. Re-running
    skips what is already there. The phantoms are not anatomically faithful: they exist to exercise the
    pipeline, not to train a clinically useful model.

    Args:
        output_dir: where the data set is written (datalist at OUTPUT_DIR/datalist.json).
        num_phantoms: number of phantom cases.
        mask_size: label volume size, one number or three (e.g. 32 or 32,32,40). Paper: 128.
        image_size: CT size, one number or three. Paper: 256.
        include_example_ct: also prepare the real TotalSegmentator example CT.
        val_fraction: share of cases in the validation list.
        seed: seed of the phantoms, their records and the split.
        overwrite: regenerate and re-prepare everything.

    Returns:
        the path of the datalist written.
    """
    from custom_components.data.demo import build_demo_dataset

    datalist = build_demo_dataset(
        output_dir,
        num_phantoms=int(num_phantoms),
        mask_size=mask_size,
        image_size=image_size,
        include_example_ct=bool(include_example_ct),
        val_fraction=float(val_fraction),
        seed=int(seed),
        overwrite=bool(overwrite),
    )
    print(f"demo data set ready: {datalist}", file=sys.stderr)
    return str(datalist)


def package(*, output_dir: str = "dist", bundles: Any = "all") -> list[str]:
    """Zip bundles the way the MONAI model zoo distributes them: OUTPUT_DIR/<name>_v<version>.zip, each holding one
    top-level folder <name>/ (configs, docs, LICENSE, and models/model.pt when trained; resumable checkpoints and
    run outputs are left out). Install one elsewhere with
    `python -m monai.bundle download --name <name> --url file://<absolute path of the zip> --bundle_dir <dir>`.

    Args:
        output_dir: where the archives go.
        bundles: "all" or bundle names, e.g. guidegen_tcss,guidegen_ldm.

    Returns:
        the archives written.
    """
    from custom_components.packaging import BUNDLE_NAMES, package_bundles

    if bundles == "all":
        names = list(BUNDLE_NAMES)
    else:
        names = [b.strip() for b in (bundles.split(",") if isinstance(bundles, str) else bundles) if str(b).strip()]
    archives = [str(path) for path in package_bundles(output_dir, names)]
    for archive in archives:
        print(f"wrote {archive}", file=sys.stderr)
    return archives


COMMANDS = {"prepare": prepare, "demo-data": demo_data, "package": package}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``guidegen`` console script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire(COMMANDS, command=argv, name="guidegen")
    except GuideGenInputError as err:
        print(f"guidegen: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
