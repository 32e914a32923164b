"""Train the sentiment model into models/sentiment (or a dummy if the corpus is missing).

Usage: python scripts/train_model.py [--output-dir models/sentiment] [--clean-set CSV] [--force]

Thin wrapper: the work is in falcon_svc.training.train_cli (also ``falcon-svc train``).
This script knows the checkout, so it supplies the checkout's defaults: the artifact
goes to the repository's models/sentiment, and tests/data/clean_sentences.csv is
scored into the metadata (the README's table and tests/ops/test_model_quality.py use it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # NOTE: runnable from a checkout

from falcon_svc.training.train_cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    sys.exit(
        main(
            default_output_dir=REPO_ROOT / "models" / "sentiment",
            default_clean_set=REPO_ROOT / "tests" / "data" / "clean_sentences.csv",
        )
    )
