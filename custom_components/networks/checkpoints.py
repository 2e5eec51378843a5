"""Model files of the three GuideGen stages: read, verified and loaded into their networks (the one reader).

Every checkpoint carries a :class:`CheckpointInfo` entry (``"info"``) that names the stage it belongs to
and the class map it was trained with. Loading a checkpoint of another stage, or one trained for a
different number of classes, fails with a message that says so instead of a wall of shape mismatches.

A model file (``models/model.pt``, the inference weights) is the network's plain state dict, what MONAI's
``ckpt_export``, ``CheckpointLoader`` and ``torch.load`` + ``load_state_dict`` read (issue 17; the model zoo's
``ci/verify_bundle.py`` exports it without ``key_in_ckpt``). The info rides along in the state dict's own metadata
(``state_dict._metadata[MODEL_INFO_KEY]``, where torch keeps each module's version; ``load_state_dict`` looks up only
module paths there), so it is in the same file, covered by the same digests, and ignored by every loader that does
not ask for it. Files of the earlier layout, ``{"model": state_dict, "info": {...}}``, still load; every reader sees
both layouts as ``{"model": state_dict, "info": {...}}`` (:func:`read_model_file`).

Every model file is verified when it is read (:func:`read_model_file`, the one place that reads them): the CRC-32 that
``torch.save`` records for each stored tensor, the digest of the bundle's ``large_files.yml`` where the file is listed
there, and finite parameters. A damaged file stops the run with the file and the fix named; the checks run once per
version of a file (path, size, modification time) in a process.

Each file's info also holds its network's ``architecture``: :func:`network_from_info` rebuilds any stage's network from
it (a registry by stage, :data:`STAGE_NETWORKS`) and :func:`load_network` loads the weights into it, so inference and
the pipelines need the model file alone.

Writing model files (and resuming training) is the training engine's (:mod:`custom_components.engines.checkpoints`);
this module reads only, so the in-memory pipelines can load networks without loading a writer.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import yaml

from custom_components.errors import GuideGenInputError
from custom_components.networks.autoencoder import MaskGuidedAutoencoder
from custom_components.networks.factory import build_text_conditioned_unet
from custom_components.networks.latent_denoiser import build_latent_denoiser

__all__ = [
    "STAGES",
    "CheckpointInfo",
    "model_file_digest",
    "read_intact_model_file",
    "read_model_file",
    "read_checkpoint_info",
    "load_model_weights",
    "load_network",
    "network_from_info",
    "STAGE_NETWORKS",
    "MODEL_INFO_KEY",
    "model_state_dict",
    "split_model_file",
]

STAGES = ("tcss", "autoencoder", "ldm")
LARGE_FILES = "large_files.yml"
# where a model file keeps its info: a key of the state dict's metadata that no module path can take (module names
# cannot be empty or hold a "."; torch writes "" for the root and dotted paths for submodules, none with a ":")
MODEL_INFO_KEY = "guidegen:info"
logger = logging.getLogger(__name__)

# (resolved path, size, mtime_ns) of the file versions already verified, and digests already computed: a run reads a
# model file several times (info, weights, reloads of a released network) and hashes each version once
_FileStamp = tuple[str, int, int]
_LargeFilesEntry = tuple[Path, str, str]  # (large_files.yml, hash_type, hash_val)
_intact_files: set[_FileStamp] = set()
_warned_files: set[_FileStamp] = set()
_digests: dict[tuple[_FileStamp, str], str] = {}


class CheckpointInfo:
    """What a checkpoint was trained for; saved and checked like any other checkpoint entry.

    Args:
        stage: one of :data:`STAGES`.
        num_classes: N of the class map.
        class_map_name: the class map's name.
        extra: further facts worth keeping with the weights (e.g. sizes, spacing); plain JSON-like values.
    """

    def __init__(self, stage: str, num_classes: int, class_map_name: str = "", extra: Mapping[str, Any] | None = None) -> None:
        if stage not in STAGES:
            raise GuideGenInputError(f"unknown stage '{stage}'; expected one of {STAGES}")
        self.stage = stage
        self.num_classes = int(num_classes)
        self.class_map_name = class_map_name
        self.extra = dict(extra or {})
        self.loaded: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        """The facts as a plain dict (loadable with ``torch.load(weights_only=True)``)."""
        return {"stage": self.stage, "num_classes": self.num_classes, "class_map_name": self.class_map_name, **self.extra}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check that a checkpoint fits this run.

        Raises:
            GuideGenInputError: the checkpoint is from another stage or was trained for another class count.
        """
        stage = state.get("stage")
        if stage != self.stage:
            raise GuideGenInputError(
                f"this checkpoint belongs to the '{stage}' stage but it is being loaded into the '{self.stage}' "
                "stage; pass the checkpoint of the matching bundle"
            )
        if int(state.get("num_classes", -1)) != self.num_classes:
            raise GuideGenInputError(
                f"the checkpoint was trained with {state.get('num_classes')} classes "
                f"(class map '{state.get('class_map_name')}') but the class map in use has {self.num_classes}; "
                "use the class map the checkpoint was trained with"
            )
        self.loaded = dict(state)


