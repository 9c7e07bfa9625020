/*
 * tokenrelay web chat.
 *
 * Sends the conversation to POST /api/get-response and renders the
 * Server-Sent Events stream it returns, delta by delta.
 *
 * Safety rule: text coming from the model (or from error messages) is only
 * ever put into the page as text nodes / textContent, never as HTML.
 */
(function () {
  "use strict";

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

  function formatNumber(n, digits) {
    return Number(n).toLocaleString(undefined, {
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    });
  }

  // ---------------------------------------------------------------------
  // Application state
  // ---------------------------------------------------------------------

  const ui = {};

  /*
   * Conversation history sent with every request.
   *
   * Only COMPLETED exchanges are kept: a user turn is added together with
   * its assistant answer once that answer finished with `done`. When an
   * answer fails or is stopped, both the question and the partial answer
   * stay visible on the page but are left out of the history, so the
   * model never sees a truncated answer as if it were complete and the
   * history keeps alternating user/assistant turns. The user can simply
   * ask again.
   */
  const history = [];

  /** The in-flight request, or null when idle. */
  let active = null;

  // ---------------------------------------------------------------------
  // Header: which upstreams answer
  // ---------------------------------------------------------------------

  /** What /api/info said; the model picker needs its default model. */
  let serverInfo = null;

  async function loadInfo() {
    const label = ui.upstream;
    try {
      const res = await fetch("/api/info", { headers: { Accept: "application/json" } });
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

  // ---------------------------------------------------------------------
  // Model picker: the models GET /v1/models lists, beside a free name box
  // ---------------------------------------------------------------------

  /** Model names the server lists, in its order; empty until (or unless) known. */
  let listedModels = [];

  async function loadModels() {
    let models = [];
    try {
      const res = await fetch("/v1/models", { headers: { Accept: "application/json", ...authHeaders() } });
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

  const KEY_STORAGE = "tokenrelay.apiKey";

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

  function hideEmptyHint() {
    const hint = $("#empty-hint");
    if (hint) hint.remove();
  }

  function isNearBottom() {
    const c = ui.conversation;
    return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
  }

  function scrollToBottom() {
    ui.conversation.scrollTop = ui.conversation.scrollHeight;
  }

  function addUserMessage(text) {
    hideEmptyHint();
    const msg = el("article", "msg user");
    msg.setAttribute("aria-label", "You");
    msg.append(el("div", "who", "You"));
    msg.append(el("div", "text", text));
    ui.conversation.append(msg);
    scrollToBottom();
    return msg;
  }

  const STATE_LABELS = {
    streaming: "answering…",
    done: "",
    failed: "FAILED",
    stopped: "STOPPED",
  };

  /** Build an assistant message element; returns a small controller. */
  function addAssistantMessage() {
    const msg = el("article", "msg assistant");
    msg.setAttribute("aria-label", "Assistant");
    msg.dataset.state = "streaming";

    const head = el("div", "who");
    head.append(el("span", "who-name", "Assistant"));
    const modelTag = el("span", "model-tag");
    modelTag.hidden = true;
    head.append(modelTag);
    const badge = el("span", "badge", STATE_LABELS.streaming);
    head.append(badge);
    msg.append(head);

    const textEl = el("div", "text");
    // One text node that grows with appendData: never parsed as HTML.
    const textNode = document.createTextNode("");
    textEl.append(textNode);
    msg.append(textEl);

    const errorEl = el("div", "error");
    errorEl.setAttribute("role", "alert");
    errorEl.hidden = true;
    msg.append(errorEl);

    const statsEl = el("div", "stats");
    statsEl.hidden = true;
    msg.append(statsEl);

    ui.conversation.append(msg);
    scrollToBottom();

    return {
      el: msg,
      text: () => textNode.data,
      append(delta) {
        const stick = isNearBottom();
        textNode.appendData(delta);
        if (stick) scrollToBottom();
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
      },
      setError(type, message) {
        errorEl.textContent = "";
        errorEl.append(el("strong", "error-type", type || "error"));
        errorEl.append(document.createTextNode(": " + (message || "unknown error")));
        errorEl.dataset.type = type || "error";
        errorEl.hidden = false;
      },
      setStats(parts, data) {
        statsEl.textContent = parts.filter(Boolean).join(" · ");
        for (const [k, v] of Object.entries(data)) {
          if (v !== null && v !== undefined) statsEl.dataset[k] = String(v);
        }
        statsEl.hidden = !statsEl.textContent;
      },
    };
  }

  // ---------------------------------------------------------------------
  // Sending and streaming
  // ---------------------------------------------------------------------

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
    ui.conversation.setAttribute("aria-busy", busy ? "true" : "false");
    document.body.classList.toggle("is-streaming", busy);
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
    if (run.firstTokenAt !== null && run.deltas >= 2) {
      const seconds = (now - run.firstTokenAt) / 1000;
      if (seconds > 0 && tokens > 0) tps = tokens / seconds;
    }
    const parts = [];
    parts.push(ttft === null ? "no tokens received" : "first token " + formatNumber(ttft, 0) + " ms");
    if (tps !== null) parts.push(formatNumber(tps, 1) + " tokens/s");
    if (run.firstTokenAt !== null) {
      const unit = tokenSource === "usage" ? "token" : "delta";
      parts.push(formatNumber(tokens, 0) + " " + unit + (tokens === 1 ? "" : "s"));
    }
    if (usage && Number.isFinite(usage.prompt_tokens)) {
      parts.push(formatNumber(usage.prompt_tokens, 0) + " prompt tokens");
    }
    if (finishReason) parts.push("finish: " + finishReason);
    parts.push("total " + formatNumber((now - run.sentAt) / 1000, 2) + " s");
    view.setStats(parts, {
      ttftMs: ttft,
      tps: tps === null ? null : tps.toFixed(2),
      tokens: run.firstTokenAt === null ? 0 : tokens,
      tokenSource,
      deltas: run.deltas,
      finishReason: finishReason || null,
    });
  }

  async function send() {
    if (active) return;
    const prompt = ui.prompt.value;
    if (!prompt.trim()) {
      ui.prompt.focus();
      return;
    }
    const model = ui.model.value.trim() || fallbackModel();

    const userMsg = { role: "user", content: prompt };
    const messages = history.concat([userMsg]);
    const body = { messages };
    if (model) body.model = model;

    const userEl = addUserMessage(prompt);
    const view = addAssistantMessage();
    ui.prompt.value = "";

    const controller = new AbortController();
    const run = {
      controller,
      view,
      userEl,
      stopRequested: false,
      sentAt: performance.now(),
      firstTokenAt: null,
      deltas: 0,
      settled: false,
    };
    active = run;
    setBusy(true);

    function settle(state, details) {
      if (run.settled) return;
      run.settled = true;
      const stick = isNearBottom();
      view.setState(state);
      if (state === "done") {
        history.push(userMsg, { role: "assistant", content: view.text() });
      } else {
        // Not part of the history sent with later questions (see above).
        userEl.dataset.inHistory = "false";
        view.el.dataset.inHistory = "false";
        if (details && (details.type || details.message)) {
          view.setError(details.type, details.message);
        }
      }
      finishStats(view, run, details && details.usage, details && details.finishReason);
      if (stick) scrollToBottom();
    }

    function handleEvent(ev) {
      if (run.settled) return;
      let payload = null;
      try {
        payload = ev.data ? JSON.parse(ev.data) : null;
      } catch (e) {
        settle("failed", { type: "bad_event", message: "Could not parse event data: " + ev.data.slice(0, 200) });
        return;
      }
      switch (ev.type) {
        case "start":
          if (payload) {
            view.setModel(payload.model);
            if (payload.stream_id) view.el.dataset.streamId = String(payload.stream_id);
          }
          break;
        case "message":
          if (payload && typeof payload.text === "string" && payload.text.length > 0) {
            if (run.firstTokenAt === null) run.firstTokenAt = performance.now();
            run.deltas += 1;
            if (ev.id) view.el.dataset.lastEventId = ev.id;
            view.append(payload.text);
          }
          break;
        case "done":
          settle("done", {
            usage: payload && payload.usage,
            finishReason: payload && payload.finish_reason,
          });
          break;
        case "error": {
          const err = (payload && payload.error) || {};
          settle("failed", { type: err.type || "upstream_error", message: err.message || "The upstream reported an error." });
          break;
        }
        case "stopped":
          settle("stopped", { usage: payload && payload.usage });
          break;
        default:
          break; // unknown event names are ignored
      }
    }

    try {
      const res = await fetch("/api/get-response", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
        body: JSON.stringify(body),
        signal: controller.signal,
      });

      if (!res.ok) {
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
        settle("failed", { type, message: message + " (HTTP " + res.status + ")" });
        if (res.status === 401 && !ui.keyField.hidden) ui.apiKey.focus();
        return;
      }
      const ctype = res.headers.get("content-type") || "";
      if (!ctype.includes("text/event-stream") || !res.body) {
        settle("failed", { type: "bad_response", message: "Expected an event stream, got " + (ctype || "no content type") });
        return;
      }

      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      const parser = createSSEParser(handleEvent);
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
      if (!run.settled) {
        settle("failed", {
          type: "connection_lost",
          message: "The stream ended before the answer was complete.",
        });
      }
    } catch (err) {
      if (run.stopRequested) {
        settle("stopped", null);
      } else if (!run.settled) {
        settle("failed", {
          type: "connection_lost",
          message: "Connection lost: " + (err && err.message ? err.message : String(err)),
        });
      }
    } finally {
      if (run.stopRequested && !run.settled) settle("stopped", null);
      active = null;
      setBusy(false);
      // Return focus to the message box unless the user moved elsewhere.
      if (document.activeElement === ui.stop || document.activeElement === document.body) {
        ui.prompt.focus();
      }
    }
  }

  async function stop() {
    if (!active) return;
    const run = active;
    run.stopRequested = true;
    // A stream outlives its connection for a while (so a reload can resume it), so
    // closing the connection would not stop the model: ask the server to stop it. The
    // stream then ends with "event: stopped", which settles the answer.
    const id = run.view.el.dataset.streamId;
    if (id) {
      try {
        const res = await fetch("/api/streams/" + encodeURIComponent(id), {
          method: "DELETE",
          headers: { Accept: "application/json", ...authHeaders() },
        });
        if (res.ok) return;
      } catch (e) {
        /* the server cannot be asked: close the connection instead */
      }
    }
    run.controller.abort();
  }

  // ---------------------------------------------------------------------
  // Wiring
  // ---------------------------------------------------------------------

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

    ui.form.addEventListener("submit", (e) => {
      e.preventDefault();
      send();
    });
    ui.stop.addEventListener("click", stop);
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
    ui.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.altKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        send();
      } else if (e.key === "Escape" && active) {
        e.preventDefault();
        stop();
      }
    });

    setBusy(false);
    document.body.dataset.ready = "true";
    // The default model from /api/info first: the picker falls back to the first listed.
    loadInfo().then(loadModels);
    ui.prompt.focus();
  }

  // Exposed for debugging in the browser console.
  window.tokenrelay = { createSSEParser, history };

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
