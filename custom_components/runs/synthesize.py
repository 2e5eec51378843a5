"""Synthesizing a segmentation data set from prompts, split across processes or GPUs.

The run's samples (:func:`~custom_components.runs.generate.plan_samples`) are dealt out round-robin: process
``r`` of ``W`` makes samples ``r, r + W, r + 2W, ...``. Each sample's seed is fixed by its index, so the data set does
not depend on ``W``, no sample is made twice and, after every process is done, :func:`finish_run` checks that none
is missing. The coordinator (rank 0, or the parent of ``--num_workers`` processes) then writes the data set as an
nnU-Net v2 raw dataset or a MONAI datalist.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from custom_components.data.writers import write_json
from custom_components.data.nnunet import write_nnunet_dataset
from custom_components.errors import GuideGenInputError
from custom_components.pipelines.text_to_pair import ChainSources
from custom_components.runs.generate import GenerationSettings, PlannedSample, generate_samples

__all__ = ["FORMATS", "shard", "run_shard", "run_workers", "write_monai_datalist", "write_synthetic_dataset"]

FORMATS = ("nnunet", "monai")


def shard(plan: Sequence[PlannedSample], rank: int, world_size: int) -> list[PlannedSample]:
    """Process ``rank``'s share of the plan (round-robin, so shares differ by at most one sample)."""
    return list(plan[int(rank) :: int(world_size)])


def run_shard(
    rank: int,
    world_size: int,
    chain: ChainSources,
    plan: Sequence[PlannedSample],
    samples_dir: str,
    settings: GenerationSettings,
    num_threads: int | None = None,
    progress: bool = True,
    pipeline: Any | None = None,
    mask: np.ndarray | None = None,
    mask_affine: np.ndarray | None = None,
) -> list[str]:
    """Generate this process's share of the samples (a ``--num_workers`` worker's body).

    Args:
        chain: what the chain is loaded from (when ``pipeline`` is None) and where it runs.
        pipeline: the chain, when this process has loaded it already; else loaded from ``chain``.
        mask, mask_affine: the given mask of a mask-conditioned run, as
            :func:`~custom_components.runs.generate.check_generation` read and checked it.

    Returns:
        the sample ids this process generated.
    """
    if num_threads:
        torch.set_num_threads(int(num_threads))
    mine = shard(plan, rank, world_size)
    if not mine:
        return []
    if pipeline is None:
        pipeline, _ = chain.load()
    made, _ = generate_samples(pipeline, mine, samples_dir, settings, mask, mask_affine, progress=progress,
                               description=f"worker {rank}/{world_size}")
    return made


def _worker_entry(args: tuple) -> None:
    run_shard(*args)


def run_workers(
    num_workers: int,
    chain: ChainSources,
    plan: Sequence[PlannedSample],
    samples_dir: str,
    settings: GenerationSettings,
    mask: np.ndarray | None = None,
    mask_affine: np.ndarray | None = None,
) -> None:
    """Generate the plan with ``num_workers`` local processes (CPU cores shared out between them).

    Args:
        mask, mask_affine: the checked given mask of a mask-conditioned run (sent to each worker).

    Raises:
        GuideGenInputError: a worker failed (its samples stay missing; rerunning completes them).
    """
    threads = max(1, (os.cpu_count() or 1) // int(num_workers))
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads can deadlock
    processes = [
        context.Process(target=_worker_entry, args=((rank, num_workers, chain, list(plan), samples_dir, settings, threads, False, None, mask,
                                                      mask_affine),))
        for rank in range(int(num_workers))
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [rank for rank, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        raise GuideGenInputError(f"worker(s) {failed} failed (see their messages above); rerun the same command to complete the data set")


def write_monai_datalist(output_dir: str | os.PathLike, samples: Sequence[PlannedSample], samples_dir: str | os.PathLike,
                         class_map: Any) -> Path:
    """Write ``<output_dir>/datalist.json``: a MONAI datalist with every sample in ``training`` and a class map beside it.

    Paths are relative to the datalist's folder (MONAI's ``load_decathlon_datalist`` joins them to its ``base_dir``).
    """
    output_dir = Path(output_dir)
    write_json(class_map.raw, output_dir / "class_map.json")
    items = []
    for sample in samples:
        folder = Path(os.path.relpath(Path(samples_dir) / sample.sample_id, output_dir))
        items.append({"image": str(folder / "ct.nii.gz"), "label": str(folder / "mask.nii.gz"), "text": sample.request.prompt,
                      "record": sample.request.record, "seed": sample.seed})
    return write_json({"description": "Synthetic mask + CT pairs generated by GuideGen from clinical text prompts",
                       "class_map": "class_map.json", "num_classes": class_map.num_classes, "training": items},
                      output_dir / "datalist.json")


def write_synthetic_dataset(
    output_format: str, output_dir: str | os.PathLike, samples: Sequence[PlannedSample], samples_dir: str | os.PathLike,
    class_map: Any, dataset_id: int = 501, dataset_name: str = "GuideGen",
) -> Path:
    """Write the finished samples as an nnU-Net v2 raw dataset (``<output_dir>/nnUNet_raw/Dataset<ID>_<Name>/``) or a
    MONAI datalist (``<output_dir>/datalist.json``).

    Returns:
        the dataset folder (nnunet) or the datalist file (monai).

    Raises:
        GuideGenInputError: an unknown format.
    """
    if output_format not in FORMATS:
        raise GuideGenInputError(f"--format {output_format!r}: choose one of {', '.join(FORMATS)}")
    if output_format == "monai":
        return write_monai_datalist(output_dir, samples, samples_dir, class_map)
    cases = [{"case_id": s.sample_id, "ct": Path(samples_dir) / s.sample_id / "ct.nii.gz",
              "mask": Path(samples_dir) / s.sample_id / "mask.nii.gz"} for s in samples]
    return write_nnunet_dataset(cases, class_map.class_names, Path(output_dir) / "nnUNet_raw", dataset_id, dataset_name)
