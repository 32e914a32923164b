"""Benchmark the compiled scorer against scikit-learn's predict_proba, side by side.

Usage: python scripts/bench/bench_model.py [--model-dir models/sentiment] [--texts 2000]

Every text is unique (no cache can help) and realistic (review- and tweet-like).
Reports microseconds per text for single texts and batches of 50, the speed-up,
and the largest absolute probability difference between the two.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # NOTE: runnable from a checkout without installing

from falcon_svc.model.artifact import read_artifact  # noqa: E402
from falcon_svc.model.scorer import compile_pipeline  # noqa: E402
from falcon_svc.text import normalize  # noqa: E402

BATCH = 50
SUBJECTS = (
    "The delivery",
    "My new phone",
    "The hotel room",
    "Customer support",
    "The flight",
    "This blender",
    "The waiter",
    "The update",
    "Our order",
    "The package",
    "@united your crew",
    "The app",
    "The jacket",
    "Check-in",
    "The refund",
)
PREDICATES = (
    "was great",
    "was really terrible",
    "arrived on Tuesday",
    "is not bad at all",
    "took three hours",
    "works perfectly",
    "keeps crashing",
    "was fine I guess",
    "departs at 9 am",
    "is exactly as described",
    "was a total waste of money",
    "made my day",
    "is okay but the price is too high",
    "never showed up",
)
ENDINGS = (
    "",
    ".",
    "!",
    " and I love it.",
    " but nobody called back.",
    " #fail",
    " http://t.co/abc123",
    " :)",
    " - would not recommend.",
    " Thanks!",
)


def realistic_texts(count: int, seed: int = 7) -> list[str]:
    """Return ``count`` unique texts built from shuffled sentence parts, normalised."""
    combos = list(itertools.product(SUBJECTS, PREDICATES, ENDINGS))
    random.Random(seed).shuffle(combos)
    texts = []
    for index in range(count):
        subject, predicate, ending = combos[index % len(combos)]
        suffix = f" (order {index})" if index >= len(combos) else ""
        texts.append(normalize(f"{subject} {predicate}{ending}{suffix}"))
    return texts


def per_text_us(score: Callable[[Sequence[str]], object], texts: list[str], size: int) -> float:
    """Time ``score`` over ``texts`` in chunks of ``size``; return microseconds per text."""
    chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
    score(chunks[0])  # warm up
    start = time.perf_counter()
    for chunk in chunks:
        score(chunk)
    return (time.perf_counter() - start) / len(texts) * 1e6


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO_ROOT / "models" / "sentiment")
    parser.add_argument("--texts", type=int, default=2000, help="unique texts per run")
    args = parser.parse_args(argv)

    pipeline, metadata = read_artifact(args.model_dir)
    compiled = compile_pipeline(pipeline)
    texts = realistic_texts(args.texts)

    expected = pipeline.predict_proba(texts)
    single = np.vstack([compiled.predict_proba([text]) for text in texts])
    batched = np.vstack([compiled.predict_proba(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])
    max_diff = max(float(np.abs(single - expected).max()), float(np.abs(batched - expected).max()))

    print(f"model {metadata['name']} {metadata['version']} (kind={metadata['kind']}), {len(texts)} unique texts")
    print(f"{'mode':<14}{'sklearn us/text':>17}{'compiled us/text':>18}{'speed-up':>10}")
    for mode, size in (("single", 1), (f"batch of {BATCH}", BATCH)):
        slow = per_text_us(pipeline.predict_proba, texts, size)
        fast = per_text_us(compiled.predict_proba, texts, size)
        print(f"{mode:<14}{slow:>17.1f}{fast:>18.1f}{slow / fast:>9.1f}x")
    print(f"max |probability difference| compiled vs sklearn: {max_diff:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
