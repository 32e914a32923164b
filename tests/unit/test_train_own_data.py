"""`falcon-svc train --data FILE.csv --eval NAME=FILE.csv`: your own data, and clear errors for a bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from toy_models import labelled_rows, write_csv

from falcon_svc.model import load_model
from falcon_svc.training import train_cli
from falcon_svc.training.data import MIN_ROWS_PER_LABEL, TrainingDataError, load_labelled_csv


def test_a_model_trains_on_a_small_csv_and_scores_each_eval_set(tmp_path: Path, capsys) -> None:
    data = write_csv(tmp_path / "mine.csv", labelled_rows())
    holdout = write_csv(
        tmp_path / "holdout.csv", [("The parcel was wonderful.", "positive"), ("It was awful.", "negative")]
    )
    output = tmp_path / "model"
    assert train_cli.main(["--data", str(data), "--eval", f"holdout={holdout}", "--output-dir", str(output)]) == 0, (
        capsys.readouterr().err
    )
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["training_data"]["source"] == str(data)
    assert metadata["training_data"]["rows"] == len(labelled_rows())
    assert metadata["training_data"]["plain_sentences"] is None, "your data is the whole training set"
    assert {"held_out", "holdout"} <= metadata["metrics"].keys() and "tweet_test" not in metadata["metrics"]
    assert metadata["metrics"]["holdout"]["source"] == str(holdout)
    behaviour = metadata["behaviour"]
    assert 0 <= behaviour["pass_rate"] <= 1 and "negation" in behaviour["capabilities"], behaviour
    out = capsys.readouterr().out
    assert "behavioural suite:" in out and f"evaluation report: {output / 'report.json'}" in out, out
    assert set(json.loads((output / "report.json").read_text())["sets"]) == set(metadata["metrics"])
    model = load_model(output)
    assert [p.label for p in model.predict(["The battery was wonderful.", "The app was terrible."])] == [
        "positive",
        "negative",
    ]


def test_data_retrains_even_over_a_valid_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, object]] = []
    monkeypatch.setattr(train_cli, "is_valid_artifact", lambda _path: True)
    monkeypatch.setattr(train_cli, "read_metadata", lambda _path: {"kind": "trained", "version": "v", "name": "m"})
    monkeypatch.setattr(train_cli, "train_model", lambda path, **kwargs: calls.append(kwargs))
    data = write_csv(tmp_path / "mine.csv", labelled_rows())
    assert train_cli.main(["--data", str(data), "--output-dir", str(tmp_path / "model")]) == 0
    assert len(calls) == 1 and calls[0]["data"] == data


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("fine", "positive")], ("txt", "label"), ":1: missing column 'text'"),
        ([("fine", "positive"), ("hmm", "angry")], ("text", "label"), ":3: unknown label 'angry'"),
        ([("fine", "positive"), ("   ", "negative")], ("text", "label"), ":3: empty text"),
        ([("fine", "positive")], ("text", "label"), f"at least {MIN_ROWS_PER_LABEL} of each label"),
        ([], ("text", "label"), "too few rows"),
    ],
    ids=["missing-column", "unknown-label", "empty-text", "too-few", "no-rows"],
)
def test_a_bad_file_is_refused_with_its_line_and_no_model_is_written(tmp_path: Path, capsys, rows, header, message):
    bad = write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(TrainingDataError, match=message.replace("(", r"\(")):
        load_labelled_csv(bad)
    output = tmp_path / "model"
    assert train_cli.main(["--data", str(bad), "--output-dir", str(output)]) == train_cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"ERROR: {bad}" in err and message in err, err
    assert "DUMMY" not in err and not output.exists(), "a bad file never falls back to a dummy model"


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("text,label\ncaf\xe9 was fine,positive\n".encode("latin-1"))
    with pytest.raises(TrainingDataError, match="not UTF-8"):
        load_labelled_csv(bad)


@pytest.mark.parametrize("value", ["noequals", "=x.csv", "bad name=x.csv", "tweet_test=EXISTS"])
def test_a_bad_eval_argument_is_refused(tmp_path: Path, value: str) -> None:
    existing = write_csv(tmp_path / "e.csv", [("fine", "positive")])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.parse_args(["--eval", value.replace("EXISTS", str(existing))])
    assert exit_info.value.code == 2