def _info_dict(info: CheckpointInfo | Mapping[str, Any]) -> dict[str, Any]:
    return info.state_dict() if isinstance(info, CheckpointInfo) else dict(info)


def model_state_dict(state: Mapping[str, Any], info: CheckpointInfo | Mapping[str, Any]) -> OrderedDict[str, Any]:
    """A network's state dict with the model file's info attached (the content of a model file).

    Args:
        state: the network's ``state_dict()`` (its per-module metadata is kept).
        info: the :class:`CheckpointInfo` (or its plain dict).

    Returns:
        a new ``OrderedDict`` of the same tensors whose ``_metadata[MODEL_INFO_KEY]`` holds the info as a plain dict
        (saved and read back by ``torch.save`` / ``torch.load(weights_only=True)``).
    """
    result = OrderedDict(state.items())
    metadata = OrderedDict(getattr(state, "_metadata", None) or {})
    metadata[MODEL_INFO_KEY] = _info_dict(info)
    result._metadata = metadata  # type: ignore[attr-defined]
    return result


def split_model_file(checkpoint: Any) -> tuple[Mapping[str, Any], dict[str, Any]] | None:
    """``(state_dict, info)`` of a loaded model file of either layout, or None when it is no guidegen model file.

    Layouts: a state dict with the info in its metadata (written since issue 17), or ``{"model": state_dict,
    "info": {...}}`` (earlier files).
    """
    if not isinstance(checkpoint, Mapping):
        return None
    if isinstance(checkpoint.get("model"), Mapping) and isinstance(checkpoint.get("info"), Mapping):
        return checkpoint["model"], dict(checkpoint["info"])
    info = (getattr(checkpoint, "_metadata", None) or {}).get(MODEL_INFO_KEY)
    if isinstance(info, Mapping):
        return checkpoint, dict(info)
    return None


def _file_stamp(path: Path) -> _FileStamp:
    stat = path.stat()
    return str(path.resolve()), int(stat.st_size), int(stat.st_mtime_ns)


def model_file_digest(path: str | os.PathLike, hash_type: str = "md5") -> str:
    """Hex digest of a file, as ``large_files.yml`` records it (computed once per version of the file).

    Args:
        path: the file.
        hash_type: one of MONAI's ``SUPPORTED_HASH_TYPES`` (md5, sha1, sha256, sha512), the types that
            ``monai.bundle download_large_files`` checks.

    Returns:
        the lowercase hex digest.

    Raises:
        GuideGenInputError: an unsupported hash type.
    """
    from monai.apps.utils import SUPPORTED_HASH_TYPES

    hash_type = str(hash_type).lower()
    if hash_type not in SUPPORTED_HASH_TYPES:
        raise GuideGenInputError(f"hash type '{hash_type}' is not supported; use one of {sorted(SUPPORTED_HASH_TYPES)}")
    key = (_file_stamp(Path(path)), hash_type)
    if key not in _digests:
        from custom_components.data.io import file_digest

        _digests[key] = file_digest(path, hash_type)
    return _digests[key]


