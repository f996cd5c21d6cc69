"use strict";

const fmt = (x) => (x === null || x === undefined ? "—" : x.toFixed(3));

async function init() {
  await loadSession();
  try {
    const s = await getJSON("/api/annotate/summary");
    document.getElementById("total").textContent = `(${s.total} items in the queue)`;
    const rows = document.querySelector("#annotators tbody");
    for (const a of s.annotators) {
      rows.append(el("tr", {}, el("td", { text: a.name }), el("td", { text: `${a.done} / ${s.total}` }),
        el("td", { text: String(a.chosen) }), el("td", { text: String(a.ties) }), el("td", { text: String(a.skips) })));
    }
    const pairs = document.querySelector("#pairs tbody");
    for (const p of s.pairs) {
      pairs.append(el("tr", { testid: "kappa-row" }, el("td", { text: `${p.a} · ${p.b}` }), el("td", { text: String(p.items) }),
        el("td", { text: fmt(p.agreement) }), el("td", { text: fmt(p.kappa) })));
    }
    document.body.dataset.ready = "1";
  } catch (e) { showError(document.getElementById("error"), e); }
}

document.addEventListener("DOMContentLoaded", init);
