"use strict";

const $ = (id) => document.getElementById(id);
let profiles = [], shown = null;

// The field names of the schema are the test ids: profile-field-age, and for nested values
// profile-field-symptom severity/<symptom>; the `profile` object's own name is left out.
function testid(path) {
  return "profile-field-" + (path[0] === "profile" ? path.slice(1) : path).join("/");
}

function input(path, value) {
  const parent = path[path.length - 2];
  const attrs = { testid: testid(path), "data-path": JSON.stringify(path), "aria-label": path.slice(1).join(" / ") };
  if (parent === "symptom severity") attrs.list = "severity";
  if (parent === "cognition distortion exhibition") attrs.list = "exhibition";
  const node = value.length > 70 ? el("textarea", { ...attrs, rows: "3" }) : el("input", attrs);
  node.value = value;
  return node;
}

function fieldsOf(value, path) {
  if (typeof value === "string") return [el("label", { text: path[path.length - 1] }), input(path, value)];
  const box = el("fieldset", {}, el("legend", { text: path.slice(1).join(" / ") || path[0] }));
  for (const [k, v] of Object.entries(value)) box.append(...fieldsOf(v, [...path, Array.isArray(value) ? Number(k) : k]));
  return [box];
}

function render(p) {
  shown = p;
  $("status").textContent = p.status;
  showMessages($("conversation"), (p.record.conversation || []).filter((m) => m.role !== "system"));
  const form = $("fields");
  form.replaceChildren();
  for (const key of ["profile", "cognitive profile"]) if (p.record[key]) form.append(...fieldsOf(p.record[key], [key]));
  $("history").replaceChildren(...p.history.map((h) =>
    el("li", { text: `v${h.version} ${h.decision} by ${h.by} at ${new Date(h.time * 1000).toLocaleString()}` })));
  showError($("validation-error"), null);
  markInvalid([]);
}

function showMessages(node, messages) {
  node.replaceChildren(...messages.map((m) => el("div", { class: `msg ${m.role}` },
    el("span", { class: "muted", text: m.role === "assistant" ? "client" : "supporter" }), el("br"), m.content)));
}

function edited() {
  const record = structuredClone(shown.record);
  for (const node of $("fields").querySelectorAll("[data-path]")) {
    const path = JSON.parse(node.dataset.path);
    let at = record;
    for (const k of path.slice(0, -1)) at = at[k];
    at[path[path.length - 1]] = node.value;
  }
  return record;
}

async function decide(decision) {
  showError($("validation-error"), null);
  markInvalid([]);
  try {
    const p = await postJSON(`/api/profiles/${shown.key}/decision`, { decision, record: edited() });
    profiles[profiles.findIndex((q) => q.key === p.key)] = p;
    fillList(p.key);
    render(p);
    $("status").textContent = `${p.status} (saved as version ${p.history.length})`;
  } catch (e) {
    showError($("validation-error"), e);
    markInvalid(e.errors || []);
  }
}

// The schema names a broken field by its dotted path ('profile.symptom severity.<name>').
function markInvalid(errors) {
  for (const node of $("fields").querySelectorAll("[data-path]")) {
    const dotted = `'${JSON.parse(node.dataset.path).join(".")}'`;
    const bad = errors.some((msg) => msg.includes(dotted));
    if (bad) node.setAttribute("aria-invalid", "true"); else node.removeAttribute("aria-invalid");
  }
}

function fillList(selected) {
  $("profile-list").replaceChildren(...profiles.map((p) => el("option", { value: p.key, text: `${p.label} · ${p.status}` })));
  $("profile-list").value = selected;
}

async function start() {
  try {
    profiles = (await getJSON("/api/profiles")).profiles;
    fillList(profiles[0].key);
    render(profiles[0]);
    $("work").hidden = false;
    document.body.dataset.ready = "1";
  } catch (e) { showError($("error"), e); }
}

async function init() {
  await loadSession();
  $("profile-list").addEventListener("change", () => render(profiles.find((p) => p.key === $("profile-list").value)));
  $("save").addEventListener("click", () => decide("edited"));
  $("accept").addEventListener("click", () => decide("accepted"));
  $("reject").addEventListener("click", () => decide("rejected"));
  signInWidget($("main"), start);
}

document.addEventListener("DOMContentLoaded", init);