def _large_files_entry(path: Path) -> _LargeFilesEntry | None:
    """``(large_files.yml, hash_type, hash_val)`` of the bundle file listing this model file, if one does.

    A bundle lists its shipped weights relative to its root (``models/model.pt``), so every folder above the file is a
    candidate root; a file from elsewhere (e.g. a freshly trained one) has no entry.
    """
    resolved = path.resolve()
    for root in resolved.parents:
        listing = root / LARGE_FILES
        if not listing.is_file():
            continue
        try:
            entries = (yaml.safe_load(listing.read_text()) or {}).get("large_files") or []
        except (OSError, yaml.YAMLError, AttributeError) as err:
            raise GuideGenInputError(f"{listing} cannot be read ({err}); restore it or write it again with `guidegen package`") from err
        for entry in entries:
            if isinstance(entry, Mapping) and entry.get("hash_val") and (root / str(entry.get("path", ""))).resolve() == resolved:
                return listing, str(entry.get("hash_type", "md5")), str(entry["hash_val"]).lower()
    return None


def _restore_advice(path: Path, listed: _LargeFilesEntry | None) -> str:
    """How to get an undamaged copy of a model file back (with both digests where a bundle lists the file)."""
    if listed is None:
        return f"copy {path} again from where it came from, restore it with `git checkout -- {path}` if it is tracked, or retrain it"
    listing, hash_type, recorded = listed
    return (f"its {hash_type} is {model_file_digest(path, hash_type)}, {listing} records {recorded}: restore the bundle's "
            f"file with `git checkout -- {path}` (in a clone of the repository) or download the bundle again "
            f"(`python -m monai.bundle download --name {listing.parent.name} ...`), or retrain it")


def _check_stored_checksums(path: Path) -> None:
    """Compare every record of a torch zip file with the CRC-32 ``torch.save`` stored for it.

    ``torch.load`` does not check these (with ``mmap`` it maps the tensor bytes as they are): flipped bytes inside a
    tensor would otherwise load as wrong (often NaN) weights.
    """
    if not zipfile.is_zipfile(path):
        return  # a legacy or foreign file: torch.load reports it
    with zipfile.ZipFile(path) as archive:
        for record in archive.infolist():
            if record.CRC == 0:
                continue  # written with torch.serialization.set_crc32_options(False): nothing stored to compare with
            with archive.open(record) as stream:
                while stream.read(1 << 20):
                    pass


