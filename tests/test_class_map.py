import json

import numpy as np
import pytest

from custom_components.data.class_map import (
    body_class_map_path,
    default_class_map_path,
    load_class_map,
    resolve_source_map_name,
    totalsegmentator_label_maps,
)
from custom_components.errors import GuideGenInputError

EXPECTED_CLASSES = (
    "background", "spleen", "kidney", "gallbladder", "liver", "stomach", "aorta", "inferior_vena_cava",
    "portal_and_splenic_vein", "pancreas", "adrenal_gland", "esophagus", "lung", "heart", "small_bowel",
    "duodenum", "colon", "urinary_bladder", "bone", "tumor",
)


def test_default_class_map_has_the_paper_classes():
    class_map = load_class_map()
    assert class_map.class_names == EXPECTED_CLASSES
    assert class_map.num_classes == 20
    assert class_map.tumor_index == 19
    assert class_map.index_of("liver") == 4


def test_every_organ_class_has_sources_in_both_totalsegmentator_versions():
    class_map = load_class_map()
    for version in ("total_v1", "total_v2"):
        mapped = set(class_map.sources[version].values())
        organ_classes = set(range(1, class_map.num_classes)) - {class_map.tumor_index}
        assert organ_classes <= mapped, (version, organ_classes - mapped)


@pytest.mark.parametrize(
    "version, label, expected",
    [
        ("total_v1", 1, "spleen"), ("total_v1", 3, "kidney"), ("total_v1", 5, "liver"), ("total_v1", 16, "lung"),
        ("total_v1", 18, "bone"), ("total_v1", 41, "bone"), ("total_v1", 44, "heart"), ("total_v1", 48, "heart"),
        ("total_v1", 93, "background"), ("total_v1", 104, "urinary_bladder"), ("total_v1", 8, "inferior_vena_cava"),
        ("total_v2", 7, "pancreas"), ("total_v2", 51, "heart"), ("total_v2", 116, "bone"), ("total_v2", 79, "background"),
        ("total_v2", 63, "inferior_vena_cava"), ("total_v2", 64, "portal_and_splenic_vein"), ("total_v2", 15, "esophagus"),
    ],
)
def test_lookup_table_maps_totalsegmentator_labels(version, label, expected):
    class_map = load_class_map()
    table = class_map.lookup_table(totalsegmentator_label_maps()[version], version)
    assert class_map.class_names[table[label]] == expected


def test_lookup_table_marks_values_outside_the_source_map():
    class_map = load_class_map()
    table = class_map.lookup_table({1: "spleen", 5: "liver"}, "total_v1")
    assert table.tolist() == [0, 1, -1, -1, -1, 4]


def test_shipped_totalsegmentator_maps_match_the_known_sizes():
    maps = totalsegmentator_label_maps()
    assert len(maps["total_v1"]) == 104 and len(maps["total_v2"]) == 117


@pytest.mark.parametrize("alias, canonical", [("v1", "total_v1"), ("1", "total_v1"), ("V2", "total_v2"), ("total_v2", "total_v2")])
def test_version_aliases(alias, canonical):
    assert resolve_source_map_name(alias, ["total_v1", "total_v2"]) == canonical


def test_unknown_version_is_a_clear_error():
    with pytest.raises(GuideGenInputError, match="unknown class-map version 'v3'.*total_v1, total_v2"):
        resolve_source_map_name("v3", ["total_v1", "total_v2"])


def _write(tmp_path, content):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(content))
    return path


def test_custom_class_map_with_own_source_map(tmp_path):
    path = _write(tmp_path, {
        "name": "mine",
        "source_maps": {"my_labels": {"1": "liver", "2": "liver_vessel", "7": "lesion"}},
        "classes": [{"name": "background"}, {"name": "liver", "sources": {"my_labels": ["liver", 2]}}, {"name": "lesion", "sources": {"my_labels": ["lesion"]}}],
    })
    class_map = load_class_map(path)
    assert class_map.num_classes == 3 and class_map.tumor_class is None
    table = class_map.lookup_table(class_map.source_maps["my_labels"], "my_labels")
    assert table[[0, 1, 2, 7]].tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"classes": [{"name": "background"}, {"name": "x", "sources": {"total_v3": ["liver"]}}]}, "unknown class-map version 'total_v3'"),
        ({"classes": [{"name": "background"}, {"name": "x", "sources": {"total_v1": ["not_an_organ"]}}]}, "'not_an_organ', which is not in total_v1"),
        ({"classes": [{"name": "background"}, {"name": "x", "index": 5}]}, "indices must run 0..N-1"),
        ({"classes": [{"name": "background"}, {"name": "a"}, {"name": "a"}]}, "duplicate class names"),
        ({"classes": [{"name": "background"}]}, "at least one more class"),
        ({"classes": [{"name": "background"}, {"name": "a"}], "tumor_class": "tumour"}, "tumor_class 'tumour'"),
        ({"classes": [{"name": "background"}, {"name": "a", "sources": {"v1": ["liver"]}}, {"name": "b", "sources": {"v1": ["liver"]}}]}, "assigned to two classes"),
    ],
)
def test_bad_class_maps_are_rejected_with_the_reason(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(GuideGenInputError, match=message) as info:
        load_class_map(path)
    assert str(path) in str(info.value)


def test_missing_or_broken_class_map_file(tmp_path):
    with pytest.raises(GuideGenInputError, match="file not found"):
        load_class_map(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(GuideGenInputError, match="not readable as JSON"):
        load_class_map(broken)


def test_default_map_file_round_trips():
    class_map = load_class_map(default_class_map_path())
    assert json.loads(class_map.to_json()) == json.loads(default_class_map_path().read_text())
    assert np.array_equal(
        load_class_map().lookup_table(totalsegmentator_label_maps()["total_v1"], "total_v1"),
        class_map.lookup_table(totalsegmentator_label_maps()["total_v1"], "total_v1"),
    )


def test_body_class_map_is_the_default_map_plus_body():
    default, body = load_class_map(), load_class_map(body_class_map_path())
    assert load_class_map(body_class=True).path == body.path
    assert body.class_names == (*default.class_names, "body") and body.num_classes == 21
    assert body.body_index == 20 and body.tumor_index == default.tumor_index == 19
    assert body.sources == default.sources  # same organ mapping: indices 0..19 mean the same in both
    assert default.body_index is None


@pytest.mark.parametrize(
    "body_class, extra, message",
    [("nope", {}, "body_class 'nope' is not one of the classes"),
     ("tumor", {}, "must be a class of its own"),
     ("body", {"sources": {"total_v1": ["spleen"]}}, "derived from the CT; remove its 'sources'")],
)
def test_bad_body_class_declarations(tmp_path, body_class, extra, message):
    raw = {"tumor_class": "tumor", "body_class": body_class,
           "classes": [{"name": "background"}, {"name": "tumor"}, {"name": "body", **extra}]}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(GuideGenInputError, match=message):
        load_class_map(path)


def test_asking_for_a_body_class_from_a_map_without_one(tmp_path):
    with pytest.raises(GuideGenInputError, match="has no body_class.*class_map_body.json"):
        load_class_map(default_class_map_path(), body_class=True)
