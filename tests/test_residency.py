"""Only the running stage's network stays loaded during chained inference (custom_components.pipelines.residency)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from custom_components.pipelines.residency import StageResidency
from custom_components.errors import GuideGenInputError


def _saved(network: nn.Module, path: Path) -> Path:
    torch.save({"model": network.state_dict(), "info": {}}, str(path))
    return path


def _two_networks(tmp_path: Path) -> dict[str, tuple[nn.Module, Path]]:
    torch.manual_seed(0)
    first = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
    second = nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)).eval()  # BatchNorm: persistent buffers
    return {"first": (first, _saved(first, tmp_path / "first.pt")), "second": (second, _saved(second, tmp_path / "second.pt"))}


def test_released_networks_come_back_with_the_same_weights(tmp_path: Path) -> None:
    networks = _two_networks(tmp_path)
    first, second = networks["first"][0], networks["second"][0]
    x, y = torch.randn(3, 4), torch.randn(2, 2, 5)
    expected_first, expected_second = first(x).detach(), second(y).detach()
    residency = StageResidency(networks, torch.device("cpu"))

    residency.activate("first")
    assert residency.loaded == ("first",)
    assert all(p.is_meta for p in second.parameters()) and all(b.is_meta for b in second.buffers())
    torch.testing.assert_close(first(x), expected_first)

    residency.activate("second")
    assert residency.loaded == ("second",)
    assert all(p.is_meta for p in first.parameters())
    assert torch.equal(second(y), expected_second)

    residency.activate()
    assert residency.loaded == ()
    residency.activate("first", "second")
    assert residency.loaded == ("first", "second")
    assert torch.equal(first(x), expected_first) and torch.equal(second(y), expected_second)


def test_disabled_residency_keeps_everything_loaded(tmp_path: Path) -> None:
    residency = StageResidency(_two_networks(tmp_path), torch.device("cpu"), enabled=False)
    residency.activate("first")
    assert residency.loaded == ("first", "second")


def test_unknown_stage_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="third"):
        StageResidency(_two_networks(tmp_path), torch.device("cpu")).activate("third")


def test_a_model_file_changed_during_the_run_is_refused(tmp_path: Path) -> None:
    networks = _two_networks(tmp_path)
    residency = StageResidency(networks, torch.device("cpu"))
    residency.activate("first")
    path = networks["second"][1]
    _saved(nn.Sequential(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)), path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(GuideGenInputError, match="second.pt.*changed"):
        residency.activate("second")


def test_a_network_with_buffers_outside_its_state_dict_stays_loaded(tmp_path: Path) -> None:
    class WithScratch(nn.Linear):
        def __init__(self) -> None:
            super().__init__(2, 2)
            self.register_buffer("scratch", torch.ones(2), persistent=False)

    network = WithScratch()
    residency = StageResidency({"odd": (network, _saved(network, tmp_path / "odd.pt"))}, torch.device("cpu"))
    residency.activate()
    assert residency.loaded == ("odd",)
    assert torch.equal(network.scratch, torch.ones(2))


def test_the_chain_releases_the_other_stages_and_gives_the_same_pair(tmp_path: Path) -> None:
    from custom_components.pipelines.text_to_pair import load_text_to_pair
    from custom_components.runs.untrained import write_untrained_models
    from tests.test_generate import PROMPT, TINY

    files = write_untrained_models(tmp_path, mask_size=(16, 16, 16), image_size=(32, 32, 32), architectures=TINY)
    pairs = {}
    for keep in (True, False):
        pipeline, _ = load_text_to_pair(files["tcss"], files["ldm"], files["autoencoder"], device="cpu", keep_models_loaded=keep)
        pairs[keep] = pipeline(PROMPT, seed=3, tcss_steps=2, ldm_steps=2, progress=False)
        if keep:
            assert pipeline.residency.loaded == ("ldm", "autoencoder", "tcss")
        else:
            assert pipeline.residency.loaded == ("autoencoder",)
            assert all(p.is_meta for p in pipeline.tcss.network.parameters())
    assert np.array_equal(pairs[True].mask, pairs[False].mask)
    assert np.array_equal(pairs[True].ct, pairs[False].ct)
