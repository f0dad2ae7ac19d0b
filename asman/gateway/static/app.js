// Asman's page. The job lives in the URL hash, in compute-queues' format:
//   #?job=<base64(encodeURIComponent(stable JSON))>&inputs=<same, {name: text}>&queue=<q>
// Any other hash parameter is merged into the job's env (as compute-queues does).
// `control` (same encoding) goes with the job, not in it: its callbacks (webhooks).
// The queue may be given as a URL (https://host/q/<queue>, https://host/<queue>).
// No build step, no dependencies: plain DOM, fetch and EventSource.
// What this page submits and cancels is signed by this browser's own Ed25519 key (WebCrypto,
// not extractable, kept in IndexedDB): the gateway prepares the bytes, the browser signs them.
"use strict";

(() => {
  const API = "/api/v1";
  // compute-queues' metaframe.json hashParams: never merged into env
  const SYSTEM_PARAMS = new Set([
    "allowsetjob", "autostart", "config", "control", "debug", "definition",
    "ignoreQueueOverride", "inputs", "job", "maxJobDuration", "queue", "queueOverride",
    "resolverefs", "terminal",
  ]);
  const LEGACY_INJECTED = new Set(["channel", "CHANNEL", "readonly", "edit", "parent-metapage-id", "fs-path"]);
  const QUEUE_RE = /^[A-Za-z0-9_-]{1,64}$/;

  const $ = (id) => document.getElementById(id);
  const el = {
    queue: $("queue"), queueNote: $("queue-note"), control: $("control"),
    run: $("run"), cancel: $("cancel"), badge: $("state"),
    definition: $("definition"), validation: $("validation"), files: $("files"),
    addFile: $("add-file"), workers: document.querySelector("#workers tbody"),
    workersNote: $("workers-note"), jobId: $("job-id"), jobLink: $("job-link"),
    jobState: $("job-state"), exitCode: $("exit-code"), duration: $("duration"),
    worker: $("worker"), waiting: $("waiting"), message: $("message"),
    logs: $("logs"), outputs: $("outputs"), submitter: $("submitter"), yourKey: $("your-key"),
  };

  const app = {
    params: {},        // raw hash parameters (values as written in the URL)
    job: null,         // the `job` parameter: the definition without inputs
    inputs: {},        // the `inputs` parameter: {file name: text}
    control: null,     // the `control` parameter: sent with the job (callbacks), not part of it
    controlError: null, // why the link's control cannot be sent, if it cannot
    jobId: null,       // id of the definition the page shows (from /api/v1/validate)
    followed: null,    // {queue, jobId} followed by `source`
    source: null,      // EventSource of the followed job
    state: null,       // last job view
    validateSeq: 0,
  };

  // -- the hash format ----------------------------------------------------------------------

  function stable(value) {
    // fast-json-stable-stringify: sorted keys (UTF-16 order), no spaces
    if (Array.isArray(value)) return "[" + value.map((v) => (v === undefined ? "null" : stable(v))).join(",") + "]";
    if (value && typeof value === "object") {
      return "{" + Object.keys(value).sort().filter((k) => value[k] !== undefined)
        .map((k) => JSON.stringify(k) + ":" + stable(value[k])).join(",") + "}";
    }
    return JSON.stringify(value);
  }

  function encodeParam(obj) {
    return btoa(encodeURIComponent(stable(obj))).replace(/=/g, "%3D");
  }

  function decodeParam(text) {
    let s = text;
    try { s = decodeURIComponent(text); } catch (e) { /* keep as written */ }
    s = s.trim().replace(/=+$/, "");
    s += "=".repeat((4 - (s.length % 4)) % 4);
    const raw = atob(s);
    let decoded;
    if (/^[A-Za-z0-9\-_.!~*'()%]*$/.test(raw)) {
      decoded = decodeURIComponent(raw);
    } else {
      // the single-encoded form: base64 of UTF-8 JSON
      const bytes = Uint8Array.from(raw, (c) => c.charCodeAt(0));
      decoded = new TextDecoder().decode(bytes);
    }
    return JSON.parse(decoded);
  }

  function encodePlain(value) {
    return encodeURIComponent(value).replace(/%3A/gi, ":").replace(/%2F/gi, "/");
  }

  function readHash() {
    const params = {};
    const hash = location.hash.replace(/^#/, "");
    const q = hash.indexOf("?");
    if (q >= 0) {
      for (const part of hash.slice(q + 1).split("&")) {
        if (!part) continue;
        const i = part.indexOf("=");
        params[i < 0 ? part : part.slice(0, i)] = i < 0 ? "" : part.slice(i + 1);
      }
    }
    return params;
  }

  function plainParam(name) {
    const raw = app.params[name];
    if (raw === undefined) return undefined;
    try { return decodeURIComponent(raw); } catch (e) { return raw; }
  }

  function writeHash() {
    const params = { ...app.params };
    params.job = encodeParam(app.job || {});
    if (Object.keys(app.inputs).length) params.inputs = encodeParam(app.inputs);
    else delete params.inputs;
    const queue = el.queue.value.trim();
    if (queue) params.queue = encodePlain(queue);
    else delete params.queue;
    app.params = params;
    const query = Object.keys(params).sort().map((k) => `${k}=${params[k]}`).join("&");
    const path = location.pathname.startsWith("/j/") ? "/" : location.pathname;
    history.replaceState(null, "", `${path}#?${query}`);
  }

  // A queue as typed or linked: a name, or a URL whose hash or query names `queue=`, or
  // whose last path segment is the queue (compute-queues' https://host/<queue>, and
  // https://host/q/<queue>). {queue, note} when understood, {queue: "", error} when not.
  function parseQueue(text) {
    const value = (text || "").trim();
    if (!value || QUEUE_RE.test(value)) return { queue: value, note: "" };
    if (!/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) {
      return { queue: "", error: `"${value.slice(0, 80)}" is not a queue name: use 1–64 letters, digits, - or _, or a queue URL such as https://host/q/<queue>` };
    }
    let url;
    try { url = new URL(value); } catch (e) { return { queue: "", error: "this queue URL does not parse: check it" }; }
    const named = [url.hash.replace(/^#\??/, ""), url.search.replace(/^\?/, "")]
      .map((q) => new URLSearchParams(q).get("queue")).find((q) => q);
    const segments = url.pathname.split("/").filter(Boolean);
    let name = named;
    if (!name) {
      if (segments.length === 2 && segments[0] === "j") {
        return { queue: "", error: "this is a job's link, not a queue's: add #?queue=<its queue> to it, or give the queue" };
      }
      if (!segments.length) return { queue: "", error: `the URL names no queue: end it with one, e.g. ${url.origin}/q/<queue>` };
      try { name = decodeURIComponent(segments[segments.length - 1]); } catch (e) { name = segments[segments.length - 1]; }
    }
    if (!QUEUE_RE.test(name)) {
      return { queue: "", error: `the URL's queue "${name.slice(0, 80)}" is not a queue name: use 1–64 letters, digits, - or _` };
    }
    const elsewhere = url.origin !== location.origin ? ` (from ${url.host}; this page runs it on ${location.host})` : "";
    return { queue: name, note: `queue ${name}, from the URL${elsewhere}` };
  }

  function queueParsed() {
    const override = plainParam("queueOverride");
    if (override && plainParam("ignoreQueueOverride") !== "true") return parseQueue(override);
    return parseQueue(el.queue.value);
  }

  function queueName() { return queueParsed().queue; }

  // The definition the browser submits: job + env from extra params + inputs as configFiles.
  function definition() {
    // (compute-queues' links carry the job without `inputs`; a job read from a short link
    // keeps its own: without them it would be another job)
    const def = { ...(app.job || {}) };
    const extra = {};
    for (const key of Object.keys(app.params)) {
      if (SYSTEM_PARAMS.has(key) || key.startsWith("mp-") || key.startsWith("mp_") || LEGACY_INJECTED.has(key)) continue;
      extra[key] = plainParam(key);
    }
    const env = { ...(def.env && typeof def.env === "object" ? def.env : {}), ...extra };
    if (Object.keys(env).length) def.env = env; else delete def.env;
    for (const [key, value] of Object.entries(extra)) {
      if (typeof def.command === "string") def.command = def.command.replace("${" + key + "}", value);
      if (def.build && typeof def.build.context === "string") {
        def.build = { ...def.build, context: def.build.context.replace("${" + key + "}", value) };
      }
    }
    if (Object.keys(app.inputs).length) {
      def.configFiles = {};
      for (const [name, text] of Object.entries(app.inputs)) def.configFiles[name] = { type: "utf8", value: text };
    }
    if (def.configFiles && !Object.keys(def.configFiles).length) delete def.configFiles;
    return def;
  }

  // -- HTTP ---------------------------------------------------------------------------------

  async function call(method, url, body) {
    const init = { method, headers: { Accept: "application/json" } };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(url, init);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const err = new Error((data && data.error) || `${method} ${url}: HTTP ${resp.status}`);
      err.status = resp.status;
      err.body = data;
      throw err;
    }
    return data;
  }

  const jobUrl = (queue, id) => `${API}/queues/${encodeURIComponent(queue)}/jobs/${id}`;

  // -- your key -----------------------------------------------------------------------------
  // One Ed25519 key per browser (per profile), made on first use. Its private half cannot be
  // exported, not even by this page; the gateway never sees it. The jobs it signs are its
  // own: only it can cancel them. Without WebCrypto Ed25519 the gateway signs instead.

  const KEY_DB = "asman";
  const KEY_STORE = "keys";
  const KEY_NAME = "browser";
  const me = { key: null, id: null, gateway: null, ready: null };

  function idb(request) {
    return new Promise((resolve, reject) => {
      request.onsuccess = () => resolve(request.result);
      request.onerror = (ev) => { ev.preventDefault(); reject(request.error); };
    });
  }

  const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

  function toB64url(bytes) {
    let s = "";
    for (const b of bytes) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function fromB64url(text) {
    const s = text.replace(/-/g, "+").replace(/_/g, "/");
    return Uint8Array.from(atob(s + "=".repeat((4 - (s.length % 4)) % 4)), (c) => c.charCodeAt(0));
  }

  async function loadKey() {
    if (!window.isSecureContext || !window.crypto || !crypto.subtle || !window.indexedDB) {
      throw new Error("WebCrypto needs a secure page (https, or a gateway on localhost)");
    }
    const open = indexedDB.open(KEY_DB, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(KEY_STORE);
    const db = await idb(open);
    const store = (mode) => db.transaction(KEY_STORE, mode).objectStore(KEY_STORE);
    try {
      let found = await idb(store("readonly").get(KEY_NAME));
      if (!found) {
        const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
        const raw = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
        const fresh = { privateKey: pair.privateKey, publicKey: pair.publicKey, id: hex(raw) };
        try {
          await idb(store("readwrite").add(fresh, KEY_NAME));
          found = fresh;
        } catch (err) {
          found = await idb(store("readonly").get(KEY_NAME)); // another tab made one first
        }
      }
      if (!found || !found.privateKey || !/^[0-9a-f]{64}$/.test(found.id)) {
        throw new Error("the key stored in this browser cannot be read");
      }
      return found;
    } finally {
      db.close();
    }
  }

  async function setUpKey() {
    try {
      const info = await call("GET", `${API}/info`);
      me.gateway = info.peerId;
    } catch (err) { /* the job views still say who submitted */ }
    try {
      const found = await loadKey();
      me.key = found.privateKey;
      me.id = found.id;
      el.yourKey.dataset.peerId = me.id;
      el.yourKey.textContent = `your key: ${me.id.slice(0, 12).replace(/(.{4})(?=.)/g, "$1 ")}`;
      el.yourKey.title = "Jobs you run from this browser are signed with its own key, which "
        + "never leaves it: only this browser can cancel them. Its public key is " + me.id;
    } catch (err) {
      // said once, here: the page works on, with the gateway's signature
      me.key = null;
      el.yourKey.textContent = "no key: the gateway signs your jobs, and anyone may cancel them";
      el.yourKey.classList.add("bad");
      el.yourKey.title = `This browser cannot keep its own signing key (${err.message || err.name}), `
        + "so the gateway signs your jobs: anyone using this gateway may cancel them.";
    }
  }

  // Sign with this browser's key what the gateway prepares, and send it back.
  async function signed(prepareUrl, body) {
    const prepared = await call("POST", prepareUrl, { ...body, key: me.id });
    if (prepared.signer !== me.id) throw new Error("the gateway prepared an event for another key");
    const signature = await crypto.subtle.sign({ name: "Ed25519" }, me.key, fromB64url(prepared.toSign));
    return call("POST", prepared.commit, {
      protected: prepared.protected,
      payload: prepared.payload,
      signature: toB64url(new Uint8Array(signature)),
    });
  }

  function whose(id) {
    if (!id) return "–";
    if (me.id && id === me.id) return "you (this browser's key)";
    if (me.gateway && id === me.gateway) return "the gateway";
    return `another key ${short(id)}`;
  }

  // -- rendering ----------------------------------------------------------------------------

  function fmtDuration(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(2)} s`;
    return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
  }

  function fmtBytes(n) {
    if (!n) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${i ? n.toFixed(1) : n} ${units[i]}`;
  }

  function short(id) { return id ? `${id.slice(0, 12)}…` : "–"; }

  function setBadge(text, state) {
    el.badge.textContent = text;
    el.badge.dataset.state = state;
  }

  function renderJob(view) {
    // a worker claimed or finished the job: the workers' free slots changed too
    if (!app.state || app.state.state !== view.state) refreshWorkers();
    app.state = view;
    const label = view.state === "finished" ? view.reason : view.state;
    setBadge(label, label);
    el.jobState.textContent = view.state === "finished" ? `finished (${view.reason})` : view.state;
    const result = view.result;
    el.exitCode.textContent = result && result.exitCode !== null ? String(result.exitCode) : "–";
    el.duration.textContent = result ? fmtDuration(result.durationMs) : "–";
    el.worker.textContent = view.worker ? short(view.worker) : "–";
    if (result && result.trustedWorker) el.worker.textContent += " ✓ trusted by the queue";
    else if (result && view.worker) el.worker.textContent += " (any worker: not vetted)";
    el.worker.title = view.worker || "";
    el.submitter.textContent = whose(view.submitter);
    el.submitter.title = view.submitter || "";
    if (view.control && Object.keys(view.control).length) renderControl(view.control, "job");
    el.message.textContent = result && result.message ? result.message : "";
    el.message.classList.remove("bad");
    if (view.state !== "queued") showWaiting(null);
    else if (view.waiting) showWaiting(view.waiting);
    el.cancel.disabled = view.state === "finished";
    if (result) renderOutputs(view);
  }

  function showWaiting(w) {
    el.waiting.hidden = !w;
    el.waiting.textContent = w ? `Waiting: ${w.message}` : "";
    el.waiting.dataset.code = w ? w.code : "";
  }

  function renderOutputs(view) {
    el.outputs.replaceChildren();
    const outputs = (view.result && view.result.outputs) || [];
    if (!outputs.length) {
      const li = document.createElement("li");
      li.className = "note";
      li.textContent = "the job wrote nothing to /outputs";
      el.outputs.append(li);
      return;
    }
    for (const out of outputs) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `${out.url}?download=1`;
      a.textContent = out.path;
      a.setAttribute("download", out.path.split("/").pop());
      a.dataset.path = out.path;
      const size = document.createElement("span");
      size.className = "note";
      size.textContent = ` ${fmtBytes(out.size)}`;
      li.append(a, size);
      el.outputs.append(li);
    }
  }

  function appendLog(chunks) {
    const stick = el.logs.scrollTop + el.logs.clientHeight >= el.logs.scrollHeight - 8;
    for (const c of chunks) {
      const span = document.createElement("span");
      span.className = c.stream;
      span.textContent = c.text;
      el.logs.append(span);
    }
    if (stick) el.logs.scrollTop = el.logs.scrollHeight;
  }

  function resetJob() {
    el.logs.replaceChildren();
    el.outputs.replaceChildren();
    const li = document.createElement("li");
    li.className = "note";
    li.textContent = "none yet";
    el.outputs.append(li);
    for (const k of ["jobState", "exitCode", "duration", "worker", "submitter"]) el[k].textContent = "–";
    renderControl(app.control, "link");
    el.message.textContent = "";
    el.message.classList.remove("bad");
    showWaiting(null);
    el.cancel.disabled = true;
    app.state = null;
  }

  function renderFiles() {
    el.files.replaceChildren();
    for (const [name, text] of Object.entries(app.inputs)) {
      const box = document.createElement("div");
      box.className = "file";
      const row = document.createElement("div");
      row.className = "row";
      const nameInput = document.createElement("input");
      nameInput.value = name;
      nameInput.spellcheck = false;
      nameInput.setAttribute("aria-label", "file name");
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "small";
      remove.textContent = "remove";
      const area = document.createElement("textarea");
      area.value = text;
      area.spellcheck = false;
      area.setAttribute("aria-label", `content of ${name}`);
      row.append(nameInput, remove);
      box.append(row, area);
      el.files.append(box);
      let current = name;
      nameInput.addEventListener("change", () => {
        const next = nameInput.value.trim();
        if (!next || next === current || next in app.inputs) { nameInput.value = current; return; }
        const entries = Object.entries(app.inputs).map(([k, v]) => (k === current ? [next, v] : [k, v]));
        app.inputs = Object.fromEntries(entries);
        current = next;
        changed();
      });
      area.addEventListener("input", () => { app.inputs[current] = area.value; changed(); });
      remove.addEventListener("click", () => { delete app.inputs[current]; renderFiles(); changed(); });
    }
  }

  function renderWorkers(workers, queue) {
    el.workers.replaceChildren();
    for (const w of workers) {
      const tr = document.createElement("tr");
      const cells = [
        short(w.workerId) + (w.draining ? " (draining)" : ""),
        `${w.freeSlots} / ${w.slots}`,
        w.gpus ? `${w.freeGpus} / ${w.gpus}` : "–",
        w.memoryBytes ? fmtBytes(w.memoryBytes) : "no limit",
        w.hostname || "–",
      ];
      for (const text of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      tr.title = w.workerId;
      el.workers.append(tr);
    }
    el.workersNote.textContent = workers.length
      ? `${workers.length} worker${workers.length === 1 ? "" : "s"} online`
      : `no worker online: start one with \`asman worker ${queue}\``;
  }

  // -- following a job ----------------------------------------------------------------------

  function stopFollowing() {
    if (app.source) app.source.close();
    app.source = null;
    app.followed = null;
  }

  function follow(queue, id) {
    if (app.followed && app.followed.queue === queue && app.followed.jobId === id && app.source) return;
    stopFollowing();
    resetJob();
    app.followed = { queue, jobId: id };
    el.jobLink.hidden = false;
    el.jobLink.href = jobUrl(queue, id);
    el.jobLink.textContent = "json";
    const source = new EventSource(`${jobUrl(queue, id)}/events`);
    app.source = source;
    const data = (ev) => JSON.parse(ev.data);
    source.addEventListener("state", (ev) => renderJob(data(ev)));
    source.addEventListener("log", (ev) => appendLog(data(ev).chunks));
    source.addEventListener("waiting", (ev) => showWaiting(data(ev)));
    source.addEventListener("end", (ev) => {
      renderJob(data(ev));
      source.close();
      if (app.source === source) app.source = null;
      updateButtons();
    });
    source.addEventListener("error", (ev) => {
      if (ev.data) {
        // the gateway said why the stream cannot go on
        el.message.textContent = data(ev).error;
        source.close();
      } else if (source.readyState === EventSource.CLOSED) {
        // refused (not a network drop, which the browser resumes by itself)
        el.message.textContent = "the job's live updates stopped: reload the page to follow it again";
      }
    });
  }

  async function lookup() {
    // show the job of this definition on this queue if it exists
    const queue = queueName();
    if (!app.jobId || !QUEUE_RE.test(queue)) return;
    try {
      await call("GET", jobUrl(queue, app.jobId));
      follow(queue, app.jobId);
    } catch (err) {
      if (err.status === 404) {
        stopFollowing();
        resetJob();
        setBadge("not submitted", "none");
        el.jobState.textContent = "not submitted on this queue yet";
      }
    }
  }

  // -- actions ------------------------------------------------------------------------------

  function updateButtons() {
    const parsed = queueParsed();
    const queueOk = QUEUE_RE.test(parsed.queue);
    el.queue.setCustomValidity(parsed.error || "");
    el.queueNote.textContent = parsed.error || parsed.note || "";
    el.queueNote.className = parsed.error ? "note bad" : "note";
    el.run.disabled = !(app.job && app.jobId && queueOk && !app.controlError);
    el.run.title = app.controlError ? `the link's control cannot be sent: ${app.controlError}` : "";
  }

  // -- the control: callbacks and namespace, sent with the job ------------------------------

  function renderControl(control, whose) {
    el.control.replaceChildren();
    if (app.controlError && whose === "link") {
      const span = document.createElement("span");
      span.className = "bad";
      span.textContent = `the link's control cannot be sent: ${app.controlError}`;
      el.control.append(span);
      return;
    }
    const parts = [];
    const callbacks = (control && control.callbacks) || {};
    for (const event of ["queued", "finished"]) {
      const cb = callbacks[event];
      if (cb && cb.url) parts.push(`on ${event} → ${cb.url}`);
    }
    if (control && control.namespace) parts.push(`namespace ${control.namespace}`);
    el.control.textContent = parts.length ? parts.join(" · ") : "–";
    el.control.dataset.whose = parts.length ? whose : "";
    el.control.title = parts.length ? (whose === "job" ? "as the job holds them" : "from the link: sent with the job") : "";
  }

  // The definition's JSON Schema (generated from the models that validate it): the page
  // names the keys it does not know, which a job carries and ignores (a typo, most often).
  let schema = null;
  async function unknownKeys(def) {
    if (schema === null) {
      try { schema = await call("GET", `${API}/schema/definition.json`); } catch { return []; }
    }
    const known = schema.properties || {};
    return Object.keys(def).filter((k) => !Object.hasOwn(known, k));
  }

  async function validate() {
    const seq = ++app.validateSeq;
    const def = definition();
    try {
      const body = { definition: def };
      if (app.control && !app.controlError) body.control = app.control;
      const res = await call("POST", `${API}/validate`, body);
      const unknown = await unknownKeys(def);
      if (seq !== app.validateSeq) return;
      app.jobId = res.jobId;
      el.jobId.textContent = res.jobId;
      const ignored = unknown.length
        ? ` · ignored, not definition fields: ${unknown.join(", ")}` : "";
      el.validation.textContent = `valid · job id ${res.jobId}${ignored}`;
      el.validation.className = "note";
    } catch (err) {
      if (seq !== app.validateSeq) return;
      if (app.control && !app.controlError && /^control\b/.test(err.message)) {
        // the job is fine, the link's control is not: say so there, and check the job alone
        app.controlError = err.message;
        renderControl(app.control, "link");
        return validate();
      }
      app.jobId = null;
      el.jobId.textContent = "–";
      el.validation.textContent = err.message;
      el.validation.className = "note bad";
    }
    updateButtons();
  }

  let timer = null;
  function changed() {
    writeHash();
    clearTimeout(timer);
    timer = setTimeout(async () => { await validate(); await lookup(); }, 300);
  }

  async function run() {
    const queue = queueName();
    el.run.disabled = true;
    try {
      const jobs = `${API}/queues/${encodeURIComponent(queue)}/jobs`;
      // the link's control (callbacks, namespace) goes with the job: signed with it, or not
      const body = { definition: definition() };
      if (app.control) body.control = app.control;
      const res = me.key ? await signed(`${jobs}/prepare`, body) : await call("POST", jobs, body);
      app.jobId = res.jobId;
      el.jobId.textContent = res.jobId;
      stopFollowing();
      follow(queue, res.jobId);
      if (res.cached) el.message.textContent = "this exact job ran before: its result is shown";
    } catch (err) {
      el.message.textContent = err.message;
      setBadge("refused", "error");
    } finally {
      updateButtons();
    }
  }

  async function cancel() {
    if (!app.followed) return;
    el.cancel.disabled = true;
    const url = jobUrl(app.followed.queue, app.followed.jobId);
    const message = "cancelled from the page";
    try {
      if (me.key && !(app.state && app.state.submitter === me.gateway)) {
        try {
          await signed(`${url}/cancel/prepare`, { message });
        } catch (err) {
          if (err.status !== 409) throw err;
          await signed(`${url}/cancel/prepare`, { message }); // the job moved on: once more
        }
      } else {
        // a job the gateway signed (or no key here): the gateway cancels it with its own
        await call("POST", `${url}/cancel`, { message });
      }
    } catch (err) {
      el.message.textContent = err.status === 403 ? `Cancel refused: ${err.message}` : err.message;
      el.message.classList.add("bad");
      el.cancel.disabled = false;
    }
  }

  async function refreshWorkers() {
    const queue = queueName();
    if (!QUEUE_RE.test(queue)) {
      el.workers.replaceChildren();
      el.workersNote.textContent = "enter a queue to see its workers";
      return;
    }
    try {
      const q = `${API}/queues/${encodeURIComponent(queue)}`;
      const [res, policy] = await Promise.all([call("GET", `${q}/workers`), call("GET", `${q}/policy`)]);
      renderWorkers(res.workers, queue);
      $("policy-note").textContent = `Queue: ${policy.summary}`;
    } catch (err) {
      el.workersNote.textContent = err.message;
    }
  }

  // -- loading ------------------------------------------------------------------------------

  async function load() {
    if (!me.ready) me.ready = setUpKey();
    await me.ready;
    app.params = readHash();
    el.queue.value = plainParam("queue") || "";
    app.inputs = {};
    app.job = null;
    app.control = null;
    app.controlError = null;
    if (app.params.control) {
      try {
        const control = decodeParam(app.params.control);
        if (!control || typeof control !== "object" || Array.isArray(control)) throw new Error("it is not a JSON object");
        app.control = control;
      } catch (err) {
        app.controlError = err.message;
      }
    }
    renderControl(app.control, "link");
    let linkError = null;
    try {
      const short = location.pathname.match(/^\/j\/([0-9a-f]{64})/);
      if (app.params.job) {
        app.job = decodeParam(app.params.job);
      } else if (short && QUEUE_RE.test(queueName())) {
        // the short link /j/<id>#?queue=<q>: fetch the definition, then show the full link.
        // The whole definition, inputs included: without them it would be another job.
        const res = await call("GET", `/q/${encodeURIComponent(queueName())}/j/${short[1]}/definition.json`);
        if (res.data === null) throw new Error(`no job ${short[1]} on queue ${queueName()}`);
        app.job = { ...res.data };
      } else if (short) {
        // no queue in the link: look the job up on the queues this gateway exposes
        let res;
        try {
          res = await call("GET", `/j/${short[1]}.json`);
        } catch (err) {
          if (err.status === 404) throw new Error(`no job ${short[1]} on the queues this gateway exposes: add #?queue=<its queue> to the link`);
          throw new Error(`the link names job ${short[1]} but no queue: add #?queue=<its queue> to it (${err.message})`);
        }
        el.queue.value = res.data.queue;
        app.job = { ...res.data.definition };
      }
      if (app.params.inputs) {
        const files = decodeParam(app.params.inputs);
        if (files && typeof files === "object") app.inputs = files;
      }
      if (app.job !== null && (typeof app.job !== "object" || Array.isArray(app.job))) {
        throw new Error("the link's job parameter is not a JSON object");
      }
    } catch (err) {
      linkError = `cannot read the job from the link: ${err.message}`;
      if (app.job === null) app.job = {}; // never a sample job in place of the one linked
    }
    if (app.job === null) app.job = { image: "alpine:3.20", command: "echo hello" };
    el.definition.value = JSON.stringify(app.job, null, 2);
    el.definition.classList.remove("invalid");
    renderFiles();
    if (location.pathname.startsWith("/j/")) writeHash();
    await validate();
    if (linkError) {
      el.validation.textContent = linkError; // said after validation, so it stays in sight
      el.validation.className = "note bad";
    }
    await lookup();
    refreshWorkers();
    if (plainParam("autostart") === "true" && !app.followed && !el.run.disabled) run();
  }

  el.definition.addEventListener("input", () => {
    try {
      const value = JSON.parse(el.definition.value);
      if (!value || typeof value !== "object" || Array.isArray(value)) throw new Error("the definition must be a JSON object");
      app.job = value;
      el.definition.classList.remove("invalid");
      changed();
    } catch (err) {
      el.definition.classList.add("invalid");
      el.validation.textContent = `not JSON yet: ${err.message}`;
      el.validation.className = "note bad";
      app.jobId = null;
      updateButtons();
    }
  });
  el.queue.addEventListener("input", () => { changed(); refreshWorkers(); });
  el.addFile.addEventListener("click", () => {
    let n = 1;
    while (`file${n}.txt` in app.inputs) n += 1;
    app.inputs[`file${n}.txt`] = "";
    renderFiles();
    changed();
  });
  el.run.addEventListener("click", run);
  el.cancel.addEventListener("click", cancel);
  window.addEventListener("hashchange", load);
  setInterval(refreshWorkers, 5000);
  load();
})();
