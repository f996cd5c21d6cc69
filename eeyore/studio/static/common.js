// Shared by every studio page. Model and user text only ever reaches the page through
// textContent (see `el`), never as HTML.
"use strict";

const studio = { csrf: null, who: null, signIn: false };

async function loadSession() {
  const info = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  Object.assign(studio, { csrf: info.csrf, who: info.who, signIn: info.sign_in, backend: info.backend });
  return info;
}

// An element with attributes and text children; strings become text nodes, never markup.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "testid") node.dataset.testid = v;
    else if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function getJSON(path) {
  const resp = await fetch(path, { credentials: "same-origin" });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function postRaw(path, body) {
  return fetch(path, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": studio.csrf },
    body: JSON.stringify(body || {}),
  });
}

async function postJSON(path, body) {
  const resp = await postRaw(path, body);
  const data = await resp.json();
  if (!resp.ok) throw Object.assign(new Error(data.error || resp.statusText), { status: resp.status, errors: data.errors || [] });
  return data;
}

function showError(node, err) {
  node.textContent = err ? String(err.message || err) : "";
  node.hidden = !err;
}

// The sign-in form of Annotate and Profiles; calls `then` once someone is signed in.
function signInWidget(root, then) {
  const bar = document.getElementById("who");
  const show = () => {
    bar.textContent = studio.who ? `signed in as ${studio.who}` : "";
    if (studio.who && studio.signIn) {
      bar.append(" ", el("button", { type: "button", text: "Sign out", onclick: async () => {
        await postJSON("/api/signout"); location.reload(); } }));
    }
  };
  if (!studio.signIn || studio.who) { show(); then(); return; }
  const name = el("input", { id: "signin-name", placeholder: "name", autocomplete: "username" });
  const token = el("input", { id: "signin-token", placeholder: "token", type: "password", autocomplete: "current-password" });
  const error = el("p", { class: "error", role: "alert" }); error.hidden = true;
  const form = el("form", { class: "signin", id: "signin" }, el("h2", { text: "Sign in" }), name, token,
    el("button", { type: "submit", id: "signin-submit", text: "Sign in" }), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      studio.who = (await postJSON("/api/signin", { name: name.value, token: token.value })).who;
      form.remove(); show(); then();
    } catch (e) { showError(error, e); }
  });
  root.prepend(form);
}