def _read_checked(path: Path, map_location: Any, listed: _LargeFilesEntry | None) -> dict[str, Any]:
    """Read a model file, checking its stored checksums and finite parameters once per version (see callers)."""
    if not path.is_file():
        raise GuideGenInputError(f"model weights {path} not found; train the bundle first or point the config at the file")
    stamp = _file_stamp(path)
    verified = stamp in _intact_files
    try:
        if not verified:
            _check_stored_checksums(path)
        # mmap: reading the info entry (or copying weights into a network) does not pull the whole file into memory
        checkpoint = torch.load(str(path), map_location=map_location, weights_only=True, mmap=True)
    except zipfile.BadZipFile as err:  # from the checksum comparison: "Bad CRC-32 for file ..." or a broken index
        raise GuideGenInputError(
            f"model weights {path} cannot be read: the file is damaged ({err}: it fails the checksum torch stored when "
            f"saving it); {_restore_advice(path, listed)}"
        ) from err
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise GuideGenInputError(
            f"model weights {path} cannot be read ({type(err).__name__}: {err}); {_restore_advice(path, listed)}"
        ) from err
    split = split_model_file(checkpoint)
    if split is None:
        raise GuideGenInputError(
            f"{path} is not a guidegen model file (expected a state dict carrying the model info, or 'model' and "
            "'info' entries)"
        )
    checkpoint = {"model": split[0], "info": split[1]}
    if not verified:
        non_finite = [name for name, value in checkpoint["model"].items()
                      if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
        if non_finite:
            shown = ", ".join(non_finite[:5]) + (f" and {len(non_finite) - 5} more" if len(non_finite) > 5 else "")
            raise GuideGenInputError(
                f"model weights {path} hold non-finite values (NaN or infinity) in {shown}: the training that wrote "
                f"them diverged or the file was damaged; {_restore_advice(path, listed)}"
            )
        _intact_files.add(stamp)
    return checkpoint


def read_intact_model_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """:func:`read_model_file` without the comparison with ``large_files.yml``, for recording a new digest.

    Args:
        path: model file (either layout, see the module docs).
        map_location: passed to :func:`torch.load`.

    Returns:
        ``{"model": state_dict, "info": {...}}`` (tensors memory-mapped from the file).

    Raises:
        GuideGenInputError: missing, unreadable, failing its stored checksums, not a guidegen model file, or holding
            non-finite parameters.
    """
    return _read_checked(Path(path), map_location, listed=None)


def read_model_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a model file (written at the end of training; either layout, see the module docs), verified.

    Checks, once per version of the file: the CRC-32 torch stored for every tensor, finite parameters, and, where a
    bundle's ``large_files.yml`` lists the file, its digest. A damaged file is refused (a listed one with both digests
    named); an intact file whose digest differs from the listed one (weights retrained into the bundle's own
    ``models/`` folder) is used, with a warning that names both digests.

    Args:
        path: the model file.
        map_location: passed to :func:`torch.load`.

    Returns:
        ``{"model": state_dict, "info": {...}}``, whichever layout the file has.

    Raises:
        GuideGenInputError: missing, unreadable, damaged, not a guidegen model file, or non-finite parameters; the
            message names the file and how to restore it.
    """
    path = Path(path)
    listed = _large_files_entry(path) if path.is_file() else None
    checkpoint = _read_checked(path, map_location, listed)
    stamp = _file_stamp(path)
    if listed is not None and stamp not in _warned_files:
        listing, hash_type, recorded = listed
        actual = model_file_digest(path, hash_type)
        if actual != recorded:
            # retraining in place is how the README's stage-by-stage runs work: point the stale digest out, do not stop
            _warned_files.add(stamp)
            logger.warning(
                "model weights %s are intact but are not the file %s lists (%s %s, recorded %s): using them as "
                "retrained weights. Record them with `guidegen package`, or restore the shipped file with "
                "`git checkout -- %s`.", path, listing, hash_type, actual, recorded, path,
            )
    return checkpoint


def read_checkpoint_info(path: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """The info entry of a model file (architecture, sizes, spacing recorded at training time).

    Args:
        path: model file.
        stage: when given, the file must belong to this stage.

    Raises:
        GuideGenInputError: see :func:`read_model_file`, or a file of another stage.
    """
    info = dict(read_model_file(path)["info"])
    if stage is not None and info.get("stage") != stage:
        raise GuideGenInputError(
            f"{path} belongs to the '{info.get('stage')}' stage, not '{stage}'; pass the checkpoint of the matching bundle"
        )
    return info


def load_model_weights(
    path: str | os.PathLike, network: torch.nn.Module, info: CheckpointInfo, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load inference weights into a network after checking the checkpoint's info entry.

    Args:
        path: the model file written at the end of training.
        network: module to load into (strictly).
        info: what this run expects; raises if the checkpoint does not fit.
        map_location: passed to :func:`torch.load`.

    Returns:
        the checkpoint's info dict.

    Raises:
        GuideGenInputError: see :func:`read_model_file`, wrong stage or class count.
    """
    checkpoint = read_model_file(path, map_location)
    info.load_state_dict(checkpoint["info"])
    network.load_state_dict(checkpoint["model"])
    return dict(checkpoint["info"])


def load_network(
    path: str | os.PathLike, network: torch.nn.Module, info: CheckpointInfo, map_location: Any = "cpu"
) -> torch.nn.Module:
    """:func:`load_model_weights`, returning the network in eval mode (for configs that define a ready network).

    Raises:
        GuideGenInputError: see :func:`load_model_weights`.
    """
    load_model_weights(path, network, info, map_location)
    return network.eval()


