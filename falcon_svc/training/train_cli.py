"""Train the sentiment model from the command line (or a dummy if the corpus is missing).

Usage: falcon-svc train [--output-dir models/sentiment] [--data CSV] [--eval NAME=CSV ...] [--clean-set CSV]
                        [--force] [--detailed-exit-code] [--signing-key KEY] [--atomic]

``--data`` trains on your own ``text,label`` CSV (labels negative, neutral, positive)
instead of the shipped corpus; a bad row stops the run with its line number.
Every trained artifact gets its evaluation report (report.json and PNG plots, see
falcon_svc/training/report.py); a dummy gets none.

Skips training when a verified, trained artifact already exists, so ``make run`` and
``make test`` stay fast after the first build; a dummy one is always rebuilt.

NOTE: paths come from the caller, never from where this file lies: an installed
package has no repository around it. scripts/train_model.py passes a checkout's
defaults (its models/sentiment and tests/data/clean_sentences.csv).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falcon_svc.model.artifact import (
    ModelLoadError,
    is_valid_artifact,
    publish_artifact,
    read_metadata,
    staging_directory,
)
from falcon_svc.model.signing import key_id, load_private_key, sign_artifact, sign_unless_signed
from falcon_svc.training.behaviour import format_suite
from falcon_svc.training.data import DataUnavailableError, TrainingDataError
from falcon_svc.training.dummy import KIND as DUMMY_KIND
from falcon_svc.training.dummy import build_dummy_model
from falcon_svc.training.evaluation import format_metrics_table
from falcon_svc.training.report import REPORT_FILE, load_report, remove_report
from falcon_svc.training.report_text import format_report_summary
from falcon_svc.training.training import train_model

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# Relative to the working directory, as the service's MODEL_DIR default is, so a
# plain `falcon-svc train` writes where a plain `falcon-svc serve` reads.
DEFAULT_OUTPUT_DIR = Path("models/sentiment")
EXIT_FAILED = 1
# With --detailed-exit-code (what the Ansible role runs) the code says what was done, so
# the role need not parse messages: 0 = a valid trained model was already there.
EXIT_TRAINED = 3
EXIT_DUMMY = 4
# A valid trained model was kept, but --signing-key had not signed it yet: signed now.
EXIT_SIGNED = 5
# Metric names training writes itself; an --eval set may not take one.
RESERVED_SET_NAMES = frozenset({"tweet_test", "held_out", "clean_set", "dev_set"})
# The private key that signs what training writes (or keeps), when --signing-key is not given.
SIGNING_KEY_ENV = "MODEL_SIGNING_KEY"


def parse_args(
    argv: list[str] | None,
    default_output_dir: Path = DEFAULT_OUTPUT_DIR,
    default_clean_set: Path | None = None,
) -> argparse.Namespace:
    """Parse the command line; the defaults are the caller's (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=default_output_dir,
        help="artifact directory (default: %(default)s)",
    )
    parser.add_argument(
        "--clean-set",
        type=Path,
        default=default_clean_set,
        help="a label,text CSV never used to choose settings, scored into the metadata (default: %(default)s)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="train on this text,label CSV (UTF-8, a header row) instead of the shipped corpus; always retrains",
    )
    parser.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="NAME=CSV",
        type=_eval_set,
        help="also score this text,label CSV into the metrics under NAME (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="retrain even if a valid artifact exists")
    parser.add_argument(
        "--detailed-exit-code",
        action="store_true",
        help=f"exit {EXIT_TRAINED} when a trained model was written, {EXIT_DUMMY} when a dummy was, "
        f"{EXIT_SIGNED} when a valid trained model was kept and signed "
        f"(0: a valid trained model was kept as it was; {EXIT_FAILED}: training failed)",
    )
    parser.add_argument(
        "--atomic",
        action="store_true",
        help="train and sign in a staging directory beside the output, then swap it in with one rename, "
        "so a worker starting meanwhile loads the old signed model or the new one (what the Ansible role runs)",
    )
    parser.add_argument(
        "--signing-key",
        type=Path,
        default=os.environ.get(SIGNING_KEY_ENV) or None,
        help=f"Ed25519 private key (PEM) that signs the artifact (default: ${SIGNING_KEY_ENV}; unset: unsigned)",
    )
    args = parser.parse_args(argv)
    if args.signing_key is not None and not args.signing_key.is_file():
        parser.error(f"--signing-key {args.signing_key} is not a file")
    if args.clean_set is not None and not args.clean_set.is_file():
        parser.error(f"--clean-set {args.clean_set} is not a file")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {args.data} is not a file")
    names = [name for name, _path in args.eval]
    for name, path in args.eval:
        if not path.is_file():
            parser.error(f"--eval {name}={path}: {path} is not a file")
        if names.count(name) > 1 or name in RESERVED_SET_NAMES:
            parser.error(f"--eval {name}=...: the name {name!r} is taken (or given twice)")
    return args


