"""API keys in the app: which routes need one, the 401 shapes, what an accepted key leaves behind."""

from __future__ import annotations

import falcon.testing
import pytest

from falcon_svc.app import create_app
from falcon_svc.auth import served
from falcon_svc.auth.keys import KeyRecord, KeyStore, generate_key, key_sha256
from falcon_svc.auth.middleware import KEY_ID_HEADER, bearer_token
from falcon_svc.settings import Settings
from falcon_svc.startup import EXIT_CONFIG

KEY = generate_key("client-a")
KEY_A = generate_key("a")
TEXT = {"text": "I love it"}
V2_BODY = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["I love it"]}]}


@pytest.fixture
def keyed(settings, model, lifecycle) -> falcon.testing.TestClient:
    store = KeyStore([KeyRecord("client-a", key_sha256(KEY))])
    return falcon.testing.TestClient(create_app(settings, model, lifecycle=lifecycle, worker_id="t:1", api_keys=store))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_no_keys_means_no_authentication(client):
    assert client.simulate_post("/infer", json=TEXT).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [("/infer", TEXT), ("/infer/batch", {"texts": ["a", "b"]}), ("/v2/models/sentiment/infer", V2_BODY)],
)
def test_inference_routes_need_a_key(keyed, path, body, model):
    path = path.replace("sentiment", model.name)
    missing = keyed.simulate_post(path, json=body)
    assert missing.status_code == 401, missing.text
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="falcon-svc"'
    assert KEY_ID_HEADER not in missing.headers
    wrong = keyed.simulate_post(path, json=body, headers=bearer(generate_key("client-a")))
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == 'Bearer realm="falcon-svc", error="invalid_token"'
    good = keyed.simulate_post(path, json=body, headers=bearer(KEY))
    assert good.status_code == 200, good.text
    assert good.headers[KEY_ID_HEADER] == "client-a"


def test_401_bodies_have_the_error_shape_of_their_route(keyed, model):
    ours = keyed.simulate_post("/infer", json=TEXT).json
    assert ours["error"]["code"] == "unauthorized" and ours["error"]["field"] is None, ours
    oip = keyed.simulate_post(f"/v2/models/{model.name}/infer", json=V2_BODY).json
    assert oip["code"] == "unauthorized" and isinstance(oip["error"], str), oip


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/", "/v2/health/live", "/v2"])
def test_probes_metrics_and_docs_stay_open(keyed, path):
    assert keyed.simulate_get(path).status_code in (200, 503), path


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer fsk_a_b", "fsk_a_b"),
        ("bearer  fsk_a_b ", "fsk_a_b"),
    ],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_an_accepted_key_names_the_client_for_logs_and_idempotency(settings, model, lifecycle):
    seen: dict[str, object] = {}

    class Spy:
        def process_response(self, req, resp, resource, req_succeeded):
            seen.update(key_id=req.context.get("client_key_id"), client=req.context.get("client_id"))

    store = KeyStore([KeyRecord("client-a", key_sha256(KEY))])
    app = create_app(settings, model, lifecycle=lifecycle, worker_id="t:1", api_keys=store)
    app.add_middleware(Spy())
    falcon.testing.TestClient(app).simulate_post("/infer", json=TEXT, headers=bearer(KEY))
    assert seen == {"key_id": "client-a", "client": "client-a"}


# --- Which keys a process serves (falcon_svc/auth/served.py) ------------------------------


@pytest.fixture
def master(monkeypatch):
    monkeypatch.setattr(served, "_MASTER", served._MasterKeys())
    return served._MASTER


def write_keys(path, *ids_and_keys: tuple[str, str]) -> None:
    path.write_text("".join(f"{key_id} {key_sha256(key)}\n" for key_id, key in ids_and_keys))


def test_master_reload_swaps_a_good_file_whole_and_keeps_the_old_keys_on_a_bad_one(tmp_path, master, caplog):
    path = tmp_path / "api_keys"
    key_b = generate_key("b")
    write_keys(path, ("a", KEY_A))
    settings = Settings(api_keys_file=str(path))
    served.load_in_master(settings)
    before = served.keys_for_app(settings)
    assert before is not None and before.authenticate(KEY_A) == "a"

    write_keys(path, ("a", KEY_A), ("b", key_b))
    path.write_text(path.read_text() + "c not-a-hash\n")
    served.reload_in_master()
    after_bad = served.keys_for_app(settings)
    assert after_bad is before, "a file that does not parse whole must keep the keys before it"
    assert "API key file not reloaded" in caplog.text and f"{path}:3" in caplog.text

    write_keys(path, ("b", key_b))
    served.reload_in_master()
    after = served.keys_for_app(settings)
    assert after is not None and after.authenticate(key_b) == "b" and after.authenticate(KEY_A) is None


def test_workers_use_the_masters_keys_not_the_file_edited_since(tmp_path, master):
    path = tmp_path / "api_keys"
    write_keys(path, ("a", KEY_A))
    settings = Settings(api_keys_file=str(path))
    served.load_in_master(settings)
    path.write_text("")
    store = served.keys_for_app(settings)
    assert store is not None and store.authenticate(KEY_A) == "a"


def test_a_bad_file_at_start_exits_78(tmp_path, master, caplog):
    path = tmp_path / "api_keys"
    path.write_text("a\n")
    with pytest.raises(SystemExit) as exited:
        served.load_in_master(Settings(api_keys_file=str(path)))
    assert exited.value.code == EXIT_CONFIG
    assert "invalid API key file" in caplog.text
    with pytest.raises(SystemExit):
        served.keys_for_app(Settings(api_keys_file=str(tmp_path / "missing")))


def test_empty_setting_turns_authentication_off_loudly(master, caplog):
    served.load_in_master(Settings())
    assert served.keys_for_app(Settings()) is None
    assert "API keys off" in caplog.text
