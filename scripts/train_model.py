"""Train the sentiment model into models/sentiment (or a dummy if the corpus is missing).

Usage: python scripts/train_model.py [--output-dir models/sentiment] [--force]

Thin wrapper: the work is in falcon_svc.model.train_cli (also ``falcon-svc train``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # NOTE: runnable from a checkout

from falcon_svc.model.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
