"""The demo page (/) and Swagger UI (/docs) in a real browser.

Headless Chromium (Debian's chromium and chromium-driver, through selenium) drives a
real `falcon-svc serve` that loads the trained model in models/sentiment, so the labels
on the page are the model's. Without that model the tests skip, or fail when CI or
FALCON_REQUIRE_MODEL is set; without chromium they skip, or fail under CI
(tests/tools.py). Each test leaves its screenshots in its tmp_path.

The page sets ``data-completed`` on <body> after each answer it shows: the tests wait
for that instead of sleeping. A second service requires an API key (as the Ansible
deployment does by default): the page's key field must get the demo through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from test_gunicorn_serving import call, free_port, running_service, service_env
from tools import model_required, require_tool, skip_or_fail

from falcon_svc.auth.keys import KeyRecord, generate_key, key_sha256, write_key_file
from falcon_svc.model.artifact import METADATA_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "models" / "sentiment"
WAIT_SECONDS = 30

POSITIVE = "I absolutely love this phone: the battery lasts for days and the screen is gorgeous."
NEGATIVE = "This was a terrible experience. The food was cold and the staff were rude."
NEUTRAL = "The package arrived on Tuesday."

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # root has no user namespace sandbox here
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # No network beyond the service: no update checks, no sync, no component downloads.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1200",
)


@pytest.fixture(scope="module")
def trained_model_dir() -> Path:
    """models/sentiment, when it holds the trained model (the dummy's labels mean nothing)."""
    metadata = MODEL_DIR / METADATA_FILE
    kind = json.loads(metadata.read_text()).get("kind") if metadata.is_file() else None
    if kind is None or kind == "dummy":
        found = "the dummy model" if kind else "no model"
        skip_or_fail(f"{MODEL_DIR} holds {found}; train it with `make model`", required=model_required())
    return MODEL_DIR


@pytest.fixture(scope="module")
def port(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real `falcon-svc serve` on a free port; one worker, so a repeated text is a cache hit."""
    directory = tmp_path_factory.mktemp("demo-service")
    bound = free_port()
    env = service_env(trained_model_dir, bound, directory, WORKERS="1", REQUEST_LOG_ENABLED="false")
    with running_service(env, directory / "service.log"):
        yield bound


@pytest.fixture(scope="module")
def keyed_service(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """A real `falcon-svc serve` that requires an API key (API_KEYS_FILE); yields its port and a key."""
    directory = tmp_path_factory.mktemp("demo-keyed-service")
    key = generate_key("demo")
    write_key_file(directory / "api_keys", [KeyRecord("demo", key_sha256(key))])
    bound = free_port()
    env = service_env(
        trained_model_dir,
        bound,
        directory,
        WORKERS="1",
        REQUEST_LOG_ENABLED="false",
        API_KEYS_FILE=str(directory / "api_keys"),
    )
    with running_service(env, directory / "service.log"):
        yield bound, key


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile, logging the console for the checks below."""
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium", "chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(require_tool("chromedriver", "chromium-driver")), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(browser: WebDriver, condition, what: str):
    return WebDriverWait(browser, WAIT_SECONDS).until(condition, message=f"timed out waiting for {what}")


def text_of(browser: WebDriver, element_id: str) -> str:
    """The element's text as the page wrote it (CSS may capitalise what is shown)."""
    return browser.find_element(By.ID, element_id).get_attribute("textContent").strip()


def open_demo(browser: WebDriver, port: int) -> None:
    """Load the page and wait until it has asked GET /v1/models for the model version."""
    browser.get(f"http://127.0.0.1:{port}/")
    wait_until(browser, lambda b: text_of(b, "model-version") != "loading…", "the model version")


def submit(browser: WebDriver, text: str, *, batch: bool = False, typed: bool = True) -> None:
    """Fill the form (typed key by key, or set at once for long input), press Classify, wait for the answer."""
    browser.find_element(By.CSS_SELECTOR, f'input[name="mode"][value="{"batch" if batch else "single"}"]').click()
    box = browser.find_element(By.ID, "text-input")
    box.clear()
    if typed:
        box.send_keys(text)
    else:
        browser.execute_script("arguments[0].value = arguments[1];", box, text)
    before = int(browser.find_element(By.TAG_NAME, "body").get_attribute("data-completed") or 0)
    browser.find_element(By.ID, "classify-button").click()
    wait_until(
        browser,
        lambda b: int(b.find_element(By.TAG_NAME, "body").get_attribute("data-completed") or 0) > before,
        "the page to show the answer",
    )


def shown_bars(browser: WebDriver, container: str = "#probabilities") -> dict[str, float]:
    """The probability bars under ``container``: label -> percentage shown."""
    rows = browser.find_elements(By.CSS_SELECTOR, f"{container} .bar-row")
    return {
        row.get_attribute("data-label"): float(
            row.find_element(By.CSS_SELECTOR, ".bar-value").get_attribute("textContent").rstrip("%")
        )
        for row in rows
    }


def console_problems(browser: WebDriver) -> list[str]:
    """Console errors since the last call: failed loads, script errors, CSP refusals."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def model_version(port: int) -> str:
    status, _, body = call(port, "GET", "/v1/models")
    assert status == 200, body
    return body["models"][0]["version"]


def test_a_text_shows_label_bars_latency_worker_cache_and_model(browser, port, tmp_path):
    open_demo(browser, port)
    version = model_version(port)
    assert text_of(browser, "model-version") == version, "the header does not show GET /v1/models' version"

    submit(browser, POSITIVE)
    browser.save_screenshot(str(tmp_path / "demo-positive.png"))
    assert browser.find_element(By.ID, "result").is_displayed(), text_of(browser, "error-message")
    assert text_of(browser, "label") == "positive", f"{POSITIVE!r} shown as {text_of(browser, 'label')}"
    bars = shown_bars(browser)
    assert list(bars) == ["negative", "neutral", "positive"], bars
    assert max(bars, key=bars.get) == "positive" and abs(sum(bars.values()) - 100) < 0.5, bars
    assert text_of(browser, "detail-model-version") == version
    assert float(text_of(browser, "detail-processing")) > 0, text_of(browser, "detail-processing")
    assert float(text_of(browser, "detail-rtt")) > 0, text_of(browser, "detail-rtt")
    assert text_of(browser, "detail-worker").startswith("itest:"), text_of(browser, "detail-worker")
    assert text_of(browser, "detail-cache") == "no"
    assert re.fullmatch(r"[0-9a-f]{32}", text_of(browser, "detail-request-id")), text_of(browser, "detail-request-id")

    submit(browser, NEGATIVE)
    assert text_of(browser, "label") == "negative", f"{NEGATIVE!r} shown as {text_of(browser, 'label')}"
    assert max(shown_bars(browser), key=shown_bars(browser).get) == "negative"

    # One worker: the same text again is answered from its in-process cache.
    submit(browser, POSITIVE)
    assert text_of(browser, "label") == "positive" and text_of(browser, "detail-cache") == "yes"
    browser.save_screenshot(str(tmp_path / "demo.png"))
    assert not console_problems(browser), "a failed load, a script error or a Content-Security-Policy refusal"


def test_a_batch_shows_one_row_per_line(browser, port, tmp_path):
    open_demo(browser, port)
    submit(browser, f"{POSITIVE}\n\n{NEGATIVE}\n{NEUTRAL}", batch=True)
    browser.save_screenshot(str(tmp_path / "demo-batch.png"))
    assert browser.find_element(By.ID, "batch-result").is_displayed(), text_of(browser, "error-message")
    rows = browser.find_elements(By.CSS_SELECTOR, "#batch-rows tr")
    assert len(rows) == 3, "the blank line should be skipped and each other line get a row"
    texts = [row.find_element(By.CSS_SELECTOR, "td.text").get_attribute("textContent") for row in rows]
    labels = [row.find_element(By.CSS_SELECTOR, ".label").get_attribute("textContent") for row in rows]
    assert texts == [POSITIVE, NEGATIVE, NEUTRAL], texts
    assert labels[:2] == ["positive", "negative"], labels
    assert len(shown_bars(browser, "#batch-rows tr:nth-child(1)")) == 3
    assert text_of(browser, "batch-caption") == "3 texts classified"
    assert text_of(browser, "detail-model-version") == model_version(port)
    assert text_of(browser, "detail-worker").startswith("itest:")
    assert re.fullmatch(r"\d of 3", text_of(browser, "detail-cache")), text_of(browser, "detail-cache")
    assert not console_problems(browser), "a failed load, a script error or a Content-Security-Policy refusal"


@pytest.mark.parametrize(
    ("case", "path", "body"),
    [
        ("blank", "/infer", {"text": "   "}),
        ("too-long", "/infer", {"text": "word " * 2000}),
        ("too-many", "/infer/batch", {"texts": [f"line {i}" for i in range(51)]}),
    ],
)
def test_an_error_shows_the_apis_own_message(browser, port, tmp_path, case, path, body):
    status, _, expected = call(port, "POST", path, body)
    assert status == 422, expected
    open_demo(browser, port)
    batch = "texts" in body
    submit(browser, "\n".join(body["texts"]) if batch else body["text"], batch=batch, typed=case == "blank")
    browser.save_screenshot(str(tmp_path / f"demo-error-{case}.png"))
    assert browser.find_element(By.ID, "error").is_displayed(), "no error shown"
    assert not browser.find_element(By.ID, "result").is_displayed(), "a stale result is still shown"
    assert text_of(browser, "error-status") == "HTTP 422"
    assert text_of(browser, "error-code") == expected["error"]["code"]
    assert text_of(browser, "error-message") == expected["error"]["message"]
    assert text_of(browser, "error-field") == expected["error"]["field"]
    # The next good request clears the error.
    submit(browser, POSITIVE)
    assert not browser.find_element(By.ID, "error").is_displayed() and text_of(browser, "label") == "positive"
    # Chromium logs every 4xx fetch as an error: the 422 asked for, and nothing else.
    unexpected = [line for line in console_problems(browser) if f"{path} - Failed to load resource" not in line]
    assert not unexpected, unexpected


def test_docs_renders_every_operation_offline(browser, port, tmp_path):
    browser.get(f"http://127.0.0.1:{port}/docs")
    wait_until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"), "Swagger UI's operations")
    browser.save_screenshot(str(tmp_path / "docs.png"))
    shown = {
        (
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").get_attribute("textContent").lower(),
        )
        for block in browser.find_elements(By.CSS_SELECTOR, ".opblock")
    }
    _, _, spec = call(port, "GET", "/openapi.json")
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert ("/infer", "post") in shown, sorted(shown)
    assert shown == documented, f"missing: {sorted(documented - shown)}, extra: {sorted(shown - documented)}"
    # Open POST /infer: its schemas and examples render under the same policy.
    infer = "#operations-inference-infer"
    browser.find_element(By.CSS_SELECTOR, f"{infer} .opblock-summary").click()
    wait_until(browser, lambda b: b.find_elements(By.CSS_SELECTOR, f"{infer} .opblock-body"), "POST /infer to open")
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    elsewhere = [url for url in loaded if not url.startswith(f"http://127.0.0.1:{port}/")]
    assert not elsewhere, f"/docs fetched from other hosts: {elsewhere}"
    assert not console_problems(browser), "a failed load, a script error or a Content-Security-Policy refusal"


def fill_api_key(browser: WebDriver, key: str) -> None:
    """Replace the key field's text by keyboard, as a person would (so the page sees each input event)."""
    box = browser.find_element(By.ID, "api-key-input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    if key:
        box.send_keys(key)


def test_a_keyed_service_says_a_key_is_needed_and_classifies_with_one(browser, keyed_service, tmp_path):
    """Keys on (the deployment's default): the 401 is shown with what to do; the key entered is sent."""
    port, key = keyed_service
    status, _, refused = call(port, "POST", "/infer", {"text": POSITIVE})
    assert status == 401, refused
    open_demo(browser, port)
    key_box = browser.find_element(By.ID, "api-key-input")
    assert key_box.get_attribute("type") == "password", "the key would be shown on screen"

    submit(browser, POSITIVE)
    browser.save_screenshot(str(tmp_path / "demo-keyed-no-key.png"))
    assert browser.find_element(By.ID, "error").is_displayed(), "no error shown for the 401"
    assert text_of(browser, "error-status") == "HTTP 401"
    assert text_of(browser, "error-code") == refused["error"]["code"]
    assert text_of(browser, "error-message") == refused["error"]["message"]
    assert browser.find_element(By.ID, "error-hint").is_displayed(), "the 401 does not say what to do"
    assert "API key field" in text_of(browser, "error-hint"), text_of(browser, "error-hint")

    fill_api_key(browser, key[:-2] + "xx")
    submit(browser, POSITIVE)
    assert text_of(browser, "error-status") == "HTTP 401", "a wrong key was not refused"
    assert "refused" in text_of(browser, "error-hint"), text_of(browser, "error-hint")

    fill_api_key(browser, key)
    submit(browser, POSITIVE)
    browser.save_screenshot(str(tmp_path / "demo-keyed.png"))
    assert browser.find_element(By.ID, "result").is_displayed(), text_of(browser, "error-message")
    assert not browser.find_element(By.ID, "error").is_displayed(), "the 401 is still shown"
    assert text_of(browser, "label") == "positive", f"{POSITIVE!r} shown as {text_of(browser, 'label')}"

    # Kept for this tab only: a reload still has it; it is in no cookie and not in localStorage.
    open_demo(browser, port)
    assert browser.find_element(By.ID, "api-key-input").get_attribute("value") == key, "the key was not kept"
    stored = browser.execute_script(
        "return [sessionStorage.getItem('falcon-svc.api-key'), JSON.stringify(localStorage), document.cookie]"
    )
    assert stored == [key, "{}", ""], stored
    submit(browser, NEGATIVE)
    assert text_of(browser, "label") == "negative", text_of(browser, "error-message")

    # Emptying the field forgets the key.
    fill_api_key(browser, "")
    assert browser.execute_script("return sessionStorage.getItem('falcon-svc.api-key')") is None
    # Chromium logs every 4xx fetch as an error: the two 401s asked for, and nothing else.
    unexpected = [line for line in console_problems(browser) if "/infer - Failed to load resource" not in line]
    assert not unexpected, unexpected
