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

A process makes a sample only while it holds the sample's claim, an exclusive ``flock`` on
``<output_dir>/.partial/<sample_id>.claim`` (the file names the process). Processes started separately into one folder
(two ``guidegen generate`` commands, ``synthesize`` workers) therefore share the samples instead of each making every
one: a process skips a sample another one is making, and at the end waits for those, making any whose maker stopped.
The operating system drops the claim of a process that dies, so no stale claim ever blocks a sample.

:func:`check_generation` checks everything about a run that can be wrong in the user's input (prompts, settings, step
counts against each model file's schedule, the output folder, model files, a given mask) before a network is built
or a byte written; :func:`run_generation` is that check followed by the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from custom_components.arguments import real_number, switch, whole_number, writable_folder
from custom_components.data.io import load_nifti, read_volume
from custom_components.data.writers import save_nifti, write_json, save_preview
from custom_components.data.preview import render_preview
from custom_components.data.requests import GenerationRequest
from custom_components.errors import GuideGenInputError
from custom_components.pipelines.text_to_pair import ChainSources

__all__ = [
    "SAMPLE_FILES",
    "GenerationRun",
    "GenerationSettings",
    "PlannedSample",
    "check_generation",
    "execute_generation",
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
        tcss_guidance_scale: stage 1 classifier-free guidance scale (beyond the paper; 1: none, > 1: the prompt's
            tumor fields weigh more); unused with ``mask_file``.
        mask_file: a given mask (mask-conditioned mode; stage 1 skipped), or None.
    """

    num_samples: int = 1
    seed: int = 0
    tcss_steps: int = 50
    ldm_steps: int = 50
    guidance_scale: float = 1.0
    tcss_guidance_scale: float = 1.0
    mask_file: str | None = None

    def __post_init__(self) -> None:
        # values arrive as fire or YAML gave them (text, floats): store checked numbers, refuse rather than round
        object.__setattr__(self, "num_samples", whole_number(self.num_samples, "num_samples", minimum=1))
        object.__setattr__(self, "seed", whole_number(self.seed, "seed", minimum=0))
        object.__setattr__(self, "tcss_steps", whole_number(self.tcss_steps, "tcss_steps", minimum=1))
        object.__setattr__(self, "ldm_steps", whole_number(self.ldm_steps, "ldm_steps", minimum=1))
        object.__setattr__(self, "guidance_scale", real_number(self.guidance_scale, "guidance_scale"))
        object.__setattr__(self, "tcss_guidance_scale",
                           real_number(self.tcss_guidance_scale, "tcss_guidance_scale", minimum=0.0))


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
    from custom_components.data.io import file_digest

    return {
        "guidegen_version": __version__,
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__, "nibabel": nib.__version__},
        "models": {stage: {"path": path, "sha256": file_digest(path)} for stage, path in sorted(model_files.items())},
        "settings": {**settings.__dict__, **({"mask_file_sha256": file_digest(settings.mask_file)} if settings.mask_file else {})},
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
            shutil.rmtree(output_dir / _PARTIAL, ignore_errors=True)
    elif overwrite and output_dir.is_dir():
        for folder in output_dir.glob("sample_*"):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(output_dir / _PARTIAL, ignore_errors=True)
    # .partial/ is otherwise left alone: another process of this run may be writing a sample there right now (each
    # sample's leftover from an interrupted run is replaced by whoever claims that sample next)
    write_json(manifest, path)


def read_given_mask(
    path: str | os.PathLike, mask_size: Sequence[int], num_classes: int, mask_factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read a mask for mask-conditioned generation and check it fits the models.

    Labels must be whole numbers, as ``guidegen prepare`` requires of a segmentation: a float mask with 0.5 steps
    would otherwise be truncated to other classes without a word.

    Args:
        path: the NIfTI file (``--mask``).
        mask_size, num_classes, mask_factor: what the latent generator was trained with
            (see :func:`~custom_components.pipelines.mask_to_ct.check_mask_fits`).

    Returns:
        the mask (int64 class indices) and its affine.

    Raises:
        GuideGenInputError: unreadable, not 3D, non-integer or non-finite labels, the wrong size, or labels outside the
            class map.
    """
    from custom_components.pipelines.mask_to_ct import check_mask_fits

    what = f"--mask {path}"
    image = load_nifti(path, "--mask")
    values = read_volume(image, what, dtype=np.float64, check_finite=True)
    mask = values.astype(np.int64)
    if not np.array_equal(mask, values):
        example = float(values[mask != values].flat[0])
        raise GuideGenInputError(
            f"{what}: holds non-integer values (e.g. {example:g}); a label map must hold whole numbers (class indices). "
            "Save it with an integer data type, resampled with nearest-neighbour interpolation"
        )
    check_mask_fits(mask, what, mask_size, num_classes, mask_factor)
    return mask, np.asarray(image.affine, dtype=np.float64)


@dataclass(frozen=True)
class GenerationRun:
    """A checked generation run, ready to start: nothing has been loaded or written for it yet.

    Attributes:
        requests: what to generate.
        problems: broken prompt-file rows left out (one message each).
        settings: the run's settings.
        output_dir: the run folder (absolute).
        chain: what the chain is loaded from and where it runs (``with_tcss`` set from the settings).
        plan: every sample of the run.
        mask, mask_affine: the given mask (already checked) of a mask-conditioned run, else None.
    """

    requests: list[GenerationRequest]
    problems: list[str]
    settings: GenerationSettings
    output_dir: Path
    chain: ChainSources
    plan: list[PlannedSample]
    mask: np.ndarray | None = field(default=None, repr=False)
    mask_affine: np.ndarray | None = field(default=None, repr=False)


def _check_step_counts(settings: GenerationSettings, infos: Mapping[str, Mapping[str, Any]], files: Mapping[str, str]) -> None:
    """Each diffusion stage's steps must fit the schedule its model file was trained with (the samplers stride it)."""
    for flag, stage in (("tcss_steps", "tcss"), ("ldm_steps", "ldm")):
        if stage not in infos:
            continue  # mask-conditioned runs skip stage 1
        steps, limit = int(getattr(settings, flag)), int(infos[stage]["num_train_timesteps"])
        if steps > limit:
            raise GuideGenInputError(
                f"--{flag} {steps}: {files[stage]} was trained with a {limit}-step schedule, so --{flag} must be in "
                f"1..{limit}; pass e.g. --{flag} 50 ({limit} runs every step)"
            )


def check_generation(
    requests: tuple[Sequence[GenerationRequest], Sequence[str]] | Sequence[GenerationRequest],
    settings: GenerationSettings,
    output_dir: str | os.PathLike,
    chain: ChainSources | None = None,
) -> GenerationRun:
    """Check a run's input before anything is built or written: what the user can get wrong is refused here.

    Checks the requests, the output folder, the class map, every model file (present, intact, of the right stage: its
    info entry is read, no network is built), the step counts against each model's training schedule and a given mask
    (readable, whole-number labels, size, classes).
    ``guidegen generate``, ``guidegen synthesize`` and the meta-bundle all start with this (the device, decode tile and
    text encoder folder were checked when their :class:`~custom_components.pipelines.text_to_pair.ChainSources` was made).

    Args:
        requests: the requests, or ``(requests, broken-row messages)`` as
            :func:`~custom_components.data.requests.load_requests` returns them.
        settings: the run's settings (checked when made).
        output_dir: the run folder (need not exist).
        chain: the model files, device ... (None: the bundles' demo weights on ``auto``).

    Returns:
        the checked run.

    Raises:
        GuideGenInputError: the first problem found, naming the option or file and the fix.
    """
    from custom_components.data.class_map import load_class_map
    from custom_components.networks.checkpoints import read_checkpoint_info

    problems: Sequence[str] = []
    if isinstance(requests, tuple) and len(requests) == 2 and isinstance(requests[1], list):
        requests, problems = requests
    if not requests:
        raise GuideGenInputError("no prompt to generate from; give at least one prompt")
    output = writable_folder(output_dir)
    chain = (chain if chain is not None else ChainSources()).replace(with_tcss=settings.mask_file is None)
    class_map = load_class_map(chain.class_map_path)
    files = chain.model_files()
    infos = {stage: read_checkpoint_info(path, stage=stage) for stage, path in files.items()}
    _check_step_counts(settings, infos, files)
    mask = mask_affine = None
    if settings.mask_file is not None:
        if not Path(settings.mask_file).is_file():
            raise GuideGenInputError(f"--mask {settings.mask_file} not found; pass a NIfTI label volume made with the models' class map")
        ldm_info = infos["ldm"]
        mask, mask_affine = read_given_mask(settings.mask_file, ldm_info["mask_size"], class_map.num_classes, int(ldm_info["mask_factor"]))
    return GenerationRun(list(requests), list(problems), settings, output, chain, plan_samples(list(requests), settings), mask, mask_affine)


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
            "tcss_guidance_scale": None if settings.mask_file else float(settings.tcss_guidance_scale),
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


@contextlib.contextmanager
def _claim(output_dir: Path, sample_id: str, wait: bool) -> Iterator[bool]:
    """Hold the claim of one sample (see the module docstring); yields False when another process holds it and not ``wait``.

    ``flock`` rather than an exclusive-create file: the operating system releases it when its process dies, so an
    interrupted run never leaves a claim that blocks the sample. The claim file is removed once the sample is
    finished, by whoever holds the claim then (a process that claimed the removed file finds the sample finished).
    """
    path = output_dir / _PARTIAL / f"{sample_id}.claim"
    for attempt in range(5):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
            break
        except FileNotFoundError:  # another process removed an empty .partial/ between mkdir and open
            if attempt == 4:
                raise
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())  # who is making it, for a person looking
        try:
            yield True
        finally:
            if is_finished(output_dir, sample_id):
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == os.fstat(descriptor).st_ino:  # not a newer claim file of the same sample
                        os.unlink(path)
    finally:
        os.close(descriptor)


