"""One file-hashing helper (custom_components.data.io.file_digest) serves every caller with the digests they had."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest

from custom_components.data.io import file_digest
from custom_components.networks.checkpoints import model_file_digest
from custom_components.networks import text_encoder

PACKAGE = Path(__file__).resolve().parents[1] / "custom_components"


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, (1 << 20) + 17])  # empty, tiny, just below and above a chunk
@pytest.mark.parametrize("hash_type", ["sha256", "md5", "sha1", "sha512"])
def test_digest_equals_hashlib_over_the_whole_file(tmp_path: Path, size: int, hash_type: str) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert file_digest(path, hash_type) == hashlib.new(hash_type, data).hexdigest()
    assert file_digest(str(path), hash_type, chunk_bytes=7) == hashlib.new(hash_type, data).hexdigest()


def test_sha256_is_the_default_and_model_files_use_the_same_helper(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"weights" * 1000)
    assert file_digest(path) == hashlib.sha256(b"weights" * 1000).hexdigest()
    assert model_file_digest(path) == hashlib.md5(b"weights" * 1000).hexdigest()  # large_files.yml's md5
    assert model_file_digest(path, "sha256") == file_digest(path)


def test_text_encoder_weights_are_checked_with_the_shared_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / text_encoder.WEIGHTS_FILE).write_bytes(b"not the weights")
    seen: list[Path] = []
    monkeypatch.setattr(text_encoder, "file_digest", lambda path: seen.append(Path(path)) or "0" * 64)
    with pytest.raises(text_encoder.WeightsIntegrityError):
        text_encoder._verify_weights(tmp_path, "f" * 64)
    assert seen == [tmp_path / text_encoder.WEIGHTS_FILE]


def test_no_other_module_hashes_files() -> None:
    """hashlib is read only by data/io.py (file_digest for files, json_digest for settings fingerprints)."""
    users = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module] if isinstance(node, ast.ImportFrom) else []
            if "hashlib" in names:
                users.add(path.relative_to(PACKAGE).as_posix())
    assert users == {"data/io.py"}
