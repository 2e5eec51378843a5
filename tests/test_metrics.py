"""Metrics with known answers: Fréchet distance closed forms, tumor count and location alignment."""

import numpy as np
import pytest

from custom_components.data.class_map import load_class_map
from custom_components.errors import GuideGenInputError
from custom_components.metrics import frechet_distance, gaussian_statistics, tumor_alignment


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 8))
    mu, sigma = gaussian_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_for_rotated_covariances():
    # Same spectrum, rotated: the distance depends on the covariances' product, not only their traces.
    rotation = np.array([[0.0, -1.0], [1.0, 0.0]])
    sigma1 = np.diag([4.0, 1.0])
    sigma2 = rotation @ sigma1 @ rotation.T  # diag(1, 4)
    assert frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2) == pytest.approx(2.0, rel=1e-10)


def test_frechet_bad_input():
    with pytest.raises(GuideGenInputError, match="statistics do not match"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(GuideGenInputError, match="num_samples >= 2"):
        gaussian_statistics(np.zeros((1, 4)))


def _mask_with_tumors(organ: str, centres):
    class_map = load_class_map()
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[2:18, 2:10, 2:18] = class_map.index_of("liver")
    mask[2:18, 11:18, 2:18] = class_map.index_of("kidney")
    host = class_map.index_of(organ)
    for x, y, z in centres:
        assert mask[x, y, z] == host
        mask[x - 1 : x + 2, y - 1 : y + 2, z - 1 : z + 2] = class_map.tumor_index
    return mask, class_map


def test_tumors_in_the_named_organ_are_aligned():
    mask, class_map = _mask_with_tumors("liver", [(5, 5, 5), (12, 5, 12)])
    result = tumor_alignment(mask, {"tumor_organ": "liver", "tumor_count": 2}, class_map)
    assert result.found_count == 2 and result.count_correct and result.location_correct
    assert result.component_organs == ["liver", "liver"]


def test_tumor_in_the_wrong_organ_is_a_location_miss():
    mask, class_map = _mask_with_tumors("kidney", [(8, 14, 8)])
    result = tumor_alignment(mask, {"tumor_organ": "liver", "tumor_count": 1}, class_map)
    assert result.count_correct and result.location_correct is False
    assert result.component_organs == ["kidney"]


def test_body_class_is_not_a_tumor_location():
    """A liver tumor at the liver's edge borders more "body" (unlabelled tissue) than liver: it is still a liver tumor."""
    class_map = load_class_map(body_class=True)
    mask = np.full((12, 12, 12), class_map.body_index, dtype=np.uint8)
    mask[:, :, :3] = 0
    mask[2:10, 2:5, 3:10] = class_map.index_of("liver")
    mask[4:7, 4:7, 4:7] = class_map.tumor_index  # one row inside the liver, the rest in body tissue
    result = tumor_alignment(mask, {"tumor_organ": "liver", "tumor_count": 1}, class_map)
    assert result.component_organs == ["liver"] and result.location_correct
    mask[mask == class_map.index_of("liver")] = class_map.body_index
    assert tumor_alignment(mask, {"tumor_organ": "liver", "tumor_count": 1}, class_map).component_organs == ["background"]


def test_wrong_count_and_healthy_records():
    mask, class_map = _mask_with_tumors("liver", [(5, 5, 5)])
    assert not tumor_alignment(mask, {"tumor_organ": "liver", "tumor_count": 3}, class_map).count_correct
    healthy = tumor_alignment(np.zeros((4, 4, 4), np.uint8), {"tumor_count": 0}, class_map)
    assert healthy.count_correct and healthy.location_correct is None and healthy.found_count == 0


def test_expected_count_is_what_the_prompt_states():
    """"Multiple" tumors are at least two; an organ without a count is "a tumor" (one), as the prompt writes it."""
    two, class_map = _mask_with_tumors("liver", [(5, 5, 5), (12, 5, 12)])
    one, _ = _mask_with_tumors("liver", [(5, 5, 5)])
    multiple = {"tumor_organ": "liver", "tumor_count_min": 2}
    assert tumor_alignment(two, multiple, class_map).count_correct
    result = tumor_alignment(one, multiple, class_map)
    assert not result.count_correct and (result.expected_count, result.expected_at_least) == (2, True)
    organ_only = {"tumor_organ": "liver"}
    assert tumor_alignment(one, organ_only, class_map).count_correct
    assert not tumor_alignment(two, organ_only, class_map).count_correct


def test_alignment_bad_input():
    class_map = load_class_map()
    with pytest.raises(GuideGenInputError, match="class 'brain' is not in class map"):
        tumor_alignment(np.zeros((4, 4, 4), np.uint8), {"tumor_organ": "brain", "tumor_count": 1}, class_map)
    with pytest.raises(GuideGenInputError, match="3D label volume"):
        tumor_alignment(np.zeros((4, 4), np.uint8), {}, class_map)