def _make_sample(pipeline: Any, sample: PlannedSample, output_dir: Path, settings: GenerationSettings,
                 mask: np.ndarray | None, mask_affine: np.ndarray | None, progress: bool) -> None:
    """Generate one sample into ``.partial/<id>/`` and rename it into place (the caller holds its claim)."""
    pair = pipeline(sample.request.prompt, seed=sample.seed, tcss_steps=settings.tcss_steps, ldm_steps=settings.ldm_steps,
                    guidance_scale=settings.guidance_scale, tcss_guidance_scale=settings.tcss_guidance_scale, mask=mask,
                    mask_affine=mask_affine, progress=progress)
    partial = output_dir / _PARTIAL / sample.sample_id
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    partial.mkdir(parents=True)
    _write_sample(pair, sample, settings, pipeline.num_classes, partial)
    final = output_dir / sample.sample_id
    shutil.rmtree(final, ignore_errors=True)  # an incomplete folder left by hand
    os.replace(partial, final)


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
    """Generate and write the planned samples that are not finished yet, sharing them with other processes.

    A sample another process is making is skipped at first; once this process has made all it could, it waits for
    those and makes any whose process stopped without finishing it, so that all planned samples exist on return.

    Args:
        pipeline: a :class:`~custom_components.pipelines.text_to_pair.TextToPairPipeline`.
        plan: the samples to make (e.g. this process's share of :func:`plan_samples`).
        output_dir: the run folder (see :func:`start_run`).
        settings: the run's settings.
        mask, mask_affine: a given mask (already checked) for mask-conditioned runs.
        progress: progress bars.
        description: progress bar label.

    Returns:
        the sample ids generated by this process, and those it found made (earlier or by another process).
    """
    output_dir = Path(output_dir)
    made, skipped, busy = [], [], []
    for sample in tqdm(list(plan), desc=description, unit="sample", disable=not progress):
        if is_finished(output_dir, sample.sample_id):
            skipped.append(sample.sample_id)
            continue
        with _claim(output_dir, sample.sample_id, wait=False) as claimed:
            if not claimed:
                busy.append(sample)
            elif is_finished(output_dir, sample.sample_id):  # finished between the check and the claim
                skipped.append(sample.sample_id)
            else:
                _make_sample(pipeline, sample, output_dir, settings, mask, mask_affine, progress)
                made.append(sample.sample_id)
    for sample in busy:
        with _claim(output_dir, sample.sample_id, wait=True):
            if is_finished(output_dir, sample.sample_id):
                skipped.append(sample.sample_id)
            else:  # its process stopped without finishing it
                _make_sample(pipeline, sample, output_dir, settings, mask, mask_affine, progress)
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
    with contextlib.suppress(OSError):  # not empty: another process of the run is still tidying its claim
        (output_dir / _PARTIAL).rmdir()