def _denoiser_architecture(info: Mapping[str, Any], inference_slab_rows: int | None) -> dict[str, Any]:
    # checkpointing only trades compute for memory in training; the slab rows change memory, never the result
    return dict(info["architecture"], use_checkpointing=False, inference_slab_rows=inference_slab_rows)


def _tcss_network(info: Mapping[str, Any], num_classes: int, text_dim: int | None, inference_slab_rows: int | None) -> torch.nn.Module:
    return build_text_conditioned_unet(in_channels=num_classes, out_channels=num_classes, text_dim=_required_text_dim(text_dim, "tcss"),
                                       **_denoiser_architecture(info, inference_slab_rows))


def _ldm_network(info: Mapping[str, Any], num_classes: int, text_dim: int | None, inference_slab_rows: int | None) -> torch.nn.Module:
    return build_latent_denoiser(latent_channels=int(info["latent_shape"][0]), num_classes=num_classes,
                                 text_dim=_required_text_dim(text_dim, "ldm"), mask_encoding=info["mask_encoding"],
                                 mask_factor=info["mask_factor"], mask_embed_channels=info["mask_embed_channels"],
                                 **_denoiser_architecture(info, inference_slab_rows))


def _autoencoder_network(info: Mapping[str, Any], num_classes: int, text_dim: int | None, inference_slab_rows: int | None) -> torch.nn.Module:
    architecture = info["architecture"]
    return MaskGuidedAutoencoder(
        # an image-only autoencoder (mask_input false) takes no mask pyramid, whatever the class map
        num_classes=num_classes if info.get("mask_input", True) else 0,
        channels=architecture["channels"],
        num_res_blocks=architecture["num_res_blocks"],
        latent_channels=architecture["latent_channels"],
        norm=architecture.get("norm", "voxel"),
        norm_num_groups=architecture.get("norm_num_groups", 32),
        # model files written before the intensity normalisation existed were trained without it
        intensity_shift=architecture.get("intensity_shift", 0.0),
        intensity_scale=architecture.get("intensity_scale", 1.0),
    )


def _required_text_dim(text_dim: int | None, stage: str) -> int:
    if text_dim is None:
        raise GuideGenInputError(f"the {stage} network is text-conditioned: pass text_dim (the text encoder's hidden size)")
    return int(text_dim)


STAGE_NETWORKS: Mapping[str, Callable[[Mapping[str, Any], int, int | None, int | None], torch.nn.Module]] = MappingProxyType(
    {"tcss": _tcss_network, "ldm": _ldm_network, "autoencoder": _autoencoder_network}
)
"""Stage -> builder of its network from a model file's info entry (:func:`network_from_info`)."""


def network_from_info(
    info: Mapping[str, Any], num_classes: int, text_dim: int | None = None, inference_slab_rows: int | None = None
) -> torch.nn.Module:
    """The untrained network a model file's info entry describes, ready for :func:`load_network` (any stage).

    The TCSS denoiser (paper Eq. 5-6 with Eq. 3-4's knowledge injection), the autoencoder (Eq. 7) or the latent
    denoiser (Eq. 10-11), as :data:`STAGE_NETWORKS` builds them from the ``architecture`` stored at training time.
    A bundle's inference config makes its ``network_def`` with this (what the model zoo's ``ckpt_export`` exports).

    Args:
        info: :func:`read_checkpoint_info` of the model file.
        num_classes: N of the class map in use (the mask's channels; ignored by an image-only autoencoder).
        text_dim: the text encoder's hidden size (the TCSS and latent denoisers).
        inference_slab_rows: rows per slab of the denoisers' memory-lean inference (None: plain forward).

    Returns:
        the network, with fresh weights.

    Raises:
        GuideGenInputError: an info entry of no known stage, or a denoiser without ``text_dim``.
    """
    stage = info.get("stage")
    if stage not in STAGE_NETWORKS:
        raise GuideGenInputError(f"the model file's info names stage {stage!r}; expected one of {tuple(STAGE_NETWORKS)}")
    return STAGE_NETWORKS[stage](info, int(num_classes), text_dim, inference_slab_rows)
