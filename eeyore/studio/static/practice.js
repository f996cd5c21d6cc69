"use strict";

const $ = (id) => document.getElementById(id);
const practice = { profiles: [], defaults: null, session: null, clientTurns: 0 };

function chosenRecord() {
  try { return JSON.parse($("profile-json").value); }
  catch (e) { throw new Error(`the edited profile is not valid JSON: ${e.message}`); }
}

function fillSettings(s) {
  $("temperature").value = s.temperature; $("top_p").value = s.top_p; $("max_tokens").value = s.max_tokens;
  $("sequence_bias").value = JSON.stringify(s.sequence_bias);
  const decay = s.exponential_decay_length_penalty || ["", ""];
  $("decay_start").value = decay[0]; $("decay_factor").value = decay[1];
}

function readSettings() {
  let bias;
  try { bias = JSON.parse($("sequence_bias").value || "[]"); }
  catch (e) { throw new Error("sequence_bias must be JSON, e.g. [[[2], -4.0]]"); }
  const decay = $("decay_start").value === "" ? null : [Number($("decay_start").value), Number($("decay_factor").value)];
  return { temperature: Number($("temperature").value), top_p: Number($("top_p").value),
           max_tokens: Number($("max_tokens").value), sequence_bias: bias, exponential_decay_length_penalty: decay };
}

async function renderPrompt() {
  showError($("error"), null);
  try {
    $("system-prompt").textContent = (await postJSON("/api/practice/render", { record: chosenRecord() })).system_prompt;
  } catch (e) { showError($("error"), e); }
}

function selectProfile() {
  const p = practice.profiles[Number($("profile-select").value)];
  $("profile-json").value = JSON.stringify(p.record, null, 1);
  renderPrompt();
}

function addTurn(kind, text) {
  const body = el("span", { class: "text", text });
  const node = el("div", { class: `turn ${kind}`, testid: `${kind}-turn` },
    el("span", { class: "who", text: kind === "client" ? "client" : "you" }), body);
  $("turns").append(node);
  node.scrollIntoView({ block: "end" });
  return body;
}

function setChatting(on) {
  $("message").disabled = $("send").disabled = $("end").disabled = !on;
}

async function startSession() {
  showError($("error"), null);
  try {
    const s = await postJSON("/api/practice/sessions", { record: chosenRecord(), settings: readSettings() });
    practice.session = s.id; practice.clientTurns = 0;
    $("system-prompt").textContent = s.system_prompt;
    $("turns").replaceChildren();
    $("session-state").textContent = "session started";
    $("download").href = `/api/practice/sessions/${s.id}/download`; $("download").hidden = false;
    $("to-annotate").disabled = true;
    setChatting(true); $("message").focus();
  } catch (e) { showError($("error"), e); }
}

// Streams the reply (JSON lines: {"delta"}..., then {"done"} or {"error"}) into a client turn.
async function send() {
  const text = $("message").value;
  if (!text.trim() || !practice.session) return;
  showError($("error"), null);
  setChatting(false);
  addTurn("counsellor", text);
  $("message").value = "";
  const resp = await postRaw(`/api/practice/sessions/${practice.session}/turns`, { content: text });
  if (!resp.ok) { showError($("error"), (await resp.json()).error); setChatting(true); return; }
  const target = addTurn("client", "");
  target.parentNode.setAttribute("aria-busy", "true");
  const reader = resp.body.getReader(), decoder = new TextDecoder();
  let buffered = "", failed = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const msg = JSON.parse(buffered.slice(0, nl)); buffered = buffered.slice(nl + 1);
      if (msg.delta !== undefined) target.textContent += msg.delta;
      if (msg.error) failed = msg.error;
    }
  }
  target.parentNode.removeAttribute("aria-busy");
  if (failed) { target.parentNode.remove(); showError($("error"), failed); }
  else { practice.clientTurns += 1; $("session-state").textContent = `${practice.clientTurns} client turn(s) saved`; $("to-annotate").disabled = false; }
  setChatting(true);
}

async function endSession() {
  try {
    await postJSON(`/api/practice/sessions/${practice.session}/end`);
    setChatting(false);
    $("session-state").textContent = `session ended; ${practice.clientTurns} client turn(s) saved`;
  } catch (e) { showError($("error"), e); }
}

async function queueForAnnotation() {
  try {
    $("to-annotate").disabled = true;
    const r = await postJSON("/api/annotate/sample", { session: practice.session, turn: practice.clientTurns });
    $("session-state").textContent = `queued for annotation (${r.total} items in the queue)`;
  } catch (e) { showError($("error"), e); $("to-annotate").disabled = false; }
}

async function init() {
  await loadSession();
  let data;
  for (;;) {  // the model may still be loading
    try { data = await getJSON("/api/practice/profiles"); break; }
    catch (e) { showError($("error"), e); await new Promise((r) => setTimeout(r, 2000)); }
  }
  showError($("error"), null);
  practice.profiles = data.profiles; practice.defaults = data.defaults;
  $("backend").textContent = `(replies from ${data.backend})`;
  data.profiles.forEach((p, i) => $("profile-select").append(el("option", { value: String(i), text: p.label })));
  fillSettings(data.defaults);
  $("profile-select").addEventListener("change", selectProfile);
  $("render").addEventListener("click", renderPrompt);
  $("reset-settings").addEventListener("click", () => fillSettings(practice.defaults));
  $("start").addEventListener("click", startSession);
  $("send").addEventListener("click", send);
  $("end").addEventListener("click", endSession);
  $("to-annotate").addEventListener("click", queueForAnnotation);
  $("message").addEventListener("keydown", (ev) => { if (ev.key === "Enter" && ev.ctrlKey) send(); });
  selectProfile();
  document.body.dataset.ready = "1";
}

document.addEventListener("DOMContentLoaded", init);