def execute_generation(run: GenerationRun, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Carry out a checked run: load the chain, write the manifest, generate the missing samples, check the folder.

    Args:
        run: from :func:`check_generation`.
        overwrite: replace an earlier run with other settings.
        progress: progress bars.

    Returns:
        ``{"output_dir", "generated": [ids made now], "skipped": [ids already there], "broken_rows": [messages]}``.
    """
    pipeline, files = run.chain.load()
    start_run(run.output_dir, run_manifest(run.plan, run.settings, files, {"broken_rows": run.problems}), overwrite=overwrite)
    made, skipped = generate_samples(pipeline, run.plan, run.output_dir, run.settings, run.mask, run.mask_affine, progress=progress)
    finish_run(run.output_dir, run.plan)
    return {"output_dir": str(run.output_dir), "generated": made, "skipped": skipped, "broken_rows": run.problems}


def run_generation(
    requests: tuple[Sequence[GenerationRequest], Sequence[str]] | Sequence[GenerationRequest],
    settings: GenerationSettings,
    output_dir: str | os.PathLike,
    chain: ChainSources | None = None,
    overwrite: Any = False,
    progress: bool = True,
) -> dict[str, Any]:
    """A whole generation run: :func:`check_generation`, then :func:`execute_generation` (the meta-bundle's ``run``).

    Args:
        requests: the requests, or ``(requests, broken-row messages)`` as :func:`~custom_components.data.requests.load_requests`
            returns them.
        settings: the run's settings (with ``mask_file`` for mask-conditioned runs).
        output_dir: the run folder.
        chain: the model files, device ... (None: the bundles' demo weights on ``auto``).
        overwrite: replace an earlier run with other settings (a yes/no value).
        progress: progress bars.

    Returns:
        see :func:`execute_generation`.
    """
    overwrite = switch(overwrite, "overwrite")
    return execute_generation(check_generation(requests, settings, output_dir, chain), overwrite=overwrite, progress=progress)
