"""Small labelled data and models trained on it in about a second: for tests of the model's lifecycle.

The models are real (the production training code, on 72 rows), just small: they
tell "wonderful" from "terrible", and the store, the gate and the rollout can be
tested with several distinct versions without training on the shipped corpus.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

SUBJECTS = ["The delivery", "The support team", "The hotel room", "My order", "The app", "The battery"]
WORDS = {
    "positive": ["was wonderful", "was excellent, thank you", "made me happy", "is great value"],
    "negative": ["was terrible", "broke after a day, awful", "made me angry", "is a waste of money"],
    "neutral": ["arrived on Tuesday", "is blue", "has two buttons", "was delivered to the office"],
}


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def labelled_rows() -> list[tuple[str, str]]:
    return [
        (f"{subject} {phrase}.", label)
        for label, phrases in WORDS.items()
        for subject in SUBJECTS
        for phrase in phrases
    ]


def shuffled(rows: list[tuple[str, str]], seed: int = 7) -> list[tuple[str, str]]:
    """The same texts with their labels shuffled: a deliberately worse model."""
    labels = [label for _, label in rows]
    random.Random(seed).shuffle(labels)
    return [(text, label) for (text, _), label in zip(rows, labels, strict=True)]


def train_toy(directory: Path, name: str, rows: list[tuple[str, str]]) -> Path:
    """Train a model on ``rows`` with `falcon-svc train --data`; return its artifact directory."""
    from falcon_svc.training import train_cli

    output = directory / name
    data = write_csv(directory / f"{name}.csv", rows)
    assert train_cli.main(["--data", str(data), "--output-dir", str(output)]) == 0
    return output
