/*
 * tokenrelay web chat.
 *
 * Sends the conversation to POST /api/get-response and renders the Server-Sent Events
 * stream it returns, delta by delta, as Markdown. The conversation is kept in
 * localStorage; an answer still streaming when the page went away is picked up again from
 * GET /api/streams/{id} after the last event the page had stored.
 *
 * Safety rule: text coming from the model (or from error messages) only ever reaches the
 * page as text nodes, or as elements the Markdown renderer below creates itself — never
 * as HTML. Raw HTML in an answer is shown as text; links keep only http(s) and mailto.
 */
import * as smd from "./vendor/smd.min.js";

// ---------------------------------------------------------------------
// SSE parsing (https://html.spec.whatwg.org/multipage/server-sent-events.html)
// ---------------------------------------------------------------------

/**
 * Incremental parser for a text/event-stream body.
 * push(text) feeds decoded text; finish() flushes at end of body.
 * onEvent({type, data, id}) is called for each dispatched event.
 * Lines may end in LF, CR or CRLF (also split across chunks); comment
 * lines (starting with ":") are ignored; a blank line dispatches.
 */
function createSSEParser(onEvent) {
  let buffer = "";
  let firstChunk = true;
  let dataLines = [];
  let eventType = "";
  let lastEventId = "";

  function dispatch() {
    if (dataLines.length === 0) {
      eventType = "";
      return;
    }
    const ev = {
      type: eventType || "message",
      data: dataLines.join("\n"),
      id: lastEventId,
    };
    dataLines = [];
    eventType = "";
    onEvent(ev);
  }

  function processLine(line) {
    if (line === "") {
      dispatch();
      return;
    }
    if (line.charCodeAt(0) === 58 /* ":" */) {
      return; // comment, e.g. ": ping"
    }
    const colon = line.indexOf(":");
    let field;
    let value;
    if (colon === -1) {
      field = line;
      value = "";
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32 /* " " */) value = value.slice(1);
    }
    switch (field) {
      case "event":
        eventType = value;
        break;
      case "data":
        dataLines.push(value);
        break;
      case "id":
        if (value.indexOf("\u0000") === -1) lastEventId = value;
        break;
      default:
        // "retry" and unknown fields are ignored.
        break;
    }
  }

  function drain(final) {
    let start = 0;
    const len = buffer.length;
    for (let i = 0; i < len; i++) {
      const c = buffer.charCodeAt(i);
      if (c === 10 /* \n */) {
        processLine(buffer.slice(start, i));
        start = i + 1;
      } else if (c === 13 /* \r */) {
        if (i + 1 === len && !final) {
          // A CR at the very end may be the first half of a CRLF that is
          // split across chunks: wait for the next chunk to decide.
          break;
        }
        processLine(buffer.slice(start, i));
        if (i + 1 < len && buffer.charCodeAt(i + 1) === 10) i++;
        start = i + 1;
      }
    }
    buffer = buffer.slice(start);
  }

  return {
    push(text) {
      if (firstChunk && text.length > 0) {
        firstChunk = false;
        if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      }
      buffer += text;
      drain(false);
    },
    finish() {
      drain(true);
      // Per the SSE spec an event that was not terminated by a blank line
      // before the end of the body is discarded.
      buffer = "";
      dataLines = [];
      eventType = "";
    },
  };
}


// ---------------------------------------------------------------------
// DOM helpers
// ---------------------------------------------------------------------

const $ = (sel) => document.querySelector(sel);

/** Create an element with a class and optional plain-text content. */
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function button(className, text, label) {
  const b = el("button", "btn btn-small " + className, text);
  b.type = "button";
  if (label) b.setAttribute("aria-label", label);
  return b;
}

