"""Free text -> record (issue 15): the parser on hard phrasings, the generate rewrite, the shared tumor count.

The table below was written by hand, as a careful reader would annotate each sentence, before the parser was tuned on
it: abbreviations, words in any order, typos within reason, several organs, negations. The parser must get at least
95 % of its fields right, and every field it gets wrong is listed in KNOWN_LIMITATIONS with the reason; the test fails
when a new miss appears and when a listed one is fixed (so the list stays true).

Three annotations were corrected after the first run, each an omission against the rules the issue states: the age
in "Female, 70, ..." and the side in "Kidney cancer, left, ..." and "renal: 2 masses (right), ..." (laterality is kept
in remarks). Against the annotations as first written the parser scored 97.6 %.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from custom_components.data.free_text import is_template_prompt, parse_free_text
from custom_components.data.demo.records import make_phantom_record
from custom_components.data.prompts import record_to_prompt, stated_tumor_count
from custom_components.data.requests import load_requests, request_from_text
from custom_components.errors import GuideGenInputError

# (phrasing, the fields a careful reader finds in it)
PHRASINGS: list[tuple[str, dict[str, Any]]] = [
    ('63 yo M with HCC, 2 lesions in the liver, largest 3 cm, stage II',
     dict(age=63, sex='male', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=2, tumor_size_mm=30.0, stage='II')),
    ('58yo F, Hispanic, RCC of the left kidney, 4.2 x 3 cm, stage 1',
     dict(age=58, sex='female', race='Hispanic or Latino', diagnosis='renal cell carcinoma', tumor_organ='kidney', tumor_size_mm=42.0, stage='I', remarks='left kidney')),
    ('Female, 70, pancreatic adenocarcinoma with a 25 mm mass in the pancreatic head, stage III',
     dict(age=70, sex='female', diagnosis='pancreatic adenocarcinoma', tumor_organ='pancreas', tumor_count=1, tumor_size_mm=25.0, stage='III')),
    ('Stage IV NSCLC in a 66-year-old Asian man; three pulmonary nodules, the biggest 18mm',
     dict(age=66, sex='male', race='Asian', diagnosis='non-small cell lung cancer', tumor_organ='lung', tumor_count=3, tumor_size_mm=18.0, stage='IV')),
    ('no tumor, healthy 45 year old woman',
     dict(age=45, sex='female', diagnosis='no abnormality', tumor_count=0)),
    ('CT of a 52-year-old black male without lesions',
     dict(age=52, sex='male', race='Black or African American', tumor_count=0)),
    ('Caucasian gentleman aged 81, colorectal carcinoma, multiple liver mets up to 4.5 cm',
     dict(age=81, sex='male', race='White', diagnosis='colorectal carcinoma', tumor_organ='liver', tumor_count_min=2, tumor_size_mm=45.0)),
    ('gastric cancer, stage 3, 61 y/o male, one tumor in the stomach measuring 5cm',
     dict(age=61, sex='male', diagnosis='gastric cancer', tumor_organ='stomach', tumor_count=1, tumor_size_mm=50.0, stage='III')),
    ('A seventy-two-year-old woman with a solitary hepatic lesion of 2.1 cm, likely hepatocellular carcinoma',
     dict(age=72, sex='female', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=1, tumor_size_mm=21.0)),
    ('Pt is 49, female, African-American. Dx: urothelial carcinoma of the bladder. Two bladder masses (1.2 and 2.8 cm). Stage II.',
     dict(age=49, sex='female', race='Black or African American', diagnosis='urothelial carcinoma of the bladder', tumor_organ='urinary_bladder', tumor_count=2, tumor_size_mm=28.0, stage='II')),
    ('hepatocelular carcinma, 3 lesions in liver, 40 mm largest, stage IIIa, 67M',
     dict(age=67, sex='male', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=3, tumor_size_mm=40.0, stage='IIIA')),
    ('splenic lymphoma in a 39-year-old female, single splenic mass 6 cm',
     dict(age=39, sex='female', diagnosis='splenic lymphoma', tumor_organ='spleen', tumor_count=1, tumor_size_mm=60.0)),
    ('The patient, a 55 year old man, has no evidence of malignancy.',
     dict(age=55, sex='male', tumor_count=0)),
    ('76F w/ lung adenocarcinoma, RUL nodule 22 mm, T1cN0M0',
     dict(age=76, sex='female', diagnosis='lung adenocarcinoma', tumor_organ='lung', tumor_count=1, tumor_size_mm=22.0, stage='T1CN0M0', remarks='right lung')),
    ('two renal masses on the right, 3.1 cm and 1.4 cm, clear cell RCC, 60 yo man',
     dict(age=60, sex='male', diagnosis='clear cell renal cell carcinoma', tumor_organ='kidney', tumor_count=2, tumor_size_mm=31.0, remarks='right kidney')),
    ('Asian female, 44. Normal study, no focal lesions.',
     dict(age=44, sex='female', race='Asian', diagnosis='no abnormality', tumor_count=0)),
    ('Liver and lung metastases from colorectal cancer; 68-year-old white woman',
     dict(age=68, sex='female', race='White', diagnosis='liver and lung metastases from colorectal cancer', tumor_organ='liver', tumor_count_min=2, remarks='also multiple tumors in the lung')),
    ('pancreatc cancer stage four, tumour of 32 mm in the tail of the pancreas, man of 57',
     dict(age=57, sex='male', diagnosis='pancreatic cancer', tumor_organ='pancreas', tumor_count=1, tumor_size_mm=32.0, stage='IV')),
    ('Colon ca, 1 tumor in the sigmoid, 4 cm, stage 2, age 71, M',
     dict(age=71, sex='male', diagnosis='colon cancer', tumor_organ='colon', tumor_count=1, tumor_size_mm=40.0, stage='II')),
    ('She is 63. Hepatic metastases x3, largest measuring 27 mm; primary breast cancer.',
     dict(age=63, sex='female', diagnosis='hepatic metastases', tumor_organ='liver', tumor_count=3, tumor_size_mm=27.0)),
    ('HCC, 3cm, stage II',
     dict(diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_size_mm=30.0, stage='II')),
    ('adrenal mass on the left, 3.5 cm, 50 year old man',
     dict(age=50, sex='male', tumor_organ='adrenal_gland', tumor_count=1, tumor_size_mm=35.0, remarks='left adrenal gland')),
    ('A 34-year-old hispanic male with several small pulmonary nodules, the largest 8 mm',
     dict(age=34, sex='male', race='Hispanic or Latino', tumor_organ='lung', tumor_count_min=2, tumor_size_mm=8.0)),
    ('esophageal cancer, a 5 cm mass in the distal esophagus, stage III, 66 years old male',
     dict(age=66, sex='male', diagnosis='esophageal cancer', tumor_organ='esophagus', tumor_count=1, tumor_size_mm=50.0, stage='III')),
    ('Renal cell carcinoma of the right kidney measuring 7 cm with a solitary lung metastasis, stage 4, 59 yo woman',
     dict(age=59, sex='female', diagnosis='renal cell carcinoma', tumor_organ='kidney', tumor_count=1, tumor_size_mm=70.0, stage='IV', remarks='right kidney; also a tumor in the lung')),
    ('no liver lesions. 2 nodules in the left lung (9 mm, 12 mm). 70 y.o. female',
     dict(age=70, sex='female', tumor_organ='lung', tumor_count=2, tumor_size_mm=12.0, remarks='left lung')),
    ('White woman in her 60s with PDAC',
     dict(sex='female', race='White', diagnosis='pancreatic ductal adenocarcinoma', tumor_organ='pancreas')),
    ('man, 80, GIST of the stomach, 9 cm',
     dict(age=80, sex='male', diagnosis='gastrointestinal stromal tumor of the stomach', tumor_organ='stomach', tumor_size_mm=90.0)),
    ('Multiple bilateral renal lesions, largest 2.5 cm on the left; 47F',
     dict(age=47, sex='female', tumor_organ='kidney', tumor_count_min=2, tumor_size_mm=25.0, remarks='bilateral kidney')),
    ('Stage I seminoma... just kidding: a 30-year-old male, unremarkable abdomen',
     dict(age=30, sex='male', diagnosis='no abnormality', tumor_count=0)),
    ('hepatocellular carcinoma with two tumors in the liver, the largest measuring 23.5 mm, stage II, 63 year old white man',
     dict(age=63, sex='male', race='White', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=2, tumor_size_mm=23.5, stage='II')),
    ('female aged 38 presenting with a leison in segment 7, 15 mm',
     dict(age=38, sex='female', tumor_organ='liver', tumor_count=1, tumor_size_mm=15.0)),
    ('Metastatic pancreatic cancer: pancreatic head tumor 3 cm + 4 liver mets; 65 M',
     dict(age=65, sex='male', diagnosis='metastatic pancreatic cancer', tumor_organ='pancreas', tumor_count=1, tumor_size_mm=30.0, remarks='also four tumors in the liver')),
    ('Kidney cancer, left, 5.5 cm, stage 2, patient 72 years, male',
     dict(age=72, sex='male', diagnosis='kidney cancer', tumor_organ='kidney', tumor_size_mm=55.0, stage='II', remarks='left kidney')),
    ('tumor-free CT of a 29 yo female',
     dict(age=29, sex='female', tumor_count=0)),
    ('Negative for metastases. 3.2 cm mass in the right lung, NSCLC stage IIB, 71M',
     dict(age=71, sex='male', diagnosis='non-small cell lung cancer', tumor_organ='lung', tumor_count=1, tumor_size_mm=32.0, stage='IIB', remarks='right lung')),
    ('Cholangiocarcinoma; one 4 cm intrahepatic mass; 62-yr-old woman',
     dict(age=62, sex='female', diagnosis='cholangiocarcinoma', tumor_organ='liver', tumor_count=1, tumor_size_mm=40.0)),
    ('55-year-old Asian female with two gastric tumours (35 and 20 mm), gastric adenocarcinoma, stage III',
     dict(age=55, sex='female', race='Asian', diagnosis='gastric adenocarcinoma', tumor_organ='stomach', tumor_count=2, tumor_size_mm=35.0, stage='III')),
    ('rectal cancer T3N1M0, 1 rectal mass 6cm, male 58',
     dict(age=58, sex='male', diagnosis='rectal cancer', tumor_organ='colon', tumor_count=1, tumor_size_mm=60.0, stage='T3N1M0')),
    ('colorectal carcinoma with three tumors in the colon, the largest measuring 41 mm, stage I. 77-year-old Black or African American female.',
     dict(age=77, sex='female', race='Black or African American', diagnosis='colorectal carcinoma', tumor_organ='colon', tumor_count=3, tumor_size_mm=41.0, stage='I')),
    ('Sixty-one year old man. Bladder cancer, single lesion 1.8 cm.',
     dict(age=61, sex='male', diagnosis='bladder cancer', tumor_organ='urinary_bladder', tumor_count=1, tumor_size_mm=18.0)),
    ('liver: 5 lesions, max 3.3 cm; dx hepatoblastoma; 12-year-old boy',
     dict(age=12, sex='male', diagnosis='hepatoblastoma', tumor_organ='liver', tumor_count=5, tumor_size_mm=33.0)),
    ('Mr. X, 64, a solitary pulmonary nodule, 14 mm, left lower lobe',
     dict(age=64, sex='male', tumor_organ='lung', tumor_count=1, tumor_size_mm=14.0, remarks='left lung')),
    ('50F, no abnormalities detected',
     dict(age=50, sex='female', diagnosis='no abnormality', tumor_count=0)),
    ('hepatocellular carcinoma, stage II, The lesion is 30 mm. 59 yo male; one tumour in the liver',
     dict(age=59, sex='male', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=1, tumor_size_mm=30.0, stage='II')),
    ('An 84-year-old lady with pancreatic ductal adenocarcinoma, a 2.2 cm tumor in the uncinate process',
     dict(age=84, sex='female', diagnosis='pancreatic ductal adenocarcinoma', tumor_organ='pancreas', tumor_count=1, tumor_size_mm=22.0)),
    ('Stage 3 colon cancer in a 46 year-old Latino man with two colonic masses',
     dict(age=46, sex='male', race='Hispanic or Latino', diagnosis='colon cancer', tumor_organ='colon', tumor_count=2, stage='III')),
    ('renal: 2 masses (right), 40 and 22 mm; RCC; F 53',
     dict(age=53, sex='female', diagnosis='renal cell carcinoma', tumor_organ='kidney', tumor_count=2, tumor_size_mm=40.0, remarks='right kidney')),
    ('gastric GIST 6 cm, 70yo woman, no metastases',
     dict(age=70, sex='female', diagnosis='gastric gastrointestinal stromal tumor', tumor_organ='stomach', tumor_size_mm=60.0)),
    ('Small bowel neuroendocrine tumor, 1.5 cm, with multiple hepatic metastases, 60-year-old male',
     dict(age=60, sex='male', diagnosis='small bowel neuroendocrine tumor', tumor_organ='small_bowel', tumor_count=1, tumor_size_mm=15.0, remarks='also multiple tumors in the liver')),
    ('woman 66 yrs old, lung cancer stage IV, 4 nodules in the lungs, biggest 2,5 cm',
     dict(age=66, sex='female', diagnosis='lung cancer', tumor_organ='lung', tumor_count=4, tumor_size_mm=25.0, stage='IV')),
    ('healthy volunteer, 27 years old, male, white',
     dict(age=27, sex='male', race='White', diagnosis='no abnormality', tumor_count=0)),
    ('Findings: 3 hypodense liver lesions, largest 19mm. History: colon cancer. Patient: 74 yo F.',
     dict(age=74, sex='female', diagnosis='colon cancer', tumor_organ='liver', tumor_count=3, tumor_size_mm=19.0)),
    ('gallbladder carcinoma, 35 mm mass in the gallbladder, 69 yo Asian woman, stage II',
     dict(age=69, sex='female', race='Asian', diagnosis='gallbladder carcinoma', tumor_organ='gallbladder', tumor_count=1, tumor_size_mm=35.0, stage='II')),
    ('A 5 cm left adrenal adrenocortical carcinoma in a 45 year old female',
     dict(age=45, sex='female', diagnosis='adrenal adrenocortical carcinoma', tumor_organ='adrenal_gland', tumor_size_mm=50.0, remarks='left adrenal gland')),
    ('Two tumors in the liver and one in the pancreas, 40 mm largest, 57 M',
     dict(age=57, sex='male', tumor_organ='liver', tumor_count=2, tumor_size_mm=40.0, remarks='also a tumor in the pancreas')),
    ('lung nodule 7mm RLL, former smoker, 68 M, no other lesions',
     dict(age=68, sex='male', tumor_organ='lung', tumor_count=1, tumor_size_mm=7.0, remarks='right lung')),
    ('Twelve liver metastases, largest 5 cm, from pancreatic cancer, 61-year-old female',
     dict(age=61, sex='female', diagnosis='liver metastases from pancreatic cancer', tumor_organ='liver', tumor_count=12, tumor_size_mm=50.0)),
    ('female 55, white, hcc stage 1, solitary 18 mm liver nodule',
     dict(age=55, sex='female', race='White', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=1, tumor_size_mm=18.0, stage='I')),
    ('Colorectal cancer with liver metastasis: one 26 mm lesion in hepatic segment VIII. 5 mm slices. 70-year-old man',
     dict(age=70, sex='male', diagnosis='colorectal cancer', tumor_organ='liver', tumor_count=1, tumor_size_mm=26.0)),
    ('71 year old, male, kidney: no tumor; pancreas: 1 mass 28 mm (adenocarcinoma)',
     dict(age=71, sex='male', diagnosis='adenocarcinoma', tumor_organ='pancreas', tumor_count=1, tumor_size_mm=28.0)),
    ('patient (F, 42) with bone metastases from breast ca, multiple vertebral lesions',
     dict(age=42, sex='female', diagnosis='bone metastases from breast cancer', tumor_organ='bone', tumor_count_min=2)),
    ('Stomach: 2 tumors, 3 and 4 cm. Diagnosis gastric carcinoma stage two. 75yo male Asian.',
     dict(age=75, sex='male', race='Asian', diagnosis='gastric carcinoma', tumor_organ='stomach', tumor_count=2, tumor_size_mm=40.0, stage='II')),
    ("The patient is a 63-year-old White male. In this imaging, the patient's condition is described as hepatocellular carcinoma, with a tumor in the liver, measuring 30 mm, stage II.",
     dict(age=63, sex='male', race='White', diagnosis='hepatocellular carcinoma', tumor_organ='liver', tumor_count=1, tumor_size_mm=30.0, stage='II')),
    ('He has a 4.1cm right renal mass, ccRCC, stage 1, age 57',
     dict(age=57, sex='male', diagnosis='clear cell renal cell carcinoma', tumor_organ='kidney', tumor_count=1, tumor_size_mm=41.0, stage='I', remarks='right kidney')),
]

# (start of the phrasing, field) -> (expected, what the parser returns, why)
KNOWN_LIMITATIONS: dict[tuple[str, str], tuple[Any, Any, str]] = {
    ("Renal cell carcinoma of the right kidney", "tumor_count"): (
        1, None, "a disease word ('carcinoma') is never counted as a tumor, only tumor words (lesion, mass, ...) are"),
    ("man, 80, GIST of the stomach", "tumor_count"): (
        None, 1, "GIST is read as 'gastrointestinal stromal tumor', and a singular tumor word counts as one tumor"),
    ("gastric GIST 6 cm", "tumor_count"): (
        None, 1, "as above: the expanded 'tumor' counts as one tumor"),
    ("Stage I seminoma... just kidding", "diagnosis"): (
        "no abnormality", "seminoma", "a retraction ('just kidding') is not understood: the first disease word wins"),
    ("Stage I seminoma... just kidding", "stage"): (
        None, "I", "as above: the retracted stage is kept"),
    ("Mr. X, 64", "age"): (
        64, None, "a bare number is an age only right after a word for the patient ('female, 44'), not after a name"),
    ("Twelve liver metastases, largest 5 cm, from", "diagnosis"): (
        "liver metastases from pancreatic cancer", "liver metastases",
        "'from <primary>' is joined to the diagnosis only right after it, not across a size in between"),
}


def _same(expected: Any, parsed: Any) -> bool:
    if isinstance(expected, str) and isinstance(parsed, str):
        return expected.lower() == parsed.lower()
    return expected == parsed


def _misses() -> tuple[dict[tuple[str, str], tuple[Any, Any]], int]:
    """Every (phrasing, field) the parser gets wrong (a wrong, missing or extra field), and the number of fields."""
    misses, fields = {}, 0
    for text, expected in PHRASINGS:
        parsed = parse_free_text(text)
        for name in sorted(set(expected) | set(parsed)):
            fields += 1
            if not _same(expected.get(name), parsed.get(name)):
                misses[(text, name)] = (expected.get(name), parsed.get(name))
    return misses, fields


def test_the_table_is_large_enough_and_names_only_record_fields():
    assert len(PHRASINGS) >= 60 and len({text for text, _ in PHRASINGS}) == len(PHRASINGS)
    allowed = {"age", "sex", "race", "diagnosis", "tumor_organ", "tumor_count", "tumor_count_min", "tumor_size_mm",
               "stage", "remarks"}
    assert all(set(expected) <= allowed for _, expected in PHRASINGS)


def test_field_accuracy_is_at_least_95_percent_and_every_miss_is_a_listed_limitation():
    misses, fields = _misses()
    accuracy = 1 - len(misses) / fields
    assert accuracy >= 0.95, f"field accuracy {accuracy:.3f}"
    listed = {}
    for (start, name), (expected, parsed, _) in KNOWN_LIMITATIONS.items():
        matching = [text for text, _ in PHRASINGS if text.startswith(start)]
        assert len(matching) == 1, f"KNOWN_LIMITATIONS key {start!r} must start exactly one phrasing"
        listed[(matching[0], name)] = (expected, parsed)
    unlisted = {key: value for key, value in misses.items() if key not in listed}
    fixed = [key for key in listed if key not in misses]
    assert not unlisted, f"new misses (fix them or list them in KNOWN_LIMITATIONS): {unlisted}"
    assert not fixed, f"listed limitations the parser now gets right (remove them from KNOWN_LIMITATIONS): {fixed}"
    assert {key: misses[key] for key in listed} == listed  # each listed miss is exactly as described


def test_template_prompts_read_back_into_their_records():
    """The training template is read without loss: record -> prompt -> parse gives the record back."""
    for seed in range(120):
        record = make_phantom_record(f"case_{seed}", np.random.default_rng(seed))
        stated = {name: value for name, value in record.items() if value is not None and name != "case_id"}
        assert parse_free_text(record_to_prompt(record)) == stated, record_to_prompt(record)


def test_multiple_tumors_are_at_least_two_and_written_so_in_the_template():
    record = parse_free_text("67 yo woman with several hepatic metastases, largest 2 cm")
    assert "tumor_count" not in record and record["tumor_count_min"] == 2 and stated_tumor_count(record) == (2, True)
    prompt = record_to_prompt(record)
    assert "with multiple tumors in the liver, the largest measuring 20 mm" in prompt
    assert parse_free_text(prompt) == record


def test_text_without_fields_and_organs_outside_the_class_map():
    assert parse_free_text("a torso, please") == {}
    assert parse_free_text("The patient's condition is not described.") == {}
    breast = parse_free_text("a 3 cm breast mass")
    assert "tumor_organ" not in breast and breast["tumor_count"] == 1
    # tumor_organ is always a name of the given class map: without 'liver' in it, a liver lesion has no organ
    assert parse_free_text("two liver lesions", class_names=("background", "kidney", "tumor")) == {"tumor_count": 2}
    assert parse_free_text("two liver lesions")["tumor_organ"] == "liver"


def test_is_template_prompt():
    assert is_template_prompt("The patient is a 63-year-old male. In this imaging, the patient's condition is described "
                              "as liver cirrhosis with ascites.")  # kept as given even where the parser reads little
    assert is_template_prompt("In this imaging, the patient's condition is described as no abnormality.")
    assert is_template_prompt("The patient is a 63-year-old White male.")
    assert not is_template_prompt("63 yo M, HCC")
    assert not is_template_prompt("The patient is 63 with HCC.")  # the template's first words, not its wording
    assert request_from_text("The patient is 63 with HCC.", "x").prompt == (
        "The patient is a 63-year-old person. In this imaging, the patient's condition is described as hepatocellular "
        "carcinoma, with a tumor in the liver.")


# ------------------------------------------------------------------------------------------------ generate rewrite


def test_free_text_requests_are_rewritten_into_the_template_and_keep_the_text_as_given():
    given = "58yo F, Hispanic, RCC of the left kidney, 4.2 x 3 cm, stage 1"
    request = request_from_text(given, "--prompt")
    assert request.given_prompt == given
    assert request.prompt == (
        "The patient is a 58-year-old Hispanic or Latino female. In this imaging, the patient's condition is described "
        "as renal cell carcinoma, with a tumor in the kidney, measuring 42 mm, stage I; left kidney."
    )
    assert request.record["tumor_organ"] == "kidney" and request.record["tumor_size_mm"] == 42.0
    # a prompt already in the template is used as given, with the fields read from it
    template = record_to_prompt({"age": 63, "sex": "male", "diagnosis": "hepatocellular carcinoma", "tumor_organ": "liver", "tumor_count": 2})
    kept = request_from_text(template, "--prompt")
    assert kept.prompt == template and kept.given_prompt is None and kept.record["tumor_count"] == 2
    # nothing to read: the text is used as given
    plain = request_from_text("a  torso", "x")
    assert (plain.prompt, plain.given_prompt, plain.record) == ("a torso", None, {})
    with pytest.raises(GuideGenInputError, match="empty prompt"):
        request_from_text("  ", "prompts.txt line 3")


def test_prompt_files_rewrite_free_text_rows(tmp_path):
    (tmp_path / "p.txt").write_text("63 yo M, HCC, two liver lesions, largest 3 cm\n")
    (tmp_path / "p.csv").write_text('prompt\n"no tumor, healthy 45 year old woman"\n')
    (txt,), _ = load_requests(prompts_file=tmp_path / "p.txt")
    assert txt.prompt.endswith("hepatocellular carcinoma, with two tumors in the liver, the largest measuring 30 mm.")
    (csv,), _ = load_requests(prompts_file=tmp_path / "p.csv")
    assert csv.prompt == ("The patient is a 45-year-old female. In this imaging, the patient's condition is described as "
                          "no abnormality, with no tumor.") and csv.given_prompt == "no tumor, healthy 45 year old woman"


def test_generate_records_the_prompt_as_given_and_as_rewritten(tmp_path):
    """`guidegen generate --prompt <free text>` on tiny untrained models (the plumbing, not the weights)."""
    from custom_components.runs.untrained import write_untrained_models
    from test_generate import STEPS, TINY, _models, guidegen

    models = write_untrained_models(tmp_path / "models", mask_size=(16, 16, 16), image_size=(32, 32, 32), architectures=TINY,
                                    mask_spacing_mm=(6.0, 6.0, 6.0))
    given = "Pt 71M, pancreatic ca, 1 mass 28 mm in the pancreatic head, stage 2"
    result = guidegen("generate", "--prompt", given, "--output_dir", str(tmp_path / "out"), *STEPS, *_models(models),
                      cwd=tmp_path, check=True)
    assert "free text rewritten into the training template" in result.stderr
    folder = tmp_path / "out" / "sample_00000"
    record = json.loads((folder / "record.json").read_text())
    rewritten = ("The patient is a 71-year-old male. In this imaging, the patient's condition is described as pancreatic "
                 "cancer, with a tumor in the pancreas, measuring 28 mm, stage II.")
    assert record["given_prompt"] == given and record["prompt"] == rewritten
    assert (folder / "prompt.txt").read_text().strip() == rewritten  # what the models were given
    assert record["record"] == {"age": 71, "sex": "male", "diagnosis": "pancreatic cancer", "tumor_organ": "pancreas",
                                "tumor_count": 1, "tumor_size_mm": 28.0, "stage": "II"}
    (sample,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"]
    assert sample["prompt"] == rewritten and sample["given_prompt"] == given
