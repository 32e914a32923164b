"""Hand our trained model to MLServer, and check that both servers answer alike.

``export``: MLServer's scikit-learn runtime (mlserver-sklearn) serves a file that
``joblib.load`` reads, in a venv without falcon_svc. Our fitted pipeline is plain
scikit-learn except two pieces pickled by import path: the TF-IDF preprocessor
(``features.preprocess``) and the VADER lexicon transformer
(``features.LexiconFeatures``, which calls ``vader.py``). Exported, those two
modules are pickled by value (cloudpickle, which joblib itself depends on), so the
file loads with scikit-learn, joblib and cloudpickle alone and computes exactly
what the service's pipeline computes: the same fitted TF-IDF vocabulary, lexicon
tables and coefficients, not a retrained look-alike.

The artifact is read through ``read_artifact``, so its sha256 is checked before
anything is unpickled, as the service does.

``agree``: before any load, falcon-svc must report the exported model's version
(name, date and sha256 prefix) in its v2 model metadata, and the same probe texts go
to both servers' v2 endpoints with the same body; a version or a label that differs
stops the bench, since a comparison of two different models would measure nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cloudpickle

from falcon_svc.model import features, vader
from falcon_svc.model.artifact import read_artifact, read_metadata

MODEL_FILE = "model.joblib"
MODEL_SETTINGS_FILE = "model-settings.json"
# Modules whose functions and classes the fitted pipeline references by import path.
PICKLED_BY_VALUE = (features, vader)
PROBE_TEXTS = (
    "The delivery was excellent and the staff were friendly.",
    "The battery died after a day, so I asked for a refund.",
    "My order arrived on Tuesday.",
    "Not bad at all, I would buy it again!",
    "@united the flight was late again http://example.com",
)


def export_pipeline(model_dir: Path, output: Path) -> dict[str, Any]:
    """Write the verified pipeline of ``model_dir`` to ``output``; return its metadata.

    NOTE: register_pickle_by_value is process-wide state; it is undone afterwards so
    nothing else in this process pickles falcon_svc by value by accident.
    """
    pipeline, metadata = read_artifact(model_dir)
    for module in PICKLED_BY_VALUE:
        cloudpickle.register_pickle_by_value(module)
    try:
        with output.open("wb") as handle:
            cloudpickle.dump(pipeline, handle, protocol=5)
    finally:
        for module in PICKLED_BY_VALUE:
            cloudpickle.unregister_pickle_by_value(module)
    return metadata


def model_settings(name: str, version: str) -> dict[str, Any]:
    """Return MLServer's model-settings.json for the exported pipeline.

    No ``predict_fn``: the runtime's default output, ``predict`` (the label), so the
    request body of the bench needs nothing MLServer-specific. MLServer's defaults
    otherwise (no adaptive batching, as the service has none).
    """
    return {
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": f"./{MODEL_FILE}", "version": version},
    }


def export_for_mlserver(model_dir: Path, model_repo: Path) -> Path:
    """Export the model into ``model_repo/<name>/`` with its model-settings.json; return that folder."""
    name = str(read_metadata(model_dir)["name"])
    folder = model_repo / name
    folder.mkdir(parents=True, exist_ok=True)
    metadata = export_pipeline(model_dir, folder / MODEL_FILE)
    settings = model_settings(name, str(metadata["version"]))
    (folder / MODEL_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", "utf-8")
    return folder


def v2_request(texts: Sequence[str]) -> dict[str, Any]:
    """Return the OIP v2 body both servers get: one BYTES input named ``text``."""
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}]}


def labels_from_reply(reply: dict[str, Any]) -> list[str]:
    """Return the labels in a v2 reply: falcon-svc's ``label`` or MLServer's ``predict`` output."""
    for output in reply.get("outputs", []):
        if output.get("name") in ("label", "predict"):
            return [str(label) for label in output["data"]]
    raise ValueError(f"no 'label' or 'predict' output in the reply: {json.dumps(reply)[:300]}")


def post_json(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    """POST ``body`` as JSON; return the parsed reply (raise on a non-2xx status)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.load(response)
    return result


def get_json(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """GET ``url``; return the parsed reply (raise on a non-2xx status)."""
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        result: dict[str, Any] = json.load(response)
    return result


def disagreements(first: Sequence[str], second: Sequence[str], texts: Sequence[str]) -> list[str]:
    """Return one line per text the two label lists disagree on (or a length mismatch)."""
    if len(first) != len(second) or len(first) != len(texts):
        return [f"{len(texts)} texts sent, {len(first)} and {len(second)} labels returned"]
    return [f"{text!r}: {a} vs {b}" for text, a, b in zip(texts, first, second, strict=True) if a != b]


def check_agreement(falcon_url: str, mlserver_url: str, model_dir: Path, api_key: str = "") -> list[str]:
    """Return what shows the two servers run different models (nothing when they agree)."""
    metadata = read_metadata(model_dir)
    model_path = f"/v2/models/{metadata['name']}"
    falcon_headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    served = get_json(falcon_url + model_path, falcon_headers).get("versions", [])
    if metadata["version"] not in served:
        return [
            f"falcon-svc at {falcon_url} serves {metadata['name']} {served}, not {metadata['version']} "
            f"from {model_dir}: set MODEL_DIR to a copy of the model it serves"
        ]
    body = v2_request(PROBE_TEXTS)
    ours = labels_from_reply(post_json(f"{falcon_url}{model_path}/infer", body, falcon_headers))
    theirs = labels_from_reply(post_json(f"{mlserver_url}{model_path}/infer", body, {}))
    problems = disagreements(ours, theirs, PROBE_TEXTS)
    if problems:
        return ["falcon-svc and MLServer label the probe texts differently:", *problems]
    print(f"both serve {metadata['version']} and label the {len(PROBE_TEXTS)} probe texts alike: {', '.join(ours)}")
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write MODEL_REPO/<name>/{model.joblib,model-settings.json}")
    export.add_argument("model_dir", type=Path)
    export.add_argument("model_repo", type=Path)
    agree = commands.add_parser("agree", help="check falcon-svc serves MODEL_DIR and both label the probes alike")
    agree.add_argument("falcon_url", help="base URL, e.g. http://127.0.0.1:8000")
    agree.add_argument("mlserver_url", help="base URL")
    agree.add_argument("model_dir", type=Path, help="the model exported to MLServer")
    agree.add_argument("--api-key", default="", help="falcon-svc's API key, when it requires one")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(export_for_mlserver(args.model_dir, args.model_repo))
        return 0
    problems = check_agreement(args.falcon_url, args.mlserver_url, args.model_dir, args.api_key)
    if problems:
        print(*problems, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