function formatNumber(n, digits) {
  return Number(n).toLocaleString(undefined, {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}

const encoder = new TextEncoder();
const byteLength = (s) => encoder.encode(s).length;

// ---------------------------------------------------------------------
// Markdown, rendered as it streams (streaming-markdown, vendored)
// ---------------------------------------------------------------------

const SAFE_SCHEMES = new Set(["http:", "https:", "mailto:"]);

/** The link target if it is an absolute http(s) or mailto URL, else null. */
function safeHref(value) {
  try {
    const url = new URL(String(value));
    return SAFE_SCHEMES.has(url.protocol) ? url.href : null;
  } catch (e) {
    return null; // relative or malformed: not a link this page follows
  }
}

// streaming-markdown's minified build does not export DOCUMENT: the root it renders into.
const MD_DOCUMENT = 1;
const HEADINGS = new Map([
  [smd.HEADING_1, 1], [smd.HEADING_2, 2], [smd.HEADING_3, 3],
  [smd.HEADING_4, 4], [smd.HEADING_5, 5], [smd.HEADING_6, 6],
]);

/**
 * A streaming Markdown renderer into `root`: write(chunk) parses only the new chunk and
 * only ever appends nodes (nothing already shown is re-parsed or replaced), so the cost
 * of a chunk does not grow with the answer. Every node is made here with createElement /
 * createTextNode: the answer's text is never parsed as HTML.
 */
function createMarkdown(root) {
  const stack = [root];
  const types = [MD_DOCUMENT];
  const top = () => stack[stack.length - 1];

  function codeBlock(parent) {
    const block = el("div", "code-block");
    const head = el("div", "code-head");
    head.append(el("span", "code-lang", "code"));
    head.append(button("code-copy", "Copy", "Copy code"));
    const pre = el("pre");
    // A block wider than the answer scrolls: keyboard users reach it with Tab.
    pre.tabIndex = 0;
    const code = el("code");
    pre.append(code);
    block.append(head, pre);
    parent.append(block);
    return code;
  }

  function open(type) {
    const parent = top();
    let node;
    switch (type) {
      case smd.PARAGRAPH: node = el("p"); break;
      case smd.BLOCKQUOTE: node = el("blockquote"); break;
      case smd.LINE_BREAK: node = el("br"); break;
      case smd.RULE: node = el("hr"); break;
      case smd.ITALIC_AST: case smd.ITALIC_UND: node = el("em"); break;
      case smd.STRONG_AST: case smd.STRONG_UND: node = el("strong"); break;
      case smd.STRIKE: node = el("s"); break;
      case smd.CODE_INLINE: node = el("code"); break;
      case smd.LINK: case smd.RAW_URL: node = el("a"); break;
      // An image is shown as a link to it, never loaded: no tracking pixels in answers.
      case smd.IMAGE: node = el("a", "md-image"); break;
      case smd.LIST_UNORDERED: node = el("ul"); break;
      case smd.LIST_ORDERED: node = el("ol"); break;
      case smd.LIST_ITEM: node = el("li"); break;
      case smd.CHECKBOX: node = el("span", "task", "☐ "); break;
      case smd.CODE_BLOCK: case smd.CODE_FENCE:
        stack.push(codeBlock(parent));
        types.push(type);
        return;
      case smd.TABLE: {
        // Wide tables scroll inside the answer instead of widening the page.
        const wrap = el("div", "table-wrap");
        wrap.tabIndex = 0;
        node = el("table");
        wrap.append(node);
        parent.append(wrap);
        stack.push(node);
        types.push(type);
        return;
      }
      case smd.TABLE_ROW: {
        let section;
        if (parent.children.length === 0) section = parent.appendChild(el("thead"));
        else if (parent.children.length === 1) section = parent.appendChild(el("tbody"));
        else section = parent.children[1];
        node = el("tr");
        section.append(node);
        stack.push(node);
        types.push(type);
        return;
      }
      case smd.TABLE_CELL:
        node = el(parent.parentElement && parent.parentElement.tagName === "THEAD" ? "th" : "td");
        break;
      case smd.EQUATION_BLOCK: node = el("pre", "math"); break;
      case smd.EQUATION_INLINE: node = el("code", "math"); break;
      default:
        if (HEADINGS.has(type)) {
          // The page has its own h1 and h2: an answer's headings sit below them.
          node = el("h" + Math.min(6, HEADINGS.get(type) + 2), "md-h" + HEADINGS.get(type));
        } else {
          node = el("span");
        }
    }
    parent.append(node);
    stack.push(node);
    types.push(type);
  }

  const renderer = {
    data: null,
    add_token(_, type) {
      if (type === MD_DOCUMENT) return;
      open(type);
    },
    end_token() {
      if (stack.length <= 1) return;
      const node = stack.pop();
      const type = types.pop();
      if (type === smd.IMAGE && !node.textContent) node.textContent = node.getAttribute("href") || "image";
    },
    add_text(_, text) {
      top().append(document.createTextNode(text));
    },
    set_attr(_, attr, value) {
      const node = top();
      const type = types[types.length - 1];
      if (attr === smd.HREF || attr === smd.SRC) {
        const href = safeHref(value);
        if (href) {
          node.setAttribute("href", href);
          node.setAttribute("rel", "noopener noreferrer");
          node.setAttribute("target", "_blank");
        } else {
          // Shown, not followed: javascript:, data:, relative paths...
          node.classList.add("unsafe-link");
          node.title = "Link not followed: " + String(value).slice(0, 200);
        }
      } else if (attr === smd.LANG && (type === smd.CODE_FENCE || type === smd.CODE_BLOCK)) {
        const lang = String(value).trim().split(/\s/)[0].slice(0, 40);
        if (lang) {
          node.dataset.lang = lang;
          const label = node.closest(".code-block").querySelector(".code-lang");
          if (label) label.textContent = lang;
        }
      } else if (attr === smd.CHECKED && type === smd.CHECKBOX) {
        node.textContent = "☑ ";
      } else if (attr === smd.START && node.tagName === "OL") {
        const start = parseInt(value, 10);
        if (Number.isFinite(start)) node.start = start;
      }
    },
  };
  const parser = smd.parser(renderer);
  return {
    write(text) {
      if (text) smd.parser_write(parser, text);
    },
    end() {
      smd.parser_end(parser);
    },
  };
}

// ---------------------------------------------------------------------
// Copying
// ---------------------------------------------------------------------

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch (e) {
    // No clipboard API (a plain-http page on another host is not a secure context).
  }
  const area = el("textarea", "copy-buffer");
  area.value = text;
  area.setAttribute("readonly", "");
  area.setAttribute("aria-hidden", "true");
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch (e) {
    ok = false;
  }
  area.remove();
  return ok;
}

async function copyWithFeedback(btn, text) {
  const ok = await copyText(text);
  const label = btn.dataset.label || btn.textContent;
  btn.dataset.label = label;
  btn.textContent = ok ? "Copied" : "Copy failed";
  btn.dataset.copied = ok ? "true" : "false";
  setTimeout(() => {
    btn.textContent = label;
    delete btn.dataset.copied;
  }, 1500);
}

// ---------------------------------------------------------------------
// Storage: the conversation and earlier chats, in this browser's localStorage
// ---------------------------------------------------------------------

const KEY_STORAGE = "tokenrelay.apiKey";
const STORE_INDEX = "tokenrelay.chats";
const STORE_CURRENT = "tokenrelay.currentChat";
const STORE_SETTINGS = "tokenrelay.settings";
const storeKey = (id) => "tokenrelay.chat." + id;
const MAX_CHATS = 30;
const LISTED_CHATS = 12;
const SAVE_EVERY_MS = 250;

function readJSON(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch (e) {
    return fallback;
  }
}

function writeJSON(key, value) {
  const raw = JSON.stringify(value);
  for (let attempt = 0; attempt < 5; attempt++) {
    try {
      localStorage.setItem(key, raw);
      return true;
    } catch (e) {
      // Storage full: give up the oldest other chat and try again.
      const index = readJSON(STORE_INDEX, []);
      const victim = index.filter((c) => storeKey(c.id) !== key).pop();
      if (!victim) return false;
      localStorage.removeItem(storeKey(victim.id));
      localStorage.setItem(STORE_INDEX, JSON.stringify(index.filter((c) => c.id !== victim.id)));
    }
  }
  return false;
}

function newChatId() {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return Date.now().toString(36) + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function emptyChat() {
  return { id: newChatId(), title: "", updated: Date.now(), turns: [] };
}

function loadChat(id) {
  const chat = id ? readJSON(storeKey(id), null) : null;
  if (!chat || !Array.isArray(chat.turns)) return null;
  return chat;
}

/** The chat shown; saved once it has a turn. */
let chat = emptyChat();
let saveTimer = null;
/** Changed since last saved: leaving the page or the chat saves only then. */
let dirty = false;

function save() {
  dirty = true;
  saveNow();
}

function saveNow() {
  if (saveTimer !== null) {
    clearTimeout(saveTimer);
    saveTimer = null;
  }
  if (!dirty || chat.turns.length === 0) return;
  dirty = false;
  chat.updated = Date.now();
  if (!chat.title) {
    const first = chat.turns.find((t) => t.role === "user");
    chat.title = first ? first.content.trim().replace(/\s+/g, " ").slice(0, 60) : "";
  }
  writeJSON(storeKey(chat.id), chat);
  const before = readJSON(STORE_INDEX, []);
  const listed = before.length > 0 && before[0].id === chat.id && before[0].title === chat.title;
  let index = before.filter((c) => c && c.id !== chat.id);
  index.unshift({ id: chat.id, title: chat.title, updated: chat.updated });
  for (const old of index.slice(MAX_CHATS)) localStorage.removeItem(storeKey(old.id));
  index = index.slice(0, MAX_CHATS);
  writeJSON(STORE_INDEX, index);
  localStorage.setItem(STORE_CURRENT, chat.id);
  // Not on every save while an answer streams: only when the list itself changed.
  if (!listed) renderChatList();
}

/**
 * Saving serialises the whole chat: while an answer streams it is done at most every
 * SAVE_EVERY_MS, not per delta. The stored text and last event id always go together, so a
 * reload resumes exactly after what was stored.
 */
function scheduleSave() {
  dirty = true;
  if (saveTimer === null) saveTimer = setTimeout(saveNow, SAVE_EVERY_MS);
}

function loadSettings() {
  const s = readJSON(STORE_SETTINGS, {});
  ui.system.value = typeof s.system === "string" ? s.system : "";
  ui.temperature.value = Number.isFinite(s.temperature) ? String(s.temperature) : "";
  // The model last used, over the server's default (which fills an empty box).
  if (typeof s.model === "string" && s.model) ui.model.value = s.model;
  if (ui.system.value || ui.temperature.value) ui.settings.open = true;
}

function saveSettings() {
  const t = temperature();
  writeJSON(STORE_SETTINGS, { system: ui.system.value, temperature: t, model: ui.model.value.trim() });
}

function temperature() {
  const raw = ui.temperature.value.trim();
  if (!raw) return null;
  const t = Number(raw);
  return Number.isFinite(t) && t >= 0 && t <= 2 ? t : null;
}

// ---------------------------------------------------------------------
// Application state
// ---------------------------------------------------------------------

const ui = {};

/** The in-flight request (a new answer or a resumed one), or null when idle. */
let active = null;

/** Set by ↑: the next send replaces the last question and its answer. */
let editing = false;

// ---------------------------------------------------------------------
// Header: which upstreams answer
// ---------------------------------------------------------------------

/** What /api/info said; the model picker needs its default model. */
let serverInfo = null;

async function loadInfo() {
  const label = ui.upstream;
  try {
    const res = await fetch("/api/info", { headers: { Accept: "application/json" }, signal: AbortSignal.timeout(15000) });
    if (!res.ok) throw new Error("HTTP " + res.status);
    const info = await res.json();
    serverInfo = info;
    const model = typeof info.model === "string" ? info.model : "";
    if (model && !ui.model.value) ui.model.value = model;

    label.textContent = "";
    label.dataset.simulated = info.simulated ? "true" : "false";
    label.dataset.routed = info.routed ? "true" : "false";
    const upstreams = Array.isArray(info.upstreams) ? info.upstreams : [];
    if (info.simulated && !info.routed) {
      label.append(el("strong", "upstream-name", "Simulator — no model API configured"));
      label.append(el("span", "upstream-note",
        " Answers come from the built-in simulator, not a real model."));
    } else if (info.routed && upstreams.length > 0) {
      label.append(el("span", "upstream-kind", "Routes: "));
      label.append(routeList(upstreams));
    } else {
      label.append(el("span", "upstream-kind", "Upstream: "));
      label.append(el("strong", "upstream-name", info.upstream || "unknown"));
    }
    if (model && !(info.simulated && !info.routed)) {
      label.append(el("span", "upstream-kind", info.routed ? " · default model " : " · model "));
      label.append(el("strong", "upstream-model", model));
    }
    if (info.version) {
      ui.version.textContent = "v" + info.version;
    }
    showKeyField(info.auth_required === true);
    document.body.classList.toggle("is-simulated", !!info.simulated);
  } catch (err) {
    label.dataset.simulated = "unknown";
    label.textContent = "Upstream unknown (could not load /api/info: " + err.message + ")";
  }
  describeModelChoice();
}

/**
 * The routes as "pattern → name (kind, URL)", first match first. Names and URLs
 * come from the server's settings, but still only ever as text.
 */
function routeList(upstreams) {
  const list = el("span", "route-list");
  list.setAttribute("role", "list");
  for (const u of upstreams) {
    const name = String(u.name || "?");
    const pattern = String(u.pattern || "");
    const item = el("span", "route");
    item.setAttribute("role", "listitem");
    item.dataset.route = name;
    if (pattern && pattern !== name) {
      item.append(el("span", "route-pattern", pattern));
      item.append(document.createTextNode(" → "));
    }
    item.append(el("strong", "upstream-name", name));
    if (u.kind === "simulator") {
      item.append(document.createTextNode(" (built-in simulator)"));
    } else {
      item.append(document.createTextNode(" (" + String(u.kind || "?") + (u.url ? ", " : "")));
      if (u.url) item.append(el("span", "route-url", u.url));
      item.append(document.createTextNode(")"));
    }
    list.append(item);
  }
  return list;
}

/** The largest request body the server accepts, when it says. */
function maxBodyBytes() {
  const n = serverInfo && serverInfo.max_body_bytes;
  return Number.isFinite(n) && n > 0 ? n : null;
}

// ---------------------------------------------------------------------
// Model picker: the models GET /v1/models lists, beside a free name box
// ---------------------------------------------------------------------

/** Model names the server lists, in its order; empty until (or unless) known. */
let listedModels = [];

async function loadModels() {
  let models = [];
  try {
    const res = await fetch("/v1/models", {
      headers: { Accept: "application/json", ...authHeaders() },
      signal: AbortSignal.timeout(15000),
    });
    if (!res.ok) throw new Error("HTTP " + res.status);
    const body = await res.json();
    models = (Array.isArray(body.data) ? body.data : [])
      .filter((m) => m && typeof m.id === "string" && m.id)
      .map((m) => ({ id: m.id, owner: typeof m.owned_by === "string" ? m.owned_by : "" }));
  } catch (err) {
    // Unlisted (e.g. a key is needed first): the name box alone still works.
    models = [];
  }
  fillModelList(models);
}

function fillModelList(models) {
  const list = ui.modelList;
  listedModels = models.map((m) => m.id);
  list.textContent = "";
  if (models.length === 0) {
    list.hidden = true;
    describeModelChoice();
    return;
  }
  const other = el("option", null, "other (type a name)");
  other.value = "";
  for (const m of models) {
    // Option text is set as text: a model name is never parsed as HTML.
    const option = el("option", null, m.owner && m.owner !== m.id ? m.id + " — " + m.owner : m.id);
    option.value = m.id;
    list.append(option);
  }
  list.append(other);
  list.hidden = false;
  if (!ui.model.value.trim()) {
    // The server's default when it has one (already in the box), else the first listed.
    ui.model.value = listedModels[0];
  }
  syncModelList();
  describeModelChoice();
}

/**
 * The model of a question asked with the box left empty: none (the server's default
 * answers) when the server has one, else the first listed, as the help text says.
 */
function fallbackModel() {
  const hasDefault = serverInfo && typeof serverInfo.model === "string" && serverInfo.model;
  return hasDefault ? "" : listedModels[0] || "";
}

/** The picker shows the name in the box, or "other" for a name it does not list. */
function syncModelList() {
  const name = ui.model.value.trim();
  ui.modelList.value = listedModels.includes(name) ? name : "";
}

function describeModelChoice() {
  const fallback = serverInfo && typeof serverInfo.model === "string" ? serverInfo.model : "";
  const n = listedModels.length;
  let help;
  if (n > 0) {
    help = "Pick one of the " + (n === 1 ? "model" : n + " models") + " this server lists, or type another name";
    help += fallback
      ? "; left empty, the server's default (" + fallback + ") answers."
      : "; the server has no default model, so left empty, the first listed answers.";
  } else if (fallback) {
    help = "Leave empty to use the server's default model (" + fallback + ").";
  } else if (serverInfo) {
    help = "Type a model name: this server has no default model.";
  } else {
    help = "Leave empty to use the server's default model.";
  }
  ui.modelHelp.textContent = help;
  ui.model.placeholder = fallback || !serverInfo ? "server default" : "model name";
}

// ---------------------------------------------------------------------
// Client key: asked for only when the server requires one
// ---------------------------------------------------------------------

function showKeyField(required) {
  ui.keyField.hidden = !required;
  ui.form.classList.toggle("needs-key", required);
  if (required && !ui.apiKey.value) {
    ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  }
}

/** Headers that carry the client key, when the page has one. */
function authHeaders() {
  const key = ui.keyField.hidden ? "" : ui.apiKey.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

// ---------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------

function isNearBottom() {
  const c = ui.conversation;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function scrollToBottom() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

function showEmptyHint(show) {
  let hint = $("#empty-hint");
  if (!show) {
    if (hint) hint.remove();
  } else if (!hint) {
    hint = el("p", "empty-hint", "Ask something to start the conversation.");
    hint.id = "empty-hint";
    ui.conversation.append(hint);
  }
}

function addUserMessage(turn) {
  showEmptyHint(false);
  const msg = el("article", "msg user");
  msg.setAttribute("aria-label", "You");
  msg.append(el("div", "who", "You"));
  // The user's own words are shown as typed, not as Markdown.
  msg.append(el("div", "text", turn.content));
  ui.conversation.append(msg);
  return msg;
}

const STATE_LABELS = {
  streaming: "answering…",
  done: "",
  failed: "FAILED",
  stopped: "STOPPED",
  interrupted: "INTERRUPTED",
};

/**
 * Stopped, failed and interrupted answers stay on the page but are left out of the history
 * sent with later questions (their question too): the model would otherwise take a cut-off
 * answer for a complete one. The page says so on each of them.
 */
const NOT_IN_HISTORY = "Not sent with later questions: Retry to ask again.";

/** Build an assistant message element for a turn; returns a small controller. */
function addAssistantMessage(turn, userEl) {
  const msg = el("article", "msg assistant");
  msg.setAttribute("aria-label", "Assistant");

  const head = el("div", "who");
  head.append(el("span", "who-name", "Assistant"));
  const modelTag = el("span", "model-tag");
  modelTag.hidden = true;
  head.append(modelTag);
  const badge = el("span", "badge");
  head.append(badge);
  msg.append(head);

  const textEl = el("div", "text md");
  msg.append(textEl);

  const errorEl = el("div", "error");
  errorEl.setAttribute("role", "alert");
  errorEl.hidden = true;
  msg.append(errorEl);

  const noteEl = el("div", "note");
  noteEl.hidden = true;
  msg.append(noteEl);

  const statsEl = el("div", "stats");
  statsEl.hidden = true;
  msg.append(statsEl);

  const actions = el("div", "msg-actions");
  const copyBtn = button("answer-copy", "Copy", "Copy answer (Markdown)");
  const retryBtn = button("answer-retry", "Retry", "Retry this question");
  actions.append(copyBtn, retryBtn);
  msg.append(actions);
  copyBtn.addEventListener("click", () => copyWithFeedback(copyBtn, turn.content));
  retryBtn.addEventListener("click", retryLast);

  ui.conversation.append(msg);

  let md = createMarkdown(textEl);
  let pending = "";
  let frame = 0;

  function flush() {
    if (frame) {
      cancelAnimationFrame(frame);
      frame = 0;
    }
    if (!pending) return;
    const stick = isNearBottom();
    md.write(pending);
    pending = "";
    if (stick) scrollToBottom();
  }

  const view = {
    el: msg,
    turn,
    userEl,
    /** Deltas are parsed once per animation frame, however many arrived in it. */
    append(delta) {
      pending += delta;
      if (!frame) frame = requestAnimationFrame(() => {
        frame = 0;
        flush();
      });
    },
    flush,
    end() {
      flush();
      md.end();
    },
    setModel(name) {
      if (!name) return;
      modelTag.textContent = name;
      modelTag.hidden = false;
      msg.dataset.model = name;
    },
    setState(state) {
      msg.dataset.state = state;
      badge.textContent = STATE_LABELS[state] || "";
      badge.hidden = !badge.textContent;
      const left = state === "failed" || state === "stopped" || state === "interrupted";
      msg.dataset.inHistory = left ? "false" : "true";
      userEl.dataset.inHistory = left ? "false" : "true";
      view.showNote();
    },
    setError(type, message) {
      errorEl.textContent = "";
      if (!type && !message) {
        errorEl.hidden = true;
        return;
      }
      errorEl.append(el("strong", "error-type", type || "error"));
      errorEl.append(document.createTextNode(": " + (message || "unknown error")));
      errorEl.dataset.type = type || "error";
      errorEl.hidden = false;
    },
    showNote() {
      const notes = [];
      if (turn.trimmed) {
        notes.push(turn.trimmed + " earlier message" + (turn.trimmed === 1 ? " was" : "s were") +
          " left out of this question to stay under the server's request limit (" +
          formatNumber(turn.limit || 0, 0) + " bytes).");
        noteEl.dataset.trimmed = String(turn.trimmed);
      }
      if (msg.dataset.inHistory === "false") notes.push(NOT_IN_HISTORY);
      noteEl.textContent = notes.join(" ");
      noteEl.hidden = notes.length === 0;
    },
    setStats(parts, data) {
      turn.stats = { parts, data };
      statsEl.textContent = parts.filter(Boolean).join(" · ");
      for (const [k, v] of Object.entries(data || {})) {
        if (v !== null && v !== undefined) statsEl.dataset[k] = String(v);
      }
      statsEl.hidden = !statsEl.textContent;
    },
  };
  view.setModel(turn.model);
  view.setState(turn.state || "streaming");
  if (turn.error) view.setError(turn.error.type, turn.error.message);
  if (turn.stats) view.setStats(turn.stats.parts || [], turn.stats.data || {});
  if (turn.content) {
    md.write(turn.content);
    if (turn.state !== "streaming") md.end();
  }
  return view;
}

/** Retry is offered on the last answer (once it has ended), as the question to ask again. */
function refreshActions() {
  const answers = ui.conversation.querySelectorAll(".msg.assistant");
  answers.forEach((m, i) => {
    const retry = m.querySelector(".answer-retry");
    retry.hidden = i !== answers.length - 1 || m.dataset.state === "streaming";
    retry.disabled = !!active;
  });
  ui.newChat.disabled = !!active;
  ui.chatList.querySelectorAll("button").forEach((b) => {
    b.disabled = !!active;
  });
}

// ---------------------------------------------------------------------
// Chats: render one, list the earlier ones
// ---------------------------------------------------------------------

/** The views of the current chat's answers, by turn index. */
let views = [];

function renderChat() {
  ui.conversation.querySelectorAll(".msg").forEach((m) => m.remove());
  views = [];
  showEmptyHint(chat.turns.length === 0);
  for (let i = 0; i + 1 < chat.turns.length; i += 2) {
    const userEl = addUserMessage(chat.turns[i]);
    views.push(addAssistantMessage(chat.turns[i + 1], userEl));
  }
  scrollToBottom();
  refreshActions();
  renderChatList();
}

function renderChatList() {
  const index = readJSON(STORE_INDEX, []);
  ui.chatList.textContent = "";
  const shown = index.filter((c) => c && c.id).slice(0, LISTED_CHATS);
  for (const c of shown) {
    const item = el("li");
    const b = button("chat-link", c.title || "(untitled)");
    b.dataset.chatId = c.id;
    b.title = new Date(c.updated || 0).toLocaleString();
    if (c.id === chat.id) b.setAttribute("aria-current", "true");
    b.disabled = !!active;
    b.addEventListener("click", () => openChat(c.id));
    item.append(b);
    ui.chatList.append(item);
  }
  ui.chats.hidden = shown.length === 0;
}

function openChat(id) {
  if (active) return;
  const loaded = loadChat(id);
  if (!loaded) return;
  saveNow();
  chat = loaded;
  localStorage.setItem(STORE_CURRENT, chat.id);
  cancelEdit();
  renderChat();
  ui.chats.open = false;
  resumeIfStreaming();
  ui.prompt.focus();
}

function newChat() {
  if (active) return;
  saveNow();
  chat = emptyChat();
  localStorage.removeItem(STORE_CURRENT);
  cancelEdit();
  renderChat();
  ui.prompt.focus();
}

// ---------------------------------------------------------------------
// Sending, streaming, resuming
// ---------------------------------------------------------------------

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.conversation.setAttribute("aria-busy", busy ? "true" : "false");
  document.body.classList.toggle("is-streaming", busy);
  refreshActions();
}

/** Build the stats line for a finished (or interrupted) answer. */
function finishStats(view, run, usage, finishReason) {
  const now = performance.now();
  const ttft = run.firstTokenAt === null ? null : Math.round(run.firstTokenAt - run.sentAt);
  const tokens =
    usage && Number.isFinite(usage.completion_tokens) ? usage.completion_tokens : run.deltas;
  const tokenSource = usage && Number.isFinite(usage.completion_tokens) ? "usage" : "deltas";
  let tps = null;
  // A rate needs at least two deltas: a single chunk has no duration.
  if (run.firstTokenAt !== null && run.deltas >= 2 && !run.resumed) {
    const seconds = (now - run.firstTokenAt) / 1000;
    if (seconds > 0 && tokens > 0) tps = tokens / seconds;
  }
  const parts = [];
  if (run.resumed) parts.push("continued after " + (run.reason || "a reload"));
  else parts.push(ttft === null ? "no tokens received" : "first token " + formatNumber(ttft, 0) + " ms");
  if (tps !== null) parts.push(formatNumber(tps, 1) + " tokens/s");
  if (run.firstTokenAt !== null && !run.resumed) {
    const unit = tokenSource === "usage" ? "token" : "delta";
    parts.push(formatNumber(tokens, 0) + " " + unit + (tokens === 1 ? "" : "s"));
  }
  if (usage && Number.isFinite(usage.prompt_tokens)) {
    parts.push(formatNumber(usage.prompt_tokens, 0) + " prompt tokens");
  }
  if (finishReason) parts.push("finish: " + finishReason);
  parts.push("total " + formatNumber((now - run.sentAt) / 1000, 2) + " s");
  view.setStats(parts, {
    ttftMs: run.resumed ? null : ttft,
    tps: tps === null ? null : tps.toFixed(2),
    tokens: run.firstTokenAt === null ? 0 : tokens,
    tokenSource,
    deltas: run.deltas,
    finishReason: finishReason || null,
  });
}

/**
 * The request body for `question`: the system prompt, the completed exchanges before it,
 * and the question — the oldest exchanges left out when the body would be larger than the
 * server accepts (a 413 otherwise). Returns {body, dropped, size, limit}.
 */
function buildRequest(question, model) {
  const head = ui.system.value.trim() ? [{ role: "system", content: ui.system.value }] : [];
  const pairs = [];
  for (let i = 0; i + 1 < chat.turns.length; i += 2) {
    const answer = chat.turns[i + 1];
    if (answer.state === "done") {
      pairs.push([
        { role: "user", content: chat.turns[i].content },
        { role: "assistant", content: answer.content },
      ]);
    }
  }
  const make = (kept) => {
    const body = { messages: head.concat(kept.flat(), [{ role: "user", content: question }]) };
    if (model) body.model = model;
    const t = temperature();
    if (t !== null) body.temperature = t;
    return body;
  };
  const limit = maxBodyBytes();
  let body = make(pairs);
  let size = byteLength(JSON.stringify(body));
  let dropped = 0;
  if (limit && size > limit) {
    // Each pair costs its two messages' JSON and their commas: drop from the oldest until it fits.
    const costs = pairs.map(([u, a]) => byteLength(JSON.stringify(u)) + byteLength(JSON.stringify(a)) + 2);
    let estimate = size;
    while (dropped < pairs.length && estimate > limit) estimate -= costs[dropped++];
    body = make(pairs.slice(dropped));
    size = byteLength(JSON.stringify(body));
    while (size > limit && dropped < pairs.length) {
      body = make(pairs.slice(++dropped));
      size = byteLength(JSON.stringify(body));
    }
  }
  return { body, dropped: dropped * 2, size, limit };
}

function newRun(view, resumed) {
  return {
    controller: new AbortController(),
    view,
    turn: view.turn,
    resumed,
    stopRequested: false,
    sentAt: performance.now(),
    firstTokenAt: null,
    deltas: 0,
    settled: false,
  };
}

function settle(run, state, details) {
  if (run.settled) return;
  run.settled = true;
  const { view, turn } = run;
  const stick = isNearBottom();
  view.end();
  turn.state = state;
  view.setState(state);
  if (state !== "done" && details && (details.type || details.message)) {
    turn.error = { type: details.type || "error", message: details.message || "" };
    view.setError(turn.error.type, turn.error.message);
  }
  finishStats(view, run, details && details.usage, details && details.finishReason);
  save();
  if (stick) scrollToBottom();
}

function handleEvent(run, ev) {
  if (run.settled) return;
  const { view, turn } = run;
  let payload = null;
  try {
    payload = ev.data ? JSON.parse(ev.data) : null;
  } catch (e) {
    settle(run, "failed", { type: "bad_event", message: "Could not parse event data: " + ev.data.slice(0, 200) });
    return;
  }
  switch (ev.type) {
    case "start":
      if (payload) {
        turn.model = payload.model || turn.model;
        view.setModel(payload.model);
        if (payload.stream_id) {
          turn.streamId = String(payload.stream_id);
          view.el.dataset.streamId = turn.streamId;
          // Stored at once: a reload from now on can resume this answer.
          save();
        }
      }
      break;
    case "message":
      if (payload && typeof payload.text === "string" && payload.text.length > 0) {
        const seq = Number(ev.id);
        // A resumed stream starts after the last stored event; never show a piece twice.
        if (ev.id && Number.isFinite(seq) && seq <= Number(turn.lastEventId || 0)) break;
        if (run.firstTokenAt === null) run.firstTokenAt = performance.now();
        run.deltas += 1;
        turn.content += payload.text;
        if (ev.id) {
          turn.lastEventId = ev.id;
          view.el.dataset.lastEventId = ev.id;
        }
        view.append(payload.text);
        scheduleSave();
      }
      break;
    case "done":
      settle(run, "done", {
        usage: payload && payload.usage,
        finishReason: payload && payload.finish_reason,
      });
      break;
    case "error": {
      const err = (payload && payload.error) || {};
      settle(run, "failed", { type: err.type || "upstream_error", message: err.message || "The upstream reported an error." });
      break;
    }
    case "stopped":
      settle(run, "stopped", { usage: payload && payload.usage });
      break;
    default:
      break; // unknown event names are ignored
  }
}

async function errorOf(res) {
  let type = "http_" + res.status;
  let message = res.statusText || "Request failed";
  try {
    const j = await res.json();
    if (j && j.error) {
      type = j.error.type || type;
      message = j.error.message || message;
    }
  } catch (e) {
    /* body was not JSON; keep the status text */
  }
  return { type, message: message + " (HTTP " + res.status + ")" };
}

/** Read one SSE response into the run's answer until it ends. */
async function readStream(run, open) {
  active = run;
  setBusy(true);
  try {
    const res = await open(run.controller.signal);
    if (!res.ok) {
      if (run.resumed && res.status >= 502 && res.status <= 504 && reconnect(run)) return;
      const err = await errorOf(res);
      if (run.resumed && res.status === 404) {
        // Expired (or its process restarted): what was stored is all there is.
        settle(run, "interrupted", { type: "stream_expired", message: "The answer could not be continued: " + err.message });
      } else {
        settle(run, "failed", err);
        if (res.status === 401 && !ui.keyField.hidden) ui.apiKey.focus();
      }
      return;
    }
    const ctype = res.headers.get("content-type") || "";
    if (!ctype.includes("text/event-stream") || !res.body) {
      settle(run, "failed", { type: "bad_response", message: "Expected an event stream, got " + (ctype || "no content type") });
      return;
    }

    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = createSSEParser((ev) => handleEvent(run, ev));
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        parser.push(decoder.decode());
        parser.finish();
        break;
      }
      parser.push(decoder.decode(value, { stream: true }));
      if (run.settled) {
        // done / error received: nothing more to read.
        reader.cancel().catch(() => {});
        break;
      }
    }
    if (!run.settled && !reconnect(run)) {
      settle(run, "failed", {
        type: "connection_lost",
        message: "The stream ended before the answer was complete.",
      });
    }
  } catch (err) {
    if (run.stopRequested) {
      settle(run, "stopped", null);
    } else if (!run.settled && !unloading && !reconnect(run)) {
      settle(run, run.resumed ? "interrupted" : "failed", {
        type: "connection_lost",
        message: "Connection lost: " + (err && err.message ? err.message : String(err)),
      });
    }
  } finally {
    if (run.stopRequested && !run.settled) settle(run, "stopped", null);
    if (active === run) active = null;
    setBusy(false);
    // Return focus to the message box unless the user moved elsewhere.
    if (document.activeElement === ui.stop || document.activeElement === document.body) {
      ui.prompt.focus();
    }
  }
}

function send(text) {
  if (active) return;
  const prompt = text === undefined ? ui.prompt.value : text;
  if (!prompt.trim()) {
    ui.prompt.focus();
    return;
  }
  if (editing && text === undefined) dropLastExchange();
  cancelEdit();
  saveSettings();
  const model = ui.model.value.trim() || fallbackModel();
  const request = buildRequest(prompt, model);

  const userTurn = { role: "user", content: prompt };
  const turn = { role: "assistant", content: "", state: "streaming", model: "", streamId: null, lastEventId: null };
  if (request.dropped) {
    turn.trimmed = request.dropped;
    turn.limit = request.limit;
  }
  chat.turns.push(userTurn, turn);
  const userEl = addUserMessage(userTurn);
  const view = addAssistantMessage(turn, userEl);
  views.push(view);
  scrollToBottom();
  if (text === undefined) ui.prompt.value = "";
  ui.prompt.focus();
  save();

  const run = newRun(view, false);
  if (request.limit && request.size > request.limit) {
    settle(run, "failed", {
      type: "request_too_large",
      message: "This question is " + formatNumber(request.size, 0) + " bytes as JSON; this server accepts at most " +
        formatNumber(request.limit, 0) + " bytes per request. Shorten it.",
    });
    refreshActions();
    return;
  }
  readStream(run, (signal) => fetch("/api/get-response", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify(request.body),
    signal,
  }));
}

