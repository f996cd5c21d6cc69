"use strict";

const $ = (id) => document.getElementById(id);
let current = null, busy = false;

function showMessages(node, messages) {
  node.replaceChildren();
  for (const m of messages) {
    const who = { system: "profile (system prompt)", user: "counsellor", assistant: "client" }[m.role] || m.role;
    const box = el("div", { class: `msg ${m.role}` }, el("span", { class: "muted", text: who }), el("br"), m.content);
    node.append(m.role === "system" ? el("details", {}, el("summary", { text: "the client's profile" }), box) : box);
  }
  node.scrollTop = node.scrollHeight;
}

function show(state) {
  current = state.item;
  const p = state.progress;
  $("progress").textContent = `${p.done} of ${p.total} labelled`;
  $("item").hidden = !current; $("finished").hidden = !!current;
  if (!current) return;
  showMessages($("conversation"), current.prompt);
  $("candidate-a").textContent = current.a;
  $("candidate-b").textContent = current.b;
  $("rationale").value = "";
  for (const id of ["a-realistic", "a-consistent", "b-realistic", "b-consistent"]) $(id).checked = false;
}

async function label(choice) {
  if (!current || busy) return;
  busy = true;
  showError($("error"), null);
  const flags = {};
  for (const side of ["a", "b"]) flags[side] = { realistic: $(`${side}-realistic`).checked, consistent: $(`${side}-consistent`).checked };
  try {
    show(await postJSON("/api/annotate/label", { item: current.id, label: choice, rationale: $("rationale").value, flags }));
  } catch (e) {
    showError($("error"), e);
    if (e.status === 409) show(await getJSON("/api/annotate/next"));  // labelled in another tab
  } finally { busy = false; }
}

function onKey(ev) {
  const typing = ["TEXTAREA", "INPUT"].includes(document.activeElement?.tagName);
  if (typing || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const choice = { "1": "a", "2": "b", "0": "tie", s: "skip", S: "skip" }[ev.key];
  if (choice) { ev.preventDefault(); label(choice); }
}

async function start() {
  try {
    show(await getJSON("/api/annotate/next"));
    $("work").hidden = false;
    document.body.dataset.ready = "1";
  } catch (e) { showError($("error"), e); }
}

async function init() {
  await loadSession();
  for (const [id, choice] of [["choose-a", "a"], ["choose-b", "b"], ["tie", "tie"], ["skip", "skip"]]) {
    $(id).addEventListener("click", () => label(choice));
  }
  document.addEventListener("keydown", onKey);
  signInWidget($("main"), start);
}

document.addEventListener("DOMContentLoaded", init);
