"""Writing generated pairs to disk: one folder per sample, atomically, resumable, reproducible.

Layout of a run folder::

    <output_dir>/manifest.json            versions, model files' SHA-256, settings, every sample's prompt and seed
    <output_dir>/<sample_id>/ct.nii.gz     CT in HU, int16, on the mask's field of view
                             mask.nii.gz   the mask on the CT's grid (same shape and affine as ct.nii.gz)
                             mask_native.nii.gz  the mask on the generator's grid (what the CT was conditioned on)
                             prompt.txt, record.json, preview.png (CT with the mask overlaid, three views)

``prompt.txt`` holds the prompt the models were given; ``record.json`` holds it too, with the record behind it and,
for a free-text prompt rewritten into the training template, the text as given (``given_prompt``).

A sample is written into ``<output_dir>/.partial/<sample_id>/`` and renamed into place when complete, so a sample
folder either holds every file or does not exist. Sample ``k`` is seeded with ``seed + k`` and does not depend on the
other samples: rerunning an interrupted run skips the finished folders and produces the rest exactly as an
uninterrupted run would have, and any number of processes can split the samples between them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from custom_components.data.io import load_nifti, read_volume, save_nifti, write_json
from custom_components.data.preview import render_preview, save_preview
from custom_components.data.requests import GenerationRequest
from custom_components.errors import GuideGenInputError

__all__ = [
    "SAMPLE_FILES",
    "GenerationSettings",
    "PlannedSample",
    "check_writable",
    "finish_run",
    "generate_samples",
    "is_finished",
    "read_given_mask",
    "run_generation",
    "plan_samples",
    "run_manifest",
    "start_run",
]

SAMPLE_FILES = ("ct.nii.gz", "mask.nii.gz", "mask_native.nii.gz", "prompt.txt", "record.json", "preview.png")
_PARTIAL = ".partial"
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the prompts and the models that decides what a run produces.

    Args:
        num_samples: samples per prompt.
        seed: base seed; sample ``k`` of the run uses ``seed + k``.
        tcss_steps: stage 1 reverse steps.
        ldm_steps: stage III DDIM steps.
        guidance_scale: stage III classifier-free guidance scale.
        mask_file: a given mask (mask-conditioned mode; stage 1 skipped), or None.
    """

    num_samples: int = 1
    seed: int = 0
    tcss_steps: int = 50
    ldm_steps: int = 50
    guidance_scale: float = 1.0
    mask_file: str | None = None

    def __post_init__(self) -> None:
        if int(self.num_samples) < 1:
            raise GuideGenInputError(f"--num_samples {self.num_samples}: generate at least one sample per prompt")
        for name in ("tcss_steps", "ldm_steps"):
            if int(getattr(self, name)) < 1:
                raise GuideGenInputError(f"--{name} {getattr(self, name)}: at least one step is needed")


@dataclass(frozen=True)
class PlannedSample:
    """One sample of a run: which prompt, which seed, which folder."""

    index: int
    sample_id: str
    request: GenerationRequest
    seed: int


def plan_samples(requests: Sequence[GenerationRequest], settings: GenerationSettings) -> list[PlannedSample]:
    """Every sample of a run in a fixed order: prompt by prompt, ``num_samples`` each; ids ``sample_00000`` ..."""
    plan = []
    for request_index, request in enumerate(requests):
        for repeat in range(int(settings.num_samples)):
            index = request_index * int(settings.num_samples) + repeat
            plan.append(PlannedSample(index, f"sample_{index:05d}", request, int(settings.seed) + index))
    return plan