/** Pauses before each try to continue an answer whose connection was lost midway. */
const RECONNECT_PAUSES_MS = [250, 500, 1000, 2000, 4000];

/**
 * A connection lost midway (a network switch, a proxy restarting, an instance going away
 * behind a load balancer) is not the end of the answer: the server goes on writing it for its
 * resume grace. So the page asks any instance for the rest after its last stored event, a few
 * times with growing pauses, before it calls the answer failed. True when a try is under way.
 */
function reconnect(run) {
  const { view, turn } = run;
  const attempt = run.reconnects || 0;
  if (!turn.streamId || run.stopRequested || unloading || attempt >= RECONNECT_PAUSES_MS.length) return false;
  save();
  setTimeout(() => {
    const next = newRun(view, true);
    next.reconnects = attempt + 1;
    next.reason = "a lost connection";
    if (active || turn.state !== "streaming") {
      settle(next, "interrupted", { type: "connection_lost", message: "The connection was lost midway." });
      refreshActions();
      return;
    }
    const headers = { Accept: "text/event-stream", ...authHeaders() };
    if (turn.lastEventId) headers["Last-Event-ID"] = String(turn.lastEventId);
    readStream(next, (signal) => fetch("/api/streams/" + encodeURIComponent(turn.streamId), { headers, signal }));
  }, RECONNECT_PAUSES_MS[attempt]);
  return true;
}

