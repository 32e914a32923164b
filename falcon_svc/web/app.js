// The demo page: read the form, call the API, show what it answered.
//
// Loaded from /static/app.js with no inline script or handler anywhere, so the
// page runs under a strict Content-Security-Policy (script-src 'self'). Every
// value from the service is written with textContent, never innerHTML: a text
// echoed back can never become markup.
"use strict";

(function () {
  const LABEL_ORDER = ["negative", "neutral", "positive"];
  const EXAMPLES = {
    single: "The delivery was quick and the staff were lovely.",
    batch: [
      "I love this phone, the battery lasts for days.",
      "The package arrived on Tuesday.",
      "Terrible service, I want my money back.",
    ].join("\n"),
  };
  const TEXT_LABELS = {
    single: "Text to classify",
    batch: "Texts to classify, one per line",
  };

  // NOTE: sessionStorage, not localStorage: the key leaves with the tab, and no
  // cookie carries it, so no other page of this origin sends it without asking.
  const KEY_STORAGE = "falcon-svc.api-key";
  const KEY_HINTS = {
    missing: "This service needs an API key: enter yours in the API key field above and classify again.",
    refused: "The API key entered above was refused: check it (or ask for a new one) and classify again.",
  };

  const byId = (id) => document.getElementById(id);
  let completed = 0;

  function currentMode() {
    return document.querySelector('input[name="mode"]:checked').value;
  }

  function apiKey() {
    return byId("api-key-input").value.trim();
  }

  // Keep the key for this tab only; an emptied field forgets it.
  function rememberKey() {
    try {
      if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch (err) {
      // Storage off (a privacy setting): the key still works until the page is left.
    }
  }

  function restoreKey() {
    try {
      byId("api-key-input").value = sessionStorage.getItem(KEY_STORAGE) || "";
    } catch (err) {
      byId("api-key-input").value = "";
    }
  }

  // POST a JSON body (with the API key, if one is entered); return what came back
  // and the round trip as this page saw it.
  async function postJSON(path, body) {
    const started = performance.now();
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    if (apiKey()) headers.Authorization = "Bearer " + apiKey();
    let response;
    let text;
    try {
      response = await fetch(path, { method: "POST", headers: headers, body: JSON.stringify(body) });
      text = await response.text();
    } catch (err) {
      return { status: 0, body: null, networkError: String(err), rtt: performance.now() - started };
    }
    const rtt = performance.now() - started;
    let parsed = null;
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      parsed = null;
    }
    return { ok: response.ok, status: response.status, statusText: response.statusText, body: parsed, rtt: rtt };
  }

  function formatMs(value, digits) {
    return typeof value === "number" ? value.toFixed(digits) : "–";
  }

  function formatPercent(probability) {
    return (probability * 100).toFixed(1) + "%";
  }

  function orderedLabels(probabilities) {
    const known = LABEL_ORDER.filter((label) => label in probabilities);
    const others = Object.keys(probabilities).filter((label) => !LABEL_ORDER.includes(label)).sort();
    return known.concat(others);
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // One row per label: name, a bar as wide as the probability, the percentage.
  function fillBars(container, probabilities) {
    container.replaceChildren();
    for (const label of orderedLabels(probabilities)) {
      const row = element("div", "bar-row");
      row.dataset.label = label;
      row.appendChild(element("span", "bar-name", label));
      const track = element("span", "bar-track");
      track.setAttribute("aria-hidden", "true");
      const fill = element("span", "bar-fill label-" + label);
      // CSSOM, not a style attribute: allowed under style-src 'self'.
      fill.style.width = (probabilities[label] * 100).toFixed(1) + "%";
      track.appendChild(fill);
      row.appendChild(track);
      row.appendChild(element("span", "bar-value", formatPercent(probabilities[label])));
      container.appendChild(row);
    }
    return container;
  }

  function showModelVersion(version) {
    if (version) byId("model-version").textContent = version;
  }

  function showDetails(body, rtt, cacheText) {
    byId("detail-model-version").textContent = body.model_version || "–";
    byId("detail-processing").textContent = formatMs(body.processing_time_ms, 3);
    byId("detail-rtt").textContent = formatMs(rtt, 1);
    byId("detail-worker").textContent = body.worker_id || "–";
    byId("detail-cache").textContent = cacheText;
    byId("detail-request-id").textContent = body.request_id || "–";
    showModelVersion(body.model_version);
  }

  function showSingle(body, rtt) {
    const label = byId("label");
    label.textContent = body.label;
    label.className = "label label-" + body.label;
    byId("confidence").textContent = formatPercent(body.confidence);
    fillBars(byId("probabilities"), body.probabilities);
    byId("single-result").hidden = false;
    byId("batch-result").hidden = true;
    showDetails(body, rtt, body.cache_hit ? "yes" : "no");
  }

  function showBatch(body, texts, rtt) {
    const rows = byId("batch-rows");
    rows.replaceChildren();
    body.results.forEach((result, index) => {
      const row = element("tr");
      row.appendChild(element("td", "index", String(index + 1)));
      row.appendChild(element("td", "text", texts[index]));
      const labelCell = element("td");
      labelCell.appendChild(element("strong", "label label-" + result.label, result.label));
      row.appendChild(labelCell);
      const barsCell = element("td");
      barsCell.appendChild(fillBars(element("div", "bars compact"), result.probabilities));
      row.appendChild(barsCell);
      row.appendChild(element("td", "cache", result.cache_hit ? "hit" : "miss"));
      rows.appendChild(row);
    });
    byId("batch-caption").textContent = body.count + (body.count === 1 ? " text classified" : " texts classified");
    byId("batch-result").hidden = false;
    byId("single-result").hidden = true;
    const hits = body.results.filter((result) => result.cache_hit).length;
    showDetails(body, rtt, hits + " of " + body.count);
  }

  // Show the API's own error: { error: { code, message, field } }; anything else
  // (a proxy's page, no answer at all) is described as plainly as possible.
  function showError(reply) {
    const error = reply.body && reply.body.error;
    let code = "";
    let message;
    let field = null;
    if (error && typeof error === "object") {
      code = error.code || "";
      message = error.message || "";
      field = error.field;
    } else if (typeof error === "string") {
      message = error;
    } else if (reply.status === 0) {
      message = "No answer from the service: " + reply.networkError;
    } else {
      message = "The service answered " + reply.status + " " + (reply.statusText || "") + " without a JSON error.";
    }
    byId("error-status").textContent = reply.status ? "HTTP " + reply.status : "Network error";
    byId("error-code").textContent = code;
    byId("error-message").textContent = message;
    byId("error-field").textContent = field || "";
    byId("error-field-row").hidden = !field;
    // A 401 is this page's to fix: say what to do, next to the service's own message.
    const hint = reply.status === 401 ? KEY_HINTS[apiKey() ? "refused" : "missing"] : "";
    byId("error-hint").textContent = hint;
    byId("error-hint").hidden = !hint;
    byId("error").hidden = false;
    byId("result").hidden = true;
    if (hint) byId("api-key-input").focus();
  }

  function setBusy(busy) {
    byId("classify-button").disabled = busy;
    byId("busy").hidden = !busy;
    byId("classify-form").setAttribute("aria-busy", busy ? "true" : "false");
  }

  async function classify(event) {
    event.preventDefault();
    const mode = currentMode();
    const raw = byId("text-input").value;
    // Blank input is sent as it is: the service's own message says what is wrong.
    const texts = raw.split(/\r?\n/).filter((line) => line.trim() !== "");
    rememberKey(); // what is sent is what is kept, however the field was filled
    setBusy(true);
    try {
      const reply = mode === "batch" ? await postJSON("/infer/batch", { texts: texts }) : await postJSON("/infer", { text: raw });
      if (reply.ok && reply.body) {
        byId("error").hidden = true;
        byId("result").hidden = false;
        if (mode === "batch") showBatch(reply.body, texts, reply.rtt);
        else showSingle(reply.body, reply.rtt);
      } else {
        showError(reply);
      }
    } finally {
      setBusy(false);
      completed += 1;
      // Lets a browser test wait for this answer instead of sleeping.
      document.body.dataset.completed = String(completed);
    }
  }

  function onModeChange() {
    const mode = currentMode();
    byId("text-label").textContent = TEXT_LABELS[mode];
    byId("text-input").rows = mode === "batch" ? 8 : 5;
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", { headers: { Accept: "application/json" } });
      const body = await response.json();
      const model = body.models && body.models[0];
      if (!model) throw new Error("no model listed");
      byId("model-version").textContent = model.version;
      byId("model-info").title = model.name + " (" + model.kind + ", " + model.scorer + " scorer)";
    } catch (err) {
      byId("model-version").textContent = "unknown (GET /v1/models failed)";
    }
  }

  function init() {
    restoreKey();
    byId("api-key-input").addEventListener("input", rememberKey);
    byId("classify-form").addEventListener("submit", classify);
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", onModeChange);
    }
    byId("example-button").addEventListener("click", () => {
      byId("text-input").value = EXAMPLES[currentMode()];
      byId("text-input").focus();
    });
    byId("text-input").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        byId("classify-form").requestSubmit();
      }
    });
    onModeChange();
    loadModel();
  }

  init();
})();
