// The chat page: plain JavaScript against the server's own API (no build step, nothing fetched
// from elsewhere). Answers stream as server-sent events; votes go to POST /feedback.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  history: [],          // committed messages: {role, content}
  conversation: newId(),
  last: null,           // the latest turn: {prompt, answers: [{id, text, element}], chosen}
  controller: null,     // aborts the answer being streamed
};

function newId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return "c" + Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("rlhflab-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text || ""; }

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-label").hidden = false;
    status("this server needs an API key: type it above");
    return;
  }
  if (!response.ok) { status(await errorText(response)); return; }
  const select = $("model");
  const current = select.value;
  select.innerHTML = "";
  for (const model of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.appendChild(option);
  }
  if (current) select.value = current;
  status("");
}

function prompt() {
  const system = $("system").value.trim();
  return (system ? [{ role: "system", content: system }] : []).concat(state.history);
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text || "";
  div.appendChild(span);
  return div;
}

// Stream one answer into `element`; resolves to {id, text} (id null if it failed).
async function streamAnswer(messages, element) {
  const out = element.querySelector(".text");
  const body = {
    model: $("model").value, messages: messages, stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  state.controller = new AbortController();
  setBusy(true);
  let id = null, text = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: { ...headers(), "X-Conversation-Id": state.conversation },
      body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) { status(await errorText(response)); return { id: null, text: "" }; }
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");   // {stream: true} keeps a character split across reads whole
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { status(chunk.error.message); continue; }
        id = chunk.id;
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) { text += choice.delta.content; out.textContent = text; }
        }
      }
    }
    status("");
  } catch (e) {
    status(e.name === "AbortError" ? "stopped" : "connection failed: " + e.message);
    id = null;
  } finally {
    setBusy(false);
    state.controller = null;
  }
  if (id) addVotes(element, id);
  return { id: id, text: text };
}

function addVotes(element, id) {
  const votes = document.createElement("div");
  votes.className = "votes";
  for (const [label, value, cls] of [["👍", 1, "thumb-up"], ["👎", -1, "thumb-down"]]) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = cls;
    button.textContent = label;
    button.title = value > 0 ? "good answer" : "bad answer";
    button.onclick = async () => {
      if (await feedback({ id: id, choice: 0, rating: value })) {
        votes.querySelectorAll("button").forEach((b) => b.classList.remove("chosen"));
        button.classList.add("chosen");
      }
    };
    votes.appendChild(button);
  }
  element.appendChild(votes);
}

async function feedback(body) {
  const response = await fetch("feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) { status("vote not stored: " + (await errorText(response))); return false; }
  status("vote stored");
  return true;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !state.last;
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  finishComparison();
  state.history.push({ role: "user", content: text });
  $("conversation").appendChild(bubble("user", text));
  const element = bubble("assistant");
  $("conversation").appendChild(element);
  const messages = prompt();
  const answer = await streamAnswer(messages, element);
  if (!answer.id) { state.history.pop(); element.remove(); state.last = null; setBusy(false); return; }
  state.history.push({ role: "assistant", content: answer.text });
  state.last = { prompt: messages, answers: [{ ...answer, element: element }], pair: null };
  setBusy(false);
}

// Regenerate the last answer and show both, side by side, to choose the better one.
async function regenerate() {
  const last = state.last;
  if (!last || state.controller) return;
  finishComparison();
  const current = last.answers[last.answers.length - 1];
  const pair = document.createElement("div");
  pair.className = "pair";
  current.element.replaceWith(pair);
  pair.appendChild(labelled(current.element, "A"));
  const element = bubble("assistant");
  pair.appendChild(labelled(element, "B"));
  const answer = await streamAnswer(last.prompt, element);
  if (!answer.id) { pair.replaceWith(current.element); return; }
  last.pair = [current, { ...answer, element: element }];
  last.pairElement = pair;
  $("compare").hidden = false;
}

function labelled(element, name) {
  let label = element.querySelector(".label");
  if (!label) { label = document.createElement("span"); label.className = "label"; element.prepend(label); }
  label.textContent = name;
  return element;
}

async function prefer(pick) {
  const last = state.last;
  if (!last || !last.pair) return;
  const better = last.pair[pick], worse = last.pair[1 - pick];
  if (!(await feedback({ better: { id: better.id, choice: 0 }, worse: { id: worse.id, choice: 0 } }))) return;
  // The conversation goes on from the chosen answer.
  state.history[state.history.length - 1] = { role: "assistant", content: better.text };
  last.answers.push(better);
  last.pairElement.replaceWith(better.element);
  better.element.querySelector(".label").remove();
  last.pair = null;
  $("compare").hidden = true;
}

function finishComparison() {
  const last = state.last;
  if (last && last.pair) {   // no choice made: keep answer A in the conversation
    last.pairElement.replaceWith(last.pair[0].element);
    const label = last.pair[0].element.querySelector(".label");
    if (label) label.remove();
    last.pair = null;
  }
  $("compare").hidden = true;
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.last = null;
  state.conversation = newId();
  $("conversation").innerHTML = "";
  $("compare").hidden = true;
  setBusy(false);
  status("");
}

$("composer").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("regenerate").addEventListener("click", regenerate);
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newConversation);
$("system").addEventListener("change", newConversation);
$("api-key").addEventListener("change", () => { localStorage.setItem("rlhflab-api-key", $("api-key").value); loadModels(); });
document.querySelectorAll(".prefer").forEach((b) => b.addEventListener("click", () => prefer(Number(b.dataset.pick))));
loadModels();