/** An answer that was streaming when the page went away goes on from its last stored event. */
function resumeIfStreaming() {
  const view = views[views.length - 1];
  if (!view || view.turn.state !== "streaming" || active) return;
  const turn = view.turn;
  const run = newRun(view, true);
  if (!turn.streamId) {
    settle(run, "interrupted", { type: "interrupted", message: "The page was closed before the answer started." });
    refreshActions();
    return;
  }
  const headers = { Accept: "text/event-stream", ...authHeaders() };
  if (turn.lastEventId) headers["Last-Event-ID"] = String(turn.lastEventId);
  readStream(run, (signal) => fetch("/api/streams/" + encodeURIComponent(turn.streamId), { headers, signal }));
}

async function stop() {
  if (!active) return;
  const run = active;
  run.stopRequested = true;
  // A stream outlives its connection for a while (so a reload can resume it), so
  // closing the connection would not stop the model: ask the server to stop it. The
  // stream then ends with "event: stopped", which settles the answer.
  const id = run.turn.streamId;
  if (id) {
    try {
      const res = await fetch("/api/streams/" + encodeURIComponent(id), {
        method: "DELETE",
        headers: { Accept: "application/json", ...authHeaders() },
        signal: AbortSignal.timeout(10000),
      });
      if (res.ok) return;
    } catch (e) {
      /* the server cannot be asked: close the connection instead */
    }
  }
  run.controller.abort();
}

