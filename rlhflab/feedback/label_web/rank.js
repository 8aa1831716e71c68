// The ranking page of `rlhflab label serve`: order the answers by clicking, dragging or keys,
// tie them, flag rules, and submit the label as JSON. Plain JS, no library, nothing fetched
// from elsewhere. Every text is set with textContent, never as HTML.
"use strict";

(() => {
  const task = document.getElementById("task");
  if (!task) return;
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const order = document.getElementById("order");
  const allBad = document.getElementById("all-bad");
  const status = document.getElementById("status");
  const cards = [...document.querySelectorAll(".answer")];
  const slots = cards.map((c) => c.dataset.slot);
  const card = (slot) => document.getElementById("answer-" + slot);
  const started = Date.now();
  let sending = false;

  const items = () => [...order.children];
  const itemOf = (slot) => items().find((li) => li.dataset.slot === slot);

  function makeItem(slot) {
    const li = document.createElement("li");
    li.draggable = true;
    li.dataset.slot = slot;
    const tie = document.createElement("label");
    tie.className = "tie";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.addEventListener("change", refresh);
    tie.append(box, " tie");
    const level = document.createElement("span");
    level.className = "level";
    const letter = document.createElement("span");
    letter.className = "letter";
    letter.textContent = slot;
    const snippet = document.createElement("span");
    snippet.className = "snippet";
    snippet.textContent = card(slot).querySelector(".text").textContent.slice(0, 60);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.title = "take back";
    remove.addEventListener("click", () => { li.remove(); refresh(); });
    li.append(level, letter, tie, snippet, remove);
    li.addEventListener("dragstart", (e) => e.dataTransfer.setData("text/plain", slot));
    return li;
  }

  // Places: ties share the place of the answer above them.
  function refresh() {
    let level = 0;
    items().forEach((li, i) => {
      const tie = li.querySelector(".tie input");
      tie.disabled = i === 0;
      if (i === 0) tie.checked = false;
      if (!tie.checked) level += 1;
      li.dataset.level = String(level);
      li.querySelector(".level").textContent = String(level);
    });
    for (const slot of slots) {
      const li = itemOf(slot);
      card(slot).classList.toggle("placed", Boolean(li));
      card(slot).querySelector(".place").textContent = li ? "place " + li.dataset.level : "";
    }
  }

  function place(slot, before = null) {
    if (!slots.includes(slot)) return;
    const li = itemOf(slot) || makeItem(slot);
    order.insertBefore(li, before);
    refresh();
  }

  function tiers() {
    const out = [];
    for (const li of items()) {
      if (li.querySelector(".tie input").checked && out.length) out[out.length - 1].push(li.dataset.slot);
      else out.push([li.dataset.slot]);
    }
    return out;
  }

  function say(text, good = false) {
    status.textContent = text;
    status.className = good ? "good" : "";
  }

  async function submit() {
    if (sending) return;
    const ranked = tiers();
    const placed = ranked.flat().length;
    if (placed !== slots.length && !(allBad.checked && placed === 0)) {
      say("Place every answer (or tick all bad) before submitting.");
      return;
    }
    const flags = {}, critiques = {};
    for (const slot of slots) {
      const rules = [...card(slot).querySelectorAll(".rule:checked")].map((b) => b.value);
      if (rules.length) flags[slot] = rules;
      const text = card(slot).querySelector(".critique").value;
      if (text.trim()) critiques[slot] = text;
    }
    const body = {task: Number(task.dataset.task), submission: task.dataset.submission, order: ranked,
                  all_bad: allBad.checked, flags, critiques, seconds: (Date.now() - started) / 1000};
    sending = true;
    say("sending…");
    try {
      const response = await fetch("/api/label", {
        method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf}, body: JSON.stringify(body)});
      const answer = await response.json().catch(() => ({}));
      if (!response.ok) {
        say("not stored: " + (answer.error || response.status));
        sending = false;
        return;
      }
      say("stored", true);
      window.location.assign("/rank?done=" + task.dataset.task);
    } catch (err) {
      say("not stored (network): " + err + "; press submit again");
      sending = false;
    }
  }

  // Mouse: "place next" buttons, and drag from the answers or within the list.
  for (const c of cards) {
    c.querySelector(".place-next").addEventListener("click", () => place(c.dataset.slot));
    c.addEventListener("dragstart", (e) => {
      if (e.target === c) e.dataTransfer.setData("text/plain", c.dataset.slot);
    });
  }
  order.addEventListener("dragover", (e) => e.preventDefault());
  order.addEventListener("drop", (e) => {
    e.preventDefault();
    const slot = e.dataTransfer.getData("text/plain");
    const target = e.target.closest("li");
    if (target && target.dataset.slot === slot) return;
    let before = null;
    if (target) {
      const box = target.getBoundingClientRect();
      before = e.clientY < box.top + box.height / 2 ? target : target.nextSibling;
    }
    place(slot, before);
  });
  document.getElementById("submit").addEventListener("click", submit);
  document.getElementById("undo").addEventListener("click", () => {
    const last = items().pop();
    if (last) { last.remove(); refresh(); }
  });

  // Keys: a letter or its number places that answer next; t ties the last with the one above;
  // Backspace takes the last back; x toggles all bad; Enter submits.
  document.addEventListener("keydown", (e) => {
    const target = e.target;
    if (target.closest && target.closest("textarea, input[type=text], input[type=password]")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key;
    if (key === "Enter") { e.preventDefault(); submit(); return; }
    if (key === "Backspace") {
      e.preventDefault();
      const last = items().pop();
      if (last) { last.remove(); refresh(); }
      return;
    }
    if (key === "t") {
      const last = items().pop();
      if (last && items().length > 1) {
        const box = last.querySelector(".tie input");
        box.checked = !box.checked;
        refresh();
      }
      return;
    }
    if (key === "x") { allBad.checked = !allBad.checked; return; }
    if (/^[1-9]$/.test(key)) { place(slots[Number(key) - 1]); return; }
    if (/^[a-z]$/.test(key)) place(key.toUpperCase());
  });

  // A label given before (opened from "my labels"): show it.
  const existing = JSON.parse(document.getElementById("existing").textContent);
  if (existing) {
    const ranked = Object.entries(existing.ranks).sort((a, b) => a[1] - b[1]);
    let previous = null;
    for (const [slot, level] of ranked) {
      place(slot);
      if (previous === level) itemOf(slot).querySelector(".tie input").checked = true;
      previous = level;
    }
    allBad.checked = existing.all_bad;
    for (const [slot, rules] of Object.entries(existing.flags)) {
      for (const box of card(slot).querySelectorAll(".rule")) box.checked = rules.includes(box.value);
    }
    for (const [slot, text] of Object.entries(existing.critiques)) card(slot).querySelector(".critique").value = text;
    refresh();
  }
})();