def check_writable(output_dir: str | os.PathLike) -> Path:
    """Refuse an output folder that cannot be written, before any work (and without creating anything).

    Raises:
        GuideGenInputError: the folder (or the nearest existing parent) is not a writable directory.
    """
    output_dir = Path(output_dir).absolute()
    existing = output_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise GuideGenInputError(f"--output_dir {output_dir}: {existing} is a file, not a folder; choose another --output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GuideGenInputError(f"--output_dir {output_dir}: {existing} is not writable; choose a folder you can write to")
    return output_dir


def run_manifest(
    plan: Sequence[PlannedSample], settings: GenerationSettings, model_files: Mapping[str, str], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The run's manifest: versions, the models' SHA-256, settings and every sample's prompt and seed.

    It holds no timestamps, so the same run writes the same manifest.
    """
    import monai
    import torch
    import transformers

    from custom_components import __version__
    from custom_components.data.latent_cache import file_sha256

    return {
        "guidegen_version": __version__,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "nibabel": nib.__version__},
        "models": {stage: {"path": path, "sha256": file_sha256(path)} for stage, path in sorted(model_files.items())},
        "settings": {**settings.__dict__, **({"mask_file_sha256": file_sha256(settings.mask_file)} if settings.mask_file else {})},
        **dict(extra or {}),
        "samples": [
            {"sample_id": s.sample_id, "seed": s.seed, "prompt": s.request.prompt, "source": s.request.source,
             # only for rewritten free text, so that the manifests of template prompts stay as they were
             **({"given_prompt": s.request.given_prompt} if s.request.given_prompt is not None else {})}
            for s in plan
        ],
    }


def _comparable(manifest: Mapping[str, Any]) -> dict[str, Any]:
    # paths may differ between machines; what decides the output is the models' content, the settings and the plan
    return {"models": {k: v.get("sha256") for k, v in manifest.get("models", {}).items()},
            "settings": manifest.get("settings"), "samples": manifest.get("samples")}


def start_run(output_dir: str | os.PathLike, manifest: Mapping[str, Any], overwrite: bool = False) -> None:
    """Create the run folder and its manifest, or check that an existing one belongs to the same run.

    Args:
        output_dir: the run folder.
        manifest: see :func:`run_manifest`.
        overwrite: remove an earlier run with other settings instead of refusing.

    Raises:
        GuideGenInputError: the folder holds another run (other models, settings or prompts) and not ``overwrite``.
    """
    output_dir = Path(output_dir)
    path = output_dir / _MANIFEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = {}
        if _comparable(previous) != _comparable(manifest):
            if not overwrite:
                raise GuideGenInputError(
                    f"{output_dir} holds a run with other models, settings or prompts ({path}); choose another "
                    "--output_dir, or pass --overwrite true to replace it"
                )
            for sample in previous.get("samples", []):
                shutil.rmtree(output_dir / str(sample.get("sample_id")), ignore_errors=True)
    elif overwrite and output_dir.is_dir():
        for folder in output_dir.glob("sample_*"):
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(output_dir / _PARTIAL, ignore_errors=True)
    write_json(manifest, path)


def read_given_mask(path: str | os.PathLike, pipeline: Any) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask for mask-conditioned generation and check it fits the models.

    Returns:
        the mask (int64 class indices) and its affine.

    Raises:
        GuideGenInputError: unreadable, not 3D, the wrong size, or labels outside the class map.
    """
    image = load_nifti(path, "--mask")
    mask = read_volume(image, f"--mask {path}", dtype=np.int64)
    pipeline.check_mask(mask, f"--mask {path}")
    return mask, np.asarray(image.affine, dtype=np.float64)


def _write_sample(pair: Any, sample: PlannedSample, settings: GenerationSettings, num_classes: int, folder: Path) -> None:
    ct = np.clip(np.rint(pair.ct), -32768, 32767)
    mask_ct = pair.mask_on_ct_grid()
    save_nifti(ct, pair.ct_affine, folder / "ct.nii.gz", np.int16)
    save_nifti(mask_ct, pair.ct_affine, folder / "mask.nii.gz", np.uint8)
    save_nifti(pair.mask, pair.mask_affine, folder / "mask_native.nii.gz", np.uint8)
    (folder / "prompt.txt").write_text(sample.request.prompt + "\n", encoding="utf-8")
    ct_spacing = [float(v) for v in nib.affines.voxel_sizes(pair.ct_affine)]
    write_json(
        {
            "sample_id": sample.sample_id,
            "prompt": sample.request.prompt,
            "given_prompt": sample.request.given_prompt,
            "record": sample.request.record,
            "source": sample.request.source,
            "seed": sample.seed,
            "tcss_steps": None if settings.mask_file else int(settings.tcss_steps),
            "ldm_steps": int(settings.ldm_steps),
            "guidance_scale": float(settings.guidance_scale),
            "mask_from": settings.mask_file or "stage 1 (TCSS)",
            "mask_shape": list(pair.mask.shape),
            "mask_spacing_mm": [float(v) for v in nib.affines.voxel_sizes(pair.mask_affine)],
            "ct_shape": list(pair.ct.shape),
            "ct_spacing_mm": ct_spacing,
            "class_voxels": {str(c): int(n) for c, n in zip(*np.unique(pair.mask, return_counts=True))},
        },
        folder / "record.json",
    )
    save_preview(render_preview(pair.ct, mask_ct, num_classes, tuple(ct_spacing)), folder / "preview.png")


def is_finished(output_dir: str | os.PathLike, sample_id: str) -> bool:
    """A sample folder exists only once complete (it is renamed into place), but check its files anyway."""
    folder = Path(output_dir) / sample_id
    return all((folder / name).is_file() for name in SAMPLE_FILES)


def generate_samples(
    pipeline: Any,
    plan: Iterable[PlannedSample],
    output_dir: str | os.PathLike,
    settings: GenerationSettings,
    mask: np.ndarray | None = None,
    mask_affine: np.ndarray | None = None,
    progress: bool = True,
    description: str = "text -> pair",
) -> tuple[list[str], list[str]]:
    """Generate and write the planned samples that are not finished yet.

    Args:
        pipeline: a :class:`~custom_components.pipelines.text_to_pair.TextToPairPipeline`.
        plan: the samples to make (e.g. this process's share of :func:`plan_samples`).
        output_dir: the run folder (see :func:`start_run`).
        settings: the run's settings.
        mask, mask_affine: a given mask (already checked) for mask-conditioned runs.
        progress: progress bars.
        description: progress bar label.

    Returns:
        the sample ids generated now, and those skipped because they were already finished.
    """
    output_dir = Path(output_dir)
    made, skipped = [], []
    plan = list(plan)
    for sample in tqdm(plan, desc=description, unit="sample", disable=not progress):
        if is_finished(output_dir, sample.sample_id):
            skipped.append(sample.sample_id)
            continue
        pair = pipeline(sample.request.prompt, seed=sample.seed, tcss_steps=settings.tcss_steps, ldm_steps=settings.ldm_steps,
                        guidance_scale=settings.guidance_scale, mask=mask, mask_affine=mask_affine, progress=progress)
        partial = output_dir / _PARTIAL / sample.sample_id
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        _write_sample(pair, sample, settings, pipeline.num_classes, partial)
        final = output_dir / sample.sample_id
        shutil.rmtree(final, ignore_errors=True)  # an incomplete folder left by hand
        os.replace(partial, final)
        made.append(sample.sample_id)
    return made, skipped


def finish_run(output_dir: str | os.PathLike, plan: Sequence[PlannedSample]) -> None:
    """Check that every planned sample is on disk, and tidy up.

    Raises:
        GuideGenInputError: samples are missing (a worker failed); rerunning the same command completes them.
    """
    output_dir = Path(output_dir)
    missing = [s.sample_id for s in plan if not is_finished(output_dir, s.sample_id)]
    if missing:
        raise GuideGenInputError(
            f"{len(missing)} of {len(plan)} samples are missing in {output_dir} ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); run the same command again to complete them"
        )
    partial = output_dir / _PARTIAL
    if partial.is_dir() and not any(partial.iterdir()):
        partial.rmdir()


def run_generation(
    requests: tuple[Sequence[GenerationRequest], Sequence[str]] | Sequence[GenerationRequest],
    settings: GenerationSettings,
    output_dir: str | os.PathLike,
    load_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """A whole generation run: check the output folder, load the chain, write the manifest, generate, check.

    Every check that can fail on user input (output folder, model files, a given mask) runs before anything is
    written. Used by ``guidegen generate`` and by the meta-bundle's ``inference.yaml``.

    Args:
        requests: the requests, or ``(requests, broken-row messages)`` as :func:`~custom_components.data.requests.load_requests`
            returns them.
        settings: the run's settings (with ``mask_file`` for mask-conditioned runs).
        output_dir: the run folder.
        load_kwargs: passed to :func:`~custom_components.pipelines.text_to_pair.load_text_to_pair` (model files, device ...).
        overwrite: replace an earlier run with other settings.
        progress: progress bars.

    Returns:
        ``{"output_dir", "generated": [ids], "skipped": [ids already there], "broken_rows": [messages]}``.
    """
    from custom_components.pipelines.text_to_pair import load_text_to_pair

    problems: Sequence[str] = []
    if isinstance(requests, tuple) and len(requests) == 2 and isinstance(requests[1], list):
        requests, problems = requests
    if not requests:
        raise GuideGenInputError("no prompt to generate from; give at least one prompt")
    output = check_writable(output_dir)
    plan = plan_samples(list(requests), settings)
    kwargs = dict(load_kwargs or {})
    kwargs["with_tcss"] = settings.mask_file is None
    pipeline, model_files = load_text_to_pair(**kwargs)
    mask = mask_affine = None
    if settings.mask_file:
        mask, mask_affine = read_given_mask(settings.mask_file, pipeline)
    start_run(output, run_manifest(plan, settings, model_files, {"broken_rows": list(problems)}), overwrite=overwrite)
    made, skipped = generate_samples(pipeline, plan, output, settings, mask, mask_affine, progress=progress)
    finish_run(output, plan)
    return {"output_dir": str(output), "generated": made, "skipped": skipped, "broken_rows": list(problems)}