function dropLastExchange() {
  chat.turns.splice(-2, 2);
  const last = views.pop();
  if (last) {
    last.userEl.remove();
    last.el.remove();
  }
}

function retryLast() {
  if (active || chat.turns.length < 2) return;
  const question = chat.turns[chat.turns.length - 2].content;
  dropLastExchange();
  send(question);
}

function startEdit() {
  const last = chat.turns[chat.turns.length - 2];
  if (!last || active) return false;
  editing = true;
  ui.prompt.value = last.content;
  ui.form.dataset.editing = "true";
  ui.editNote.hidden = false;
  ui.prompt.setSelectionRange(ui.prompt.value.length, ui.prompt.value.length);
  return true;
}

function cancelEdit() {
  editing = false;
  delete ui.form.dataset.editing;
  if (ui.editNote) ui.editNote.hidden = true;
}

// ---------------------------------------------------------------------
// Wiring
// ---------------------------------------------------------------------

/** Set while the page unloads: a fetch cut by the reload is not a failure to store. */
let unloading = false;

function init() {
  ui.upstream = $("#upstream");
  ui.version = $("#version");
  ui.conversation = $("#conversation");
  ui.form = $("#composer");
  ui.prompt = $("#prompt");
  ui.model = $("#model");
  ui.modelList = $("#model-list");
  ui.modelHelp = $("#model-help");
  ui.send = $("#send");
  ui.stop = $("#stop");
  ui.keyField = $("#key-field");
  ui.apiKey = $("#api-key");
  ui.newChat = $("#new-chat");
  ui.chats = $("#chats");
  ui.chatList = $("#chat-list");
  ui.settings = $("#settings");
  ui.system = $("#system");
  ui.temperature = $("#temperature");
  ui.editNote = $("#edit-note");

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  ui.stop.addEventListener("click", stop);
  ui.newChat.addEventListener("click", newChat);
  ui.apiKey.addEventListener("input", () => {
    sessionStorage.setItem(KEY_STORAGE, ui.apiKey.value.trim());
  });
  // /v1/models needs the key on a server that requires one: list once it is given.
  ui.apiKey.addEventListener("change", () => {
    if (listedModels.length === 0) loadModels();
  });
  ui.modelList.addEventListener("change", () => {
    if (ui.modelList.value) {
      ui.model.value = ui.modelList.value;
    } else {
      ui.model.select();
    }
  });
  ui.model.addEventListener("input", syncModelList);
  ui.system.addEventListener("input", saveSettings);
  ui.temperature.addEventListener("input", saveSettings);
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape" && active) {
      e.preventDefault();
      stop();
    } else if (e.key === "Escape" && editing) {
      e.preventDefault();
      ui.prompt.value = "";
      cancelEdit();
    } else if (e.key === "ArrowUp" && !ui.prompt.value && !e.shiftKey && !e.altKey && !e.ctrlKey && !e.metaKey) {
      if (startEdit()) e.preventDefault();
    }
  });
  // Code blocks' Copy buttons, wherever the renderer made them.
  ui.conversation.addEventListener("click", (e) => {
    const btn = e.target.closest && e.target.closest(".code-copy");
    if (!btn) return;
    const code = btn.closest(".code-block").querySelector("code");
    copyWithFeedback(btn, code ? code.textContent : "");
  });
  // The stored text and cursor go together, so a reload resumes right after them.
  window.addEventListener("pagehide", () => {
    unloading = true;
    saveNow();
  });
  window.addEventListener("pageshow", () => {
    unloading = false;
  });

  loadSettings();
  chat = loadChat(localStorage.getItem(STORE_CURRENT)) || emptyChat();
  renderChat();
  setBusy(false);
  // The default model from /api/info first: the picker falls back to the first listed.
  // A stored answer resumes after it: on a server with keys, /api/info says to send one.
  loadInfo().then(() => {
    resumeIfStreaming();
    return loadModels();
  }).finally(() => {
    document.body.dataset.ready = "true";
  });
  ui.prompt.focus();
}

// Exposed for debugging in the browser console, and for the page's tests.
window.tokenrelay = { createSSEParser, createMarkdown, safeHref };

if (document.readyState === "loading") {
  document.addEventListener("DOMContentLoaded", init);
} else {
  init();
}
