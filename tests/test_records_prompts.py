import json

import pytest

from custom_components.data.prompts import NO_INFORMATION_PROMPT, record_to_prompt
from custom_components.data.records import RECORD_FIELDS, load_records, normalize_record, read_records
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


# ---------------------------------------------------------------- issue 16: one bad row fails only its case


def test_bad_field_rejects_only_its_row_naming_line_and_column(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("case_id,age,sex\na,50,M\nb,-4,F\nc,70,F\n")
    table = read_records(path)
    assert list(table.records) == ["a", "c"]
    assert list(table.rejected) == ["b"]
    assert "records.csv line 3" in table.rejected["b"] and "'age' = '-4' must be a whole number 0..120" in table.rejected["b"]
    with pytest.raises(GuideGenInputError, match="line 3"):  # the strict reader still refuses the file
        load_records(path)


def test_ragged_rows_are_refused_with_their_line(tmp_path):
    path = tmp_path / "records.csv"
    # b's diagnosis holds an unquoted comma (one field too many); c's row is one field short.
    path.write_text('case_id,age,diagnosis\na,50,"liver, metastatic"\nb,60,liver, metastatic\nc,70\n')
    table = read_records(path)
    assert list(table.records) == ["a"] and table.records["a"]["diagnosis"] == "liver, metastatic"
    assert "None" not in table.records["a"] and None not in table.records["a"]
    assert set(table.rejected) == {"b", "c"}
    assert "line 3" in table.rejected["b"] and "4 fields but the header has 3" in table.rejected["b"]
    assert "quote" in table.rejected["b"]
    assert "line 4" in table.rejected["c"] and "2 fields but the header has 3" in table.rejected["c"]


def test_line_numbers_count_quoted_line_breaks(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text('case_id,age,remarks\na,50,"two\nlines"\nb,200,x\n')
    assert "records.csv line 4" in read_records(path).rejected["b"]


def test_unknown_columns_warn_once_with_the_closest_known_name(tmp_path, caplog):
    path = tmp_path / "records.csv"
    path.write_text("case_id,tumor_site,Age,site_hospital\na,liver,50,A\nb,kidney,60,B\n")
    with caplog.at_level("WARNING"):
        table = read_records(path)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 3, warnings  # one per unknown column, not one per row
    site = next(w for w in warnings if "'tumor_site'" in w)
    assert "did you mean 'tumor_organ'" in site and str(path) in site
    assert "did you mean 'age'" in next(w for w in warnings if "'Age'" in w)
    assert table.unknown_columns == {"tumor_site": "tumor_organ", "Age": "age", "site_hospital": None}
    assert table.records["a"]["tumor_site"] == "liver"  # kept, as before


def test_row_without_case_id_is_rejected_under_its_location(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("case_id,age\n,1\nb,2\n")
    table = read_records(path)
    assert list(table.records) == ["b"]
    (location, message), = table.rejected.items()
    assert location.endswith("line 2") and "'case_id' is missing" in message


def test_duplicate_case_ids_reject_only_that_case(tmp_path):
    path = tmp_path / "records.csv"
    path.write_text("case_id,age\na,1\nb,2\na,3\n")
    table = read_records(path)
    assert list(table.records) == ["b"]
    assert "duplicate case ids" in table.rejected["a"] and "line 2" in table.rejected["a"] and "line 4" in table.rejected["a"]