def _eval_set(value: str) -> tuple[str, Path]:
    """Parse ``NAME=CSV`` (NAME: letters, digits, _ and -)."""
    name, sep, path = value.partition("=")
    if not sep or not path or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=FILE.csv (NAME: letters, digits, _ or -)")
    return name, Path(path)


def keep_model(output: Path, signing_key: Ed25519PrivateKey | None, *, detailed_exit_code: bool) -> int:
    """Keep the valid trained model in ``output``, signing it unless the key already has."""
    if signing_key is None:
        return 0
    # NOTE: in place even with --atomic: only signature.json changes, written to a
    # temporary name and renamed, and the model a worker loads is the same either way.
    try:
        signed = sign_unless_signed(output, signing_key)[1]
    except (ValueError, ModelLoadError) as ex:
        print(f"ERROR: cannot sign the kept model: {ex}", file=sys.stderr)
        return EXIT_FAILED
    if not signed:
        return 0
    print(f"signed {output} with key {key_id(signing_key.public_key())}")
    return EXIT_SIGNED if detailed_exit_code else 0


def main(
    argv: list[str] | None = None,
    *,
    default_output_dir: Path = DEFAULT_OUTPUT_DIR,
    default_clean_set: Path | None = None,
) -> int:
    """Train (or skip, or fall back to the dummy) and print the metrics table."""
    args = parse_args(argv, default_output_dir, default_clean_set)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    output = args.output_dir
    try:
        signing_key = None if args.signing_key is None else load_private_key(args.signing_key)
    except ValueError as ex:
        print(f"ERROR: {ex}", file=sys.stderr)
        return EXIT_FAILED
    # NOTE: a dummy left by an earlier run without the corpus is not kept: the corpus
    # may be there now, and if not, the DUMMY warning below must be printed again
    # (a person reads it; the Ansible role fails on --detailed-exit-code's 4 unless ALLOW_DUMMY_MODEL).
    # --data always retrains: the user asked for a model of their data, not the one already there.
    keep = not args.force and args.data is None
    if keep and is_valid_artifact(output) and read_metadata(output).get("kind") != DUMMY_KIND:
        metadata = read_metadata(output)
        print(
            f"model {metadata['version']} (kind={metadata['kind']}) already in {output}; use --force to retrain",
            file=sys.stderr,
        )
        return keep_model(output, signing_key, detailed_exit_code=args.detailed_exit_code)
    staged = staging_directory(output) if args.atomic else output
    try:
        try:
            train_model(staged, clean_set=args.clean_set, data=args.data, eval_sets=dict(args.eval))
        except DataUnavailableError as ex:
            print(
                f"WARNING: training data unavailable ({ex}); building a DUMMY model "
                f"(kind=dummy) in {output}. Its predictions are meaningless.",
                file=sys.stderr,
            )
            remove_report(staged)  # NOTE: a trained model's report must not describe the dummy
            build_dummy_model(staged)
        if signing_key is not None:
            print(f"signed {staged} with key {sign_artifact(staged, signing_key)}")
        if args.atomic:
            publish_artifact(staged, output)
    except TrainingDataError as ex:
        print(f"ERROR: {ex}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as ex:  # NOTE: report any failure as one clear line
        print(f"ERROR: training failed: {type(ex).__name__}: {ex}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if args.atomic:
            # NOTE: after a publish this is the replaced artifact's old name (gone); after a
            # failure, the half-written staging directory, which no worker ever saw.
            shutil.rmtree(staged, ignore_errors=True)
    metadata = read_metadata(output)
    print_results(metadata, output)
    if not args.detailed_exit_code:
        return 0
    return EXIT_DUMMY if metadata["kind"] == DUMMY_KIND else EXIT_TRAINED


def print_results(metadata: dict[str, Any], output: Path) -> None:
    """Print what was written: the version, the metrics table, the suite, and the report's summary."""
    print(f"model {metadata['name']} {metadata['version']} (kind={metadata['kind']}) written to {output}")
    if metadata.get("metrics"):
        print(format_metrics_table(metadata["metrics"]))
    if metadata.get("behaviour"):
        print(format_suite(metadata["behaviour"]))
    evaluation = load_report(output)
    if evaluation is not None:
        print(format_report_summary(evaluation, output / REPORT_FILE))
