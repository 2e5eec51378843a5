import json

import pytest

from custom_components.data.prompts import NO_INFORMATION_PROMPT, record_to_prompt
from custom_components.data.records import RECORD_FIELDS, load_records, normalize_record
from custom_components.errors import GuideGenInputError

FULL = {
    "case_id": "c1", "age": 63, "sex": "male", "race": "White", "diagnosis": "hepatocellular carcinoma",
    "tumor_organ": "liver", "tumor_count": 2, "tumor_size_mm": 23.5, "stage": "II", "remarks": None,
}


def test_full_record_follows_the_paper_template():
    assert record_to_prompt(FULL) == (
        "The patient is a 63-year-old White male. In this imaging, the patient's condition is described as "
        "hepatocellular carcinoma, with two tumors in the liver, the largest measuring 23.5 mm, stage II."
    )


def test_single_tumor_and_remarks():
    record = {**FULL, "tumor_count": 1, "tumor_size_mm": 20.0, "tumor_organ": "urinary_bladder", "remarks": "follow-up scan"}
    assert record_to_prompt(record).endswith(
        "hepatocellular carcinoma, with a tumor in the urinary bladder, measuring 20 mm, stage II; follow-up scan."
    )


def test_healthy_record():
    record = {"case_id": "c", "sex": "female", "diagnosis": "no abnormality", "tumor_count": 0}
    assert record_to_prompt(record) == (
        "The patient is female. In this imaging, the patient's condition is described as no abnormality, with no tumor."
    )


@pytest.mark.parametrize("age, article", [(8, "an"), (11, "an"), (18, "an"), (80, "an"), (85, "an"), (63, "a"), (1, "a"), (100, "a")])
def test_indefinite_article_follows_spoken_age(age, article):
    assert record_to_prompt({"age": age, "sex": "male"}).startswith(f"The patient is {article} {age}-year-old male.")


def test_article_before_race_and_missing_sex():
    assert record_to_prompt({"race": "Asian", "sex": "female"}) == "The patient is an Asian female."
    assert record_to_prompt({"age": 40}) == "The patient is a 40-year-old person."


@pytest.mark.parametrize("drop", [f for f in RECORD_FIELDS if f != "case_id"])
def test_missing_fields_are_omitted_cleanly(drop):
    record = {k: v for k, v in FULL.items() if k != drop}
    prompt = record_to_prompt(record)
    for artefact in ("None", "  ", ", ,", ",,", " ,", "..", "with ,", "the largest measuring None"):
        assert artefact not in prompt, (drop, prompt)
    assert prompt.endswith(".") and prompt.startswith(("The patient", "In this imaging"))


def test_only_clinical_information():
    assert record_to_prompt({"diagnosis": "renal cell carcinoma"}) == (
        "In this imaging, the patient's condition is described as renal cell carcinoma."
    )
    assert record_to_prompt({"tumor_organ": "kidney"}) == (
        "In this imaging, the patient's condition is described as a tumor in the kidney."
    )


def test_empty_record_gives_the_no_information_prompt():
    assert record_to_prompt({"case_id": "x"}) == NO_INFORMATION_PROMPT
    assert record_to_prompt(normalize_record({"case_id": "x", "age": "", "sex": "nan"})) == NO_INFORMATION_PROMPT


def test_prompt_is_deterministic():
    assert len({record_to_prompt(dict(FULL)) for _ in range(5)}) == 1


def test_normalize_record_types_and_aliases():
    record = normalize_record({"case_id": " 7 ", "age": "63.0", "sex": "F", "tumor_count": "3", "tumor_size_mm": "12", "stage": "Stage IIIa", "diagnosis": "  liver   cancer ", "site_hospital": "A"})
    assert record["case_id"] == "7" and record["age"] == 63 and record["sex"] == "female"
    assert record["tumor_count"] == 3 and record["tumor_size_mm"] == 12.0 and record["stage"] == "IIIa"
    assert record["diagnosis"] == "liver cancer"
    assert record["site_hospital"] == "A"  # unknown columns are kept
    assert record["race"] is None


@pytest.mark.parametrize(
    "field, value, message",
    [("age", "sixty", "'age' = 'sixty' must be a whole number 0..120"), ("age", 130, "0..120"), ("age", 40.5, "whole number"),
     ("tumor_count", -1, "'tumor_count' = -1 must be a whole number >= 0"), ("tumor_size_mm", "0", "positive number"),
     ("tumor_size_mm", "inf", "positive number")],
)
def test_bad_field_values_name_the_field_and_place(field, value, message):
    with pytest.raises(GuideGenInputError, match="records.csv line 3") as info:
        normalize_record({"case_id": "a", field: value}, where="records.csv line 3")
    assert message in str(info.value)


def test_load_records_csv(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("case_id,age,sex,diagnosis,extra\na,50,M,x,1\nb,,F,,\n")
    records = load_records(path)
    assert list(records) == ["a", "b"]
    assert records["a"]["age"] == 50 and records["a"]["extra"] == "1" and records["b"]["age"] is None


@pytest.mark.parametrize(
    "content",
    [
        [{"case_id": "a", "age": 50}, {"case_id": "b"}],
        {"records": [{"case_id": "a", "age": 50}, {"case_id": "b"}]},
        {"a": {"age": 50}, "b": {}},
    ],
)
def test_load_records_json_forms(tmp_path, content):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(content))
    records = load_records(path)
    assert list(records) == ["a", "b"] and records["a"]["age"] == 50


def test_duplicate_case_ids_are_named_with_their_lines(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("case_id,age\na,1\nb,2\na,3\n")
    with pytest.raises(GuideGenInputError, match=r"duplicate case ids .*'a' at .*line 2, .*line 4"):
        load_records(path)


def test_bad_record_files(tmp_path):
    with pytest.raises(GuideGenInputError, match="not found"):
        load_records(tmp_path / "missing.csv")
    no_id = tmp_path / "no_id.csv"
    no_id.write_text("id,age\na,1\n")
    with pytest.raises(GuideGenInputError, match="'case_id' column"):
        load_records(no_id)
    empty_id = tmp_path / "empty_id.csv"
    empty_id.write_text("case_id,age\n,1\n")
    with pytest.raises(GuideGenInputError, match="line 2: 'case_id' is missing"):
        load_records(empty_id)
    wrong = tmp_path / "records.txt"
    wrong.write_text("x")
    with pytest.raises(GuideGenInputError, match=".csv or .json"):
        load_records(wrong)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(GuideGenInputError, match="not readable"):
        load_records(broken)
