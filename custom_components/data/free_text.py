"""Free-text clinical prompt -> record fields (the inverse of :func:`~custom_components.data.prompts.record_to_prompt`).

The paper trains on prompts written from a fixed template and names free-form prompts as a limitation. This module
reads a free-form sentence such as

    "58yo F, Hispanic, RCC of the left kidney, 4.2 x 3 cm, stage 1"

and returns the record fields it finds (``age, sex, race, diagnosis, tumor_organ, tumor_count, tumor_size_mm, stage,
remarks``), so that ``guidegen generate`` can rewrite the prompt into the training template and ``guidegen evaluate``
can score the sample's tumors. It is rule-based (no model, nothing downloaded) and deterministic.

What it reads, and the rules it follows when a sentence is ambiguous:

- **age**: "63-year-old", "63 yo", "63y/o", "aged 63", "age: 63", "63M", "F/45", "sixty-three-year-old".
- **sex**: male/man/gentleman/Mr, female/woman/lady/Mrs/Ms, the letter after or before an age ("63M"), "sex: f",
  and as a last resort the pronouns he/his/him or she/her.
- **race**: written with the categories of the training records ("White", "Black or African American", "Asian",
  "Hispanic or Latino", ...); "Caucasian" reads as White, "African-American" as Black or African American.
- **diagnosis**: the first disease phrase (a disease word such as carcinoma, cancer, lymphoma, metastases with the
  modifiers before it and an "of the bladder" / "from colon cancer" after it), lower case, abbreviations expanded
  (HCC, RCC, PDAC, NSCLC, CRC, GIST, mets, ca ...); "no abnormality", "unremarkable", "normal study" and "healthy"
  read as "no abnormality".
- **tumor_organ**: a class name of the class map. Organ words and adjectives are mapped onto it (hepatic -> liver,
  renal -> kidney, pulmonary -> lung, gastric -> stomach, colorectal/rectal/sigmoid -> colon, vesical -> urinary
  bladder, ...). The organ of the first tumor mentioned ("two liver lesions", "a mass in the pancreatic head") is the
  tumor organ; without one, the organ the diagnosis names ("hepatocellular carcinoma" -> liver).
- **tumor_count**: digits and number words before a tumor word (tumor, lesion, mass, nodule, metastasis ...), "a" /
  "single" / "solitary" = 1, "x3" after it; counts of the tumor organ's mentions add up ("a lesion in segment 4 and
  a lesion in segment 7"). A plural without a number ("multiple", "several", "liver lesions") is not a count: it is
  returned as ``tumor_count_min = 2`` ("at least two") and written as "multiple tumors" in the template. Mentions
  with "the"/"this"/"largest" point back at a tumor already counted and add nothing, and so does a heading
  ("liver metastasis: one 26 mm lesion ..." counts the lesion once).
- **negations**: "no tumor", "without lesions", "no evidence of malignancy", "tumor-free", "free of tumors",
  "negative for metastases", "NED": a negated mention is ignored; when nothing positive remains and no diagnosis
  names an organ ("pancreatic cancer, no metastases" still has its tumor), ``tumor_count = 0``.
- **tumor_size_mm**: the largest number given in mm or cm (the largest dimension of "3 x 2 cm"; "the largest 4 cm";
  a decimal comma "2,5 cm" reads as 2.5); not for slice thickness, and not when there is no tumor.
- **stage**: "stage II", "stage 2", "stage IIIa" (arabic numbers become roman: "stage 4" -> "IV"), or a TNM code
  ("T2N0M0") when no stage is named.
- **remarks**: what the fields cannot hold: the side of a paired organ ("left kidney") and the other organs with
  tumors ("also a tumor in the lung"); for a prompt already in the paper's template, the text after its ";".

Words a letter or two away from a known medical word are read as that word ("hepatocelular", "carcinma",
"pancreatc", "leison"); only words of six letters or more, so that short English words are never "corrected".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from custom_components.data.prompts import NO_INFORMATION_PROMPT, count_words, record_to_prompt

__all__ = ["parse_free_text", "is_template_prompt", "MULTIPLE_TUMORS_MIN_COUNT"]

MULTIPLE_TUMORS_MIN_COUNT = 2
"""``tumor_count_min`` of "multiple"/"several"/a plural without a number: at least two tumors."""

_TEMPLATE = re.compile(
    r"^\s*(?:the patient is (?P<demographics>[^.]*)\.\s*)?"
    r"(?:in this imaging, the patient's condition is described as (?P<clinical>.*?)\.?\s*)?$",
    re.IGNORECASE | re.DOTALL,
)

# ----------------------------------------------------------------------------------------------------- vocabulary

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS_WORDS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_ROMAN = {"i": "I", "ii": "II", "iii": "III", "iv": "IV", "1": "I", "2": "II", "3": "III", "4": "IV",
          "one": "I", "two": "II", "three": "III", "four": "IV"}

# Abbreviations, expanded before anything else is read (whole words, any case).
_ABBREVIATIONS = (
    ("ccrcc", "clear cell renal cell carcinoma"), ("rcc", "renal cell carcinoma"), ("hcc", "hepatocellular carcinoma"),
    ("pdac", "pancreatic ductal adenocarcinoma"), ("nsclc", "non-small cell lung cancer"),
    ("sclc", "small cell lung cancer"), ("crc", "colorectal cancer"), ("gist", "gastrointestinal stromal tumor"),
    ("icc", "intrahepatic cholangiocarcinoma"), ("pnet", "pancreatic neuroendocrine tumor"),
    ("tcc", "transitional cell carcinoma"), ("adenoca", "adenocarcinoma"), ("ca", "cancer"),
    ("mets", "metastases"), ("met", "metastasis"), ("ned", "no evidence of disease"), ("w/o", "without"),
    ("w/", "with "), ("pt", "patient"), ("hx", "history"), ("dx", "diagnosis"), ("s/p", "status post"),
    ("lt", "left"), ("rt", "right"), ("bilat", "bilateral"), ("ivc", "inferior vena cava"),
    ("tumour", "tumor"), ("tumours", "tumors"), ("oesophagus", "esophagus"), ("oesophageal", "esophageal"),
    ("caecum", "cecum"), ("caecal", "cecal"), ("centimetres", "cm"), ("centimeters", "cm"), ("centimetre", "cm"),
    ("centimeter", "cm"), ("millimetres", "mm"), ("millimeters", "mm"), ("millimetre", "mm"), ("millimeter", "mm"),
)
# Lung lobes name both the organ and the side.
_LOBES = {"rul": ("lung", "right"), "rml": ("lung", "right"), "rll": ("lung", "right"),
          "lul": ("lung", "left"), "lll": ("lung", "left")}

# Organ words -> class name. "Weak" words name an organ only when no other organ word is near
# ("segment 7" is the liver's, "the right lobe" the lung's unless "of the liver" follows).
_ORGAN_WORDS = {
    "liver": "liver", "hepatic": "liver", "hepatocellular": "liver", "intrahepatic": "liver", "hepato": "liver",
    "kidney": "kidney", "kidneys": "kidney", "renal": "kidney", "nephric": "kidney",
    "pancreas": "pancreas", "pancreatic": "pancreas", "uncinate": "pancreas",
    "colon": "colon", "colonic": "colon", "colorectal": "colon", "rectal": "colon", "rectum": "colon",
    "sigmoid": "colon", "cecum": "colon", "cecal": "colon", "rectosigmoid": "colon",
    "stomach": "stomach", "gastric": "stomach",
    "lung": "lung", "lungs": "lung", "pulmonary": "lung", "bronchogenic": "lung",
    "spleen": "spleen", "splenic": "spleen",
    "gallbladder": "gallbladder",
    "bladder": "urinary_bladder", "vesical": "urinary_bladder", "urothelial": "urinary_bladder",
    "adrenal": "adrenal_gland", "adrenals": "adrenal_gland", "adrenocortical": "adrenal_gland",
    "esophagus": "esophagus", "esophageal": "esophagus",
    "jejunum": "small_bowel", "jejunal": "small_bowel", "ileum": "small_bowel", "ileal": "small_bowel",
    "duodenum": "duodenum", "duodenal": "duodenum",
    "heart": "heart", "cardiac": "heart",
    "aorta": "aorta", "aortic": "aorta",
    "bone": "bone", "bones": "bone", "osseous": "bone", "skeletal": "bone", "vertebral": "bone", "vertebra": "bone",
    "spine": "bone", "spinal": "bone", "rib": "bone", "ribs": "bone",
}
_ORGAN_PHRASES = {  # several words, matched before single words
    "small bowel": "small_bowel", "small intestine": "small_bowel", "large bowel": "colon", "large intestine": "colon",
    "gall bladder": "gallbladder", "urinary bladder": "urinary_bladder", "inferior vena cava": "inferior_vena_cava",
    "portal vein": "portal_and_splenic_vein", "splenic vein": "portal_and_splenic_vein",
    "adrenal gland": "adrenal_gland", "adrenal glands": "adrenal_gland",
}
_WEAK_ORGAN_WORDS = {"segment": "liver", "segments": "liver", "lobe": "lung", "lobes": "lung"}
_PAIRED_ORGANS = {"kidney", "lung", "adrenal_gland"}
_SIDES = {"left": "left", "right": "right", "bilateral": "bilateral", "both": "bilateral", "left-sided": "left",
          "right-sided": "right"}

_TUMOR_NOUNS = {"tumor", "tumors", "lesion", "lesions", "mass", "masses", "nodule", "nodules", "metastasis",
                "metastases", "neoplasm", "neoplasms", "growth", "growths", "deposit", "deposits", "focus", "foci"}
_DISEASE_HEADS = {"carcinoma", "carcinomas", "adenocarcinoma", "adenocarcinomas", "cancer", "cancers", "lymphoma",
                  "lymphomas", "sarcoma", "sarcomas", "cholangiocarcinoma", "hepatoblastoma", "nephroblastoma",
                  "neuroblastoma", "mesothelioma", "melanoma", "carcinoid", "metastasis", "metastases", "malignancy",
                  "hemangioma", "angiomyolipoma", "oncocytoma", "adenoma", "insulinoma", "myeloma", "leukemia",
                  "pheochromocytoma", "seminoma", "liposarcoma", "leiomyosarcoma", "cholangiocarcinomas"}
# "tumor" is a disease name only after these ("neuroendocrine tumor"); otherwise it is just a tumor.
_NAMED_TUMOR_MODIFIERS = {"neuroendocrine", "stromal", "wilms", "desmoid", "carcinoid", "phyllodes", "pseudopapillary"}
_DIAGNOSIS_MODIFIERS = {
    "hepatocellular", "fibrolamellar", "renal", "cell", "clear", "papillary", "chromophobe", "pancreatic", "ductal",
    "acinar", "intraductal", "mucinous", "serous", "cystic", "solid", "lung", "pulmonary", "bronchogenic", "non-small",
    "small", "large", "squamous", "gastric", "stomach", "colorectal", "colon", "colonic", "rectal", "sigmoid",
    "esophageal", "gastroesophageal", "urothelial", "transitional", "bladder", "adrenal", "adrenocortical", "splenic",
    "gallbladder", "biliary", "intrahepatic", "extrahepatic", "hilar", "perihilar", "hepatic", "liver", "kidney",
    "pancreas", "metastatic", "invasive", "poorly", "well", "moderately", "differentiated", "poorly-differentiated",
    "well-differentiated", "moderately-differentiated", "neuroendocrine", "gastrointestinal", "stromal", "diffuse",
    "b-cell", "t-cell", "hodgkin", "non-hodgkin", "follicular", "primary", "recurrent", "advanced", "locally",
    "early", "breast", "prostate", "ovarian", "cervical", "thyroid", "duodenal", "ampullary", "jejunal", "ileal",
    "signet", "ring", "anaplastic", "medullary", "lobular", "bone", "osseous", "skeletal", "nodal", "peritoneal",
    "cholangio", "multifocal", "wilms", "desmoid", "carcinoid", "phyllodes", "pseudopapillary", "and",
}
# Words that may stand between a count and its tumor word ("two small hypodense liver lesions").
_TUMOR_ADJECTIVES = {
    "small", "large", "tiny", "big", "hypodense", "hyperdense", "hypoattenuating", "hyperattenuating", "enhancing",
    "non-enhancing", "hypervascular", "hypovascular", "arterially", "new", "suspicious", "focal", "solid", "cystic",
    "round", "irregular", "ill-defined", "well-defined", "additional", "malignant", "primary", "metastatic",
    "discrete", "separate", "distinct", "scattered", "spiculated", "lobulated", "heterogeneous", "necrotic",
    "exophytic", "infiltrative", "dominant", "index", "target", "measurable", "known", "further", "other",
    "more", "distant", "secondary", "satellite", "confluent", "nodular", "subcentimeter", "peripheral", "central",
    "upper", "lower", "middle", "head", "tail", "body", "neck", "dome", "pole", "superior", "inferior", "anterior",
    "posterior", "medial", "lateral", "tumor", "tumors", "_size_",
}
_ONE_WORDS = {"a", "an", "one", "single", "solitary", "isolated", "unifocal", "sole", "lone"}
_MULTIPLE_WORDS = {"multiple", "several", "numerous", "multifocal", "innumerable", "many", "various", "countless",
                   "diffuse", "few", "some", "bilateral", "both"}
_ANAPHORA = {"the", "this", "that", "these", "those", "its", "largest", "biggest", "dominant", "same", "such"}
_NEGATORS = {"no", "without", "not", "negative", "absence", "absent", "denies", "neither", "nor", "free", "excluded"}
_CLAUSE_BREAKS = {".", ";", "but", "however", "whereas", "although", "while", "with"}
_LOCATION_PREPOSITIONS = {"in", "of", "within", "involving", "at", "on", "from", "throughout", "along", "arising",
                          "to", "into", "occupying", "affecting", "replacing", "near"}

_RACES = (  # (pattern, category as written in the training records)
    (r"black or african[- ]american|african[- ]american|afro[- ]american|black", "Black or African American"),
    (r"hispanic or latino|hispanic|latino|latina|latinx", "Hispanic or Latino"),
    (r"american indian or alaska native|american indian|native american|alaska native",
     "American Indian or Alaska Native"),
    (r"native hawaiian or other pacific islander|pacific islander|native hawaiian",
     "Native Hawaiian or Other Pacific Islander"),
    (r"white|caucasian", "White"),
    (r"asian", "Asian"),
)
_MALE_WORDS = r"male|man|gentleman|boy|mr|men"
_FEMALE_WORDS = r"female|woman|lady|girl|mrs|ms|miss|women"

_HEALTHY = re.compile(r"\b(no (?:abnormality|abnormalities|abnormal findings|pathology|pathologic findings)|"
                      r"unremarkable|normal (?:study|scan|ct|exam|examination|findings|anatomy|imaging)|healthy)\b")

# Known words that a misspelt word may be read as (six letters or more, see the module docstring).
_SPELLING_VOCABULARY = sorted(
    {w for w in (*_ORGAN_WORDS, *_TUMOR_NOUNS, *_DISEASE_HEADS, *_DIAGNOSIS_MODIFIERS, *_TUMOR_ADJECTIVES,
                 *_MULTIPLE_WORDS, "female", "gentleman", "caucasian", "hispanic", "african", "american", "without",
                 "negative", "measuring", "largest", "metastatic", "pancreas", "gallbladder", "esophagus", "diagnosis",
                 "patient", "evidence", "intestine", "multiple", "several", "numerous")
     if len(w) >= 6 and "-" not in w}
)


# ----------------------------------------------------------------------------------------------------- helpers


def _edit_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (insert, delete, substitute, swap neighbours) of a and b; limit + 1 when
    it is larger than limit (computed no further)."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    previous_previous: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous_previous[j - 2] + 1)
        if min(current) > limit:
            return limit + 1
        previous_previous, previous = previous, current
    return min(previous[-1], limit + 1)


def _correct_spelling(word: str) -> str:
    """The known word a misspelt word stands for (one edit for 6-8 letters, two from 9), else the word itself."""
    if len(word) < 6 or not word.isalpha() or word in _SPELLING_VOCABULARY:
        return word
    limit = 1 if len(word) <= 8 else 2
    distance, closest = min((_edit_distance(word, known, limit), known) for known in _SPELLING_VOCABULARY)
    return closest if distance <= limit else word


def _number(words: str) -> int | None:
    """'63', 'sixty-three', 'sixty three', 'twelve' -> int; anything else -> None."""
    words = words.strip().lower()
    if words.isdigit():
        return int(words)
    parts = re.split(r"[\s-]+", words)
    if len(parts) == 1:
        return _NUMBER_WORDS.get(parts[0], _TENS_WORDS.get(parts[0]))
    if len(parts) == 2 and parts[0] in _TENS_WORDS and parts[1] in _NUMBER_WORDS and 0 < _NUMBER_WORDS[parts[1]] < 10:
        return _TENS_WORDS[parts[0]] + _NUMBER_WORDS[parts[1]]
    return None


_NUMBER_PATTERN = (r"\d{1,3}|(?:" + "|".join(_TENS_WORDS) + r")(?:[\s-](?:" + "|".join(list(_NUMBER_WORDS)[1:10]) + r"))?|"
                   + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)))


@dataclass
class _Token:
    text: str
    organ: str | None = None  # class name (before the class-map check) when the token names an organ
    weak_organ: bool = False
    side: str | None = None


@dataclass
class _Mention:
    """One tumor word (or disease word) and what its neighbourhood says about it."""

    index: int
    counts: bool  # a tumor word (counts) or only a disease word (location only)
    count: int | None = None
    at_least: bool = False
    negated: bool = False
    anaphoric: bool = False
    explicit_location: bool = False  # a tumor word's organ, or a disease word's "of the kidney" / "in the liver"
    organs: list[tuple[str, str | None]] = field(default_factory=list)  # (class name, side) in text order


def is_template_prompt(text: str) -> bool:
    """Whether a prompt is written in the paper's template, and so is given to the models as it is.

    Args:
        text: the prompt.

    Returns:
        True for "[The patient is <demographics>.] In this imaging, the patient's condition is described as ...", for
        the template's no-information prompt, and for a demographics sentence alone when it is worded exactly as the
        template words its fields ("The patient is a 63-year-old White male."; not "The patient is 63 with HCC.").
    """
    text = " ".join(text.split())
    if text.lower() == NO_INFORMATION_PROMPT.lower():
        return True
    template = _TEMPLATE.match(text)
    if template is None or not (template.group("demographics") or template.group("clinical")):
        return False
    return template.group("clinical") is not None or record_to_prompt(parse_free_text(text)) == text


# ----------------------------------------------------------------------------------------------------- fields


def _expand(text: str) -> str:
    """Lower case, one kind of dash and multiplication sign, abbreviations written out, misspellings corrected."""
    text = text.lower().replace("\u2013", "-").replace("\u2014", "-").replace("\u00d7", " x ").replace("\u2019", "'")
    for short, long in _ABBREVIATIONS:
        # "w/" and "s/p" end in a slash, so the right edge is "not a letter" rather than a word boundary
        text = re.sub(rf"(?<![\w/]){re.escape(short)}(?![a-z0-9])", long, text)
    return re.sub(r"[a-z]{6,}", lambda m: _correct_spelling(m.group(0)), text)


def _take(pattern: str, text: str, replacement: str = " ") -> tuple[list[re.Match[str]], str]:
    """All matches of a pattern, and the text with them blanked (so that later fields do not read them again)."""
    matches = list(re.finditer(pattern, text))
    for match in reversed(matches):
        text = text[: match.start()] + replacement + text[match.end():]
    return matches, text


def _age_and_sex_codes(text: str) -> tuple[int | None, str | None, str]:
    """Age and the sex letter of "63M", "63 yo F", "F/45", "age: 63"; the text with them blanked."""
    age: int | None = None
    sex: str | None = None
    patterns = (
        rf"\b(?P<age>{_NUMBER_PATTERN})\s*-?\s*(?:years?|yrs?|y)[\s./-]*(?:old|o)\b\.?(?:\s*(?P<sex>[mf])\b)?",
        rf"\b(?P<age>\d{{1,3}})\s*/?\s*(?P<sex>[mf])\b(?!\s*(?:cm|mm))",
        rf"\b(?P<sex>[mf])\s*/\s*(?P<age>\d{{1,3}})\b",
        rf"\bage[ds]?\s*:?\s*(?P<age>{_NUMBER_PATTERN})\b",
        rf"\b(?P<age>\d{{1,3}})\s*(?:years|yrs)\b(?!\s*(?:ago|since|of|after|before|later))",
        # a bare number beside a word for the patient: "female, 44", "man of 57", "she is 63", "(F, 42)", "F 53"
        rf"\b(?:(?P<male>{_MALE_WORDS}|he)|(?P<female>{_FEMALE_WORDS}|she)|patient|(?P<sex>[mf]))\b\.?\s*[,:(]?\s*"
        rf"(?:of|is|aged)?\s*"
        rf"(?P<age>\d{{1,3}})\b(?![.,]\d|\s*(?:mm|cm|%|x\b|\w*(?:lesion|tumor|mass|nodule|metasta|focus|foci)))",
    )
    for pattern in patterns:
        matches, blanked = _take(pattern, text, " _age_ ")
        for match in matches:
            value = _number(match.group("age"))
            if value is None or value > 120:
                continue
            if age is None:
                age = value
            groups = match.groupdict()
            if sex is None and (groups.get("sex") or groups.get("male") or groups.get("female")):
                sex = "male" if groups.get("sex") == "m" or groups.get("male") else "female"
            text = blanked
            break
    sex_code = (re.search(r"\b(?:sex|gender)\s*[:=]?\s*(m|f|male|female)\b", text)
                or re.search(r"(?:^|[,;(]|_age_)\s*([mf])\s*(?=[,;)]|$|_age_)", text))  # "age 71, M", "(F, 42)"
    if sex_code and sex is None:
        sex = "male" if sex_code.group(1).startswith("m") else "female"
    return age, sex, text


def _sex(text: str) -> str | None:
    """male/female from words, then from pronouns."""
    found = [(m.start(), "male") for m in re.finditer(rf"\b(?:{_MALE_WORDS})\b\.?", text)]
    found += [(m.start(), "female") for m in re.finditer(rf"\b(?:{_FEMALE_WORDS})\b\.?", text)]
    if not found:
        found = [(m.start(), "male") for m in re.finditer(r"\b(?:he|his|him)\b", text)]
        found += [(m.start(), "female") for m in re.finditer(r"\b(?:she|her|hers)\b", text)]
    return min(found)[1] if found else None


def _race(text: str) -> str | None:
    found = []
    for pattern, category in _RACES:
        match = re.search(rf"\b(?:{pattern})\b", text)
        if match:
            found.append((match.start(), -len(match.group(0)), category))
    return min(found)[2] if found else None


def _sizes(text: str) -> tuple[list[float], str]:
    """Every size in mm (largest dimension of "3 x 2 cm"), and the text with them blanked as ``_size_``."""
    number = r"\d+(?:[.,]\d+)?"
    pattern = rf"(?<![\w.])(?P<dims>{number}(?:\s*(?:x|by|\*|and|to|-|,)\s*{number}){{0,3}})\s*(?P<unit>mm|cm)\b(?P<after>\s*(?:slices?|sections?|thick\w*|collimation|interval))?"
    sizes = []
    for match in re.finditer(pattern, text):
        if match.group("after"):  # slice thickness, not a tumor
            continue
        dims = [float(d.replace(",", ".")) for d in re.findall(number, match.group("dims"))]
        sizes.append(max(dims) * (10.0 if match.group("unit") == "cm" else 1.0))
    _, text = _take(pattern, text, " _size_ ")
    return sizes, text


def _stage(text: str) -> tuple[str | None, str | None, str]:
    """The stage ("II", "IIIA") and a TNM code, and the text with both blanked."""
    stage = None
    matches, text = _take(r"\bstage\s*[:\-]?\s*(?P<n>iv|iii|ii|i|[1-4]|one|two|three|four)(?P<sub>[abc]\d?)?\b", text,
                          " _stage_ ")
    if matches:
        stage = _ROMAN[matches[0].group("n")] + (matches[0].group("sub") or "").upper()
    tnm_matches, text = _take(r"\b(?:[cpy]?t(?:[0-4][abc]?|x|is))\s*(?:n[0-3][abc]?|nx)\s*(?:m[01][abc]?|mx)\b", text,
                              " _stage_ ")
    tnm = re.sub(r"\s+", "", tnm_matches[0].group(0)).upper() if tnm_matches else None
    return stage, tnm, text


def _tokens(text: str) -> list[_Token]:
    """Words and clause punctuation; organ phrases joined into one token that carries the organ."""
    for phrase, organ in sorted(_ORGAN_PHRASES.items(), key=lambda item: -len(item[0])):
        text = re.sub(rf"\b{phrase}\b", f" _organ_{organ}_ ", text)
    tokens = []
    for word in re.findall(r"[a-z0-9_]+(?:-[a-z0-9_]+)*|[.,;:()]", text):
        token = _Token(word)
        if word.startswith("_organ_"):
            token.organ = word[len("_organ_"):-1]
        elif word in _ORGAN_WORDS:
            token.organ = _ORGAN_WORDS[word]
        elif word.startswith("hepato") and word != "hepatocellular":
            token.organ = "liver"
        elif word in _WEAK_ORGAN_WORDS:
            token.organ, token.weak_organ = _WEAK_ORGAN_WORDS[word], True
        elif word in _LOBES:
            token.organ, token.side = _LOBES[word]
        if word in _SIDES:
            token.side = _SIDES[word]
        tokens.append(token)
    return tokens


def _side_before(tokens: list[_Token], index: int) -> str | None:
    """The side written just before an organ word ("left kidney", "right upper lobe")."""
    if tokens[index].side is not None:
        return tokens[index].side
    for back in range(index - 1, max(-1, index - 4), -1):
        if tokens[back].side is not None:
            return tokens[back].side
        if tokens[back].text not in {"upper", "lower", "middle", "the", "sided", "lobe", "kidney", "lung", "adrenal"}:
            break
    return None


def _organs_in(tokens: list[_Token], indices: Sequence[int]) -> list[tuple[str, str | None]]:
    """Organs named at these token positions, strong names first-class, weak ones ("segment") only without them."""
    strong = [(tokens[i].organ, _side_before(tokens, i)) for i in indices if tokens[i].organ and not tokens[i].weak_organ]
    if strong:
        return [o for k, o in enumerate(strong) if o[0] not in [s[0] for s in strong[:k]]]
    weak = [(tokens[i].organ, _side_before(tokens, i)) for i in indices if tokens[i].organ]
    return weak[:1]


def _count_word(word: str) -> tuple[int | None, bool] | None:
    """(count, at_least) for a count word, None when the word is no count."""
    if word in _ONE_WORDS:
        return 1, False
    if word in _MULTIPLE_WORDS:
        return None, True
    value = _number(word)
    if value is not None and 0 < value < 50:
        return value, False
    return None


def _is_elliptical_count(tokens: list[_Token], index: int) -> bool:
    """A count standing for a tumor word said just before: "two tumors in the liver and *one* in the pancreas"."""
    count = _count_word(tokens[index].text)
    return (count is not None and count[0] is not None and index > 0 and index + 1 < len(tokens)
            and tokens[index - 1].text in {"and", ",", "+", "plus"} and tokens[index + 1].text in _LOCATION_PREPOSITIONS)


def _side_after(tokens: list[_Token], window: Sequence[int], organ: str) -> str | None:
    """A side written after the mention that belongs to its organ: "on the left", ", left lower lobe", "RLL"."""
    for position in window:
        side = tokens[position].side
        if side is None:
            continue
        named = next((tokens[k].organ for k in range(position, min(len(tokens), position + 4)) if tokens[k].organ), None)
        if named is None or named == organ:
            return side
    return None


def _mentions(tokens: list[_Token]) -> list[_Mention]:
    """Every tumor word and disease word, with its count, negation and organs."""
    mentions = []
    anchors = {i for i, t in enumerate(tokens) if t.text in _TUMOR_NOUNS or t.text in _DISEASE_HEADS}
    elliptical = {i for i in range(len(tokens)) if _is_elliptical_count(tokens, i)}
    anchors |= elliptical
    for index in sorted(anchors):
        word = tokens[index].text
        mention = _Mention(index, counts=word in _TUMOR_NOUNS or index in elliptical)
        modifier_positions = []
        if index in elliptical:
            mention.count, mention.at_least = _count_word(word)
        else:
            # modifiers before the word: organs, sides, adjectives, sizes; then a count word or a determiner
            back = index - 1
            while back >= 0:
                text = tokens[back].text
                if tokens[back].organ or tokens[back].side or text in _TUMOR_ADJECTIVES or text in _DIAGNOSIS_MODIFIERS:
                    modifier_positions.append(back)
                    back -= 1
                elif text in {"and", "or", ","} and back > 0 and (tokens[back - 1].organ or tokens[back - 1].side):
                    back -= 1
                else:
                    break
            if back >= 0:
                before = tokens[back].text
                if back >= 1 and before == "of" and tokens[back - 1].text == "couple":
                    mention.count = 2
                elif (count := _count_word(before)) is not None:
                    mention.count, mention.at_least = count
                elif before in _ANAPHORA:
                    mention.anaphoric = True
                # an organ heading: "pancreas: 1 mass 28 mm"
                if back >= 2 and tokens[back - 1].text == ":" and tokens[back - 2].organ:
                    modifier_positions.append(back - 2)
            if index + 1 < len(tokens) and tokens[index + 1].text == ":":
                mention.anaphoric = True  # a heading ("liver metastasis: one 26 mm lesion"): what follows counts
        if mention.count is None and not mention.at_least and mention.counts and not mention.anaphoric:
            following = tokens[index + 1].text if index + 1 < len(tokens) else ""
            times = re.fullmatch(r"x(\d+)", following) or (following == "x" and index + 2 < len(tokens)
                                                              and re.fullmatch(r"(\d+)", tokens[index + 2].text))
            if times:
                mention.count = int(times.group(1))
            else:
                plural = word.endswith(("s", "ses", "foci")) and word not in {"mass", "metastasis", "focus"}
                mention.count, mention.at_least = (None, True) if plural else (1, False)
        # negation: a negating word earlier in the same clause, or "tumor-free" / "tumor free" / "... excluded"
        for earlier in range(index - 1, max(-1, index - 8), -1):
            text = tokens[earlier].text
            if text in _CLAUSE_BREAKS or text in {",", ":"}:
                break
            if text in _NEGATORS:
                mention.negated = True
                break
        after = [t.text for t in tokens[index + 1:index + 3]]
        if word.endswith("-free") or after[:1] == ["free"] or "excluded" in after or after[:2] == ["ruled", "out"]:
            mention.negated = True
        # organ after the word: "in the liver", "of the left kidney", "in segment 7", "in the right upper lobe"
        window = []
        for ahead in range(index + 1, min(len(tokens), index + 12)):
            if tokens[ahead].text in {".", ";"} or ahead in anchors:
                break
            window.append(ahead)
        after_preposition = [i for k, i in enumerate(window)
                             if any(tokens[p].text in _LOCATION_PREPOSITIONS for p in window[:k])]
        placed_after = any(tokens[i].organ for i in after_preposition)
        organ_positions = modifier_positions if any(tokens[i].organ for i in modifier_positions) else after_preposition
        mention.explicit_location = placed_after or (mention.counts and organ_positions is modifier_positions)
        mention.organs = [(organ, side or (_side_after(tokens, window, organ) if organ in _PAIRED_ORGANS else None))
                          for organ, side in _organs_in(tokens, sorted(organ_positions))]
        mentions.append(mention)
    return mentions


def _diagnosis(tokens: list[_Token], mentions: list[_Mention]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """The first disease phrase that is not negated, and the organs it names."""
    for mention in mentions:
        head = tokens[mention.index].text
        if mention.negated:
            continue
        previous = tokens[mention.index - 1].text if mention.index else ""
        named_tumor = head in {"tumor", "tumors"} and previous in _NAMED_TUMOR_MODIFIERS  # "neuroendocrine tumor"
        if head not in _DISEASE_HEADS and not named_tumor:
            continue
        start = mention.index - (head == "myeloma" and previous == "multiple")  # "multiple" is part of the name
        while start > 0 and (tokens[start - 1].text in _DIAGNOSIS_MODIFIERS or tokens[start - 1].organ
                             or tokens[start - 1].text in _NAMED_TUMOR_MODIFIERS):
            start -= 1
        while start < mention.index and tokens[start].text == "and":
            start += 1
        end = mention.index + 1
        # "of the bladder", "from colorectal cancer": a following organ or disease phrase belongs to the diagnosis
        if end < len(tokens) and tokens[end].text in {"of", "from"}:
            stop = end + 1
            while stop < len(tokens) and (tokens[stop].text in {"the", "a"} | _DIAGNOSIS_MODIFIERS or tokens[stop].organ
                                          or tokens[stop].text in _DISEASE_HEADS):
                stop += 1
            tail = tokens[end + 1:stop]
            if tail and (tail[-1].organ and not tail[-1].weak_organ or tail[-1].text in _DISEASE_HEADS):
                end = stop
        words = [t.text for t in tokens[start:end]]
        words[mention.index - start] = {"carcinomas": "carcinoma", "adenocarcinomas": "adenocarcinoma",
                                        "cancers": "cancer", "lymphomas": "lymphoma", "sarcomas": "sarcoma",
                                        "tumors": "tumor"}.get(words[mention.index - start], words[mention.index - start])
        phrase = " ".join(w.replace("_organ_", "").rstrip("_").replace("_", " ") for w in words)
        organs = _organs_in(tokens, [i for i in range(start, end) if tokens[i].organ and not tokens[i].weak_organ])
        return phrase, organs
    return None, []


def _tumor_phrase(count: int | None, at_least: bool) -> str:
    if at_least:
        return "multiple tumors"
    if count is None or count == 1:
        return "a tumor"
    return f"{count_words(count)} tumors"


def _organ_display(organ: str) -> str:
    return organ.replace("_", " ")


# ----------------------------------------------------------------------------------------------------- public


def parse_free_text(text: str, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Read the clinical record fields a free-text prompt states (see the module docstring for the rules).

    Args:
        text: the prompt, e.g. "58yo F, Hispanic, RCC of the left kidney, 4.2 x 3 cm, stage 1".
        class_names: the class map's class names; ``tumor_organ`` is always one of them, and an organ that is not
            (e.g. "breast" with the default map) is not returned. Default: the default class map's.

    Returns:
        the fields found, in the order of :data:`~custom_components.data.records.RECORD_FIELDS` (``age, sex, race,
        diagnosis, tumor_organ, tumor_count, tumor_size_mm, stage, remarks``), plus ``tumor_count_min`` for
        "multiple" tumors. Fields the text does not state are left out; an empty dict means nothing was found.
    """
    if class_names is None:
        from custom_components.data.class_map import load_class_map

        class_names = load_class_map(None).class_names
    known_organs = set(class_names)
    template_remarks = None
    text = " ".join(text.split())
    template = _TEMPLATE.match(text)
    if template and template.group("clinical") and ";" in template.group("clinical"):
        clinical, template_remarks = template.group("clinical").rsplit(";", 1)
        text = text[: template.start("clinical")] + clinical
        template_remarks = template_remarks.strip() or None

    working = _expand(text)
    age, sex, working = _age_and_sex_codes(working)
    sizes, working = _sizes(working)
    stage, tnm, working = _stage(working)
    sex = sex or _sex(working)
    race = _race(working)
    healthy = _HEALTHY.search(working) is not None
    tokens = _tokens(working)
    for token in tokens:
        if token.organ is not None and token.organ not in known_organs:
            token.organ, token.weak_organ = None, False
    mentions = _mentions(tokens)
    diagnosis, diagnosis_organs = _diagnosis(tokens, mentions)
    if healthy and diagnosis is None:
        diagnosis = "no abnormality"

    positive = [m for m in mentions if m.counts and not m.negated]
    negated_anything = any(m.negated for m in mentions) or healthy or re.search(
        r"\b(?:no|without|negative for|free of)\s+(?:evidence of\s+)?(?:any\s+)?(?:\w+\s+)?"
        r"(?:disease|malignancy|malignancies|abnormality|abnormalities)\b|\btumor-free\b", working) is not None
    # the tumor organ is the first organ a tumor is placed in; an organ only named by the diagnosis's adjective
    # ("colorectal cancer with liver metastases") comes after every placed tumor
    located = [(organ, side, m) for m in mentions if not m.negated for organ, side in m.organs]
    ordered = [entry for entry in located if entry[2].explicit_location] or located
    if not ordered and diagnosis_organs:
        ordered = [(organ, side, None) for organ, side in diagnosis_organs]
    organ = ordered[0][0] if ordered else None
    count: int | None = None
    at_least = False
    if positive:
        own = [m for m in positive if not m.anaphoric and (not m.organs or m.organs[0][0] == organ)]
        if any(m.at_least for m in own):
            at_least = True
        elif own:
            count = sum(m.count or 0 for m in own) or None
    elif negated_anything and organ is None:  # "pancreatic cancer, no metastases" still has its (uncounted) tumor
        count = 0
    remarks = []
    primary_side = next((side for o, side, _ in ordered if o == organ and side), None)
    if organ in _PAIRED_ORGANS and primary_side:
        remarks.append(f"{primary_side} {_organ_display(organ)}")
    if tnm and stage:
        remarks.append(tnm)
    seen = {organ}
    for other, side, mention in ordered:
        if other in seen:
            continue
        seen.add(other)
        where = f"{side} {_organ_display(other)}" if side and other in _PAIRED_ORGANS else _organ_display(other)
        phrase = _tumor_phrase(mention.count, mention.at_least) if mention is not None and mention.counts else "a tumor"
        remarks.append(f"also {phrase} in the {where}")
    if template_remarks:
        remarks.append(template_remarks)

    values = {
        "age": age, "sex": sex, "race": race, "diagnosis": diagnosis, "tumor_organ": organ,
        "tumor_count": count, "tumor_size_mm": max(sizes) if sizes and count != 0 else None,
        "stage": stage or tnm, "remarks": "; ".join(remarks) or None,
    }
    record = {name: value for name, value in values.items() if value is not None}
    if at_least:
        record["tumor_count_min"] = MULTIPLE_TUMORS_MIN_COUNT
    return record
