// trapline dashboard: plain JS over the JSON job API (docs/protocol.md §3).
// The token is asked for once and kept in sessionStorage (localStorage when
// "remember" is ticked); every call sends it as "Authorization: Token <key>".
// Every value from the server reaches the page through textContent, never HTML.
"use strict";

(() => {
  const API = "/api/v2";
  const TOKEN_KEY = "trapline.token";
  const REFRESH_MS = 2000;
  // Longer than the server's own 15 s limit on fetching an image to annotate.
  const REQUEST_TIMEOUT_MS = 20000;
  const JOBS_PAGE = 50;
  const LIST_LIMIT = 200;
  const LOG_LINES = 60;
  const THUMB_PAGE = 48;
  const THUMB_SIZE = 360;
  const VIEW_SIZE = 1600;
  const FETCH_PARALLEL = 4;
  const FINISHED = new Set(["SUCCESS", "FAILURE", "REVOKED"]);

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = String(value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ---- time -------------------------------------------------------------

  function human(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.round(s / 60)} min`;
    if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }
  const ago = (iso) => (iso ? `${human((Date.now() - Date.parse(iso)) / 1000)} ago` : "—");
  const stamp = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
  function until(iso) {
    if (!iso) return "—";
    const s = (Date.parse(iso) - Date.now()) / 1000;
    return s >= 0 ? `in ${human(s)}` : `${human(-s)} ago (expired)`;
  }

  // ---- token and API ----------------------------------------------------

  const getToken = () => sessionStorage.getItem(TOKEN_KEY) || localStorage.getItem(TOKEN_KEY) || "";
  function forgetToken() {
    sessionStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(TOKEN_KEY);
  }
  function setToken(token, remember) {
    forgetToken();
    (remember ? localStorage : sessionStorage).setItem(TOKEN_KEY, token);
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  async function request(path, options = {}) {
    const token = getToken();
    if (!token) {
      showLogin("");
      throw new ApiError(401, "no token");
    }
    const headers = { Authorization: `Token ${token}`, ...(options.headers || {}) };
    // A server that stops answering must show as an outage, not keep the page "live"
    // for ever: give up on the answer after REQUEST_TIMEOUT_MS.
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, { ...options, headers, signal: abort.signal });
    } catch (err) {
      throw new ApiError(
        0,
        abort.signal.aborted
          ? `the server did not answer within ${REQUEST_TIMEOUT_MS / 1000} s`
          : "the server cannot be reached",
      );
    } finally {
      clearTimeout(timer);
    }
    if (response.status === 401) {
      forgetToken();
      showLogin("The server refused this token (401). Paste a valid one.");
      throw new ApiError(401, "token refused");
    }
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try {
        const body = await response.json();
        if (body && body.detail) detail = `${detail}: ${body.detail}`;
      } catch (err) {
        // not JSON: keep the status line
      }
      throw new ApiError(response.status, detail);
    }
    return response;
  }

  const getJSON = async (path) => (await request(path, { cache: "no-store" })).json();
  async function postJSON(path, body) {
    const response = await request(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    return response.json();
  }

  const jobPath = (id) => `${API}/jobs/${id}/`;
  const imagesPath = (id, state, limit) =>
    `${API}/jobs/${id}/images/?state=${state}&limit=${limit}`;
  const logsPath = (id) => `${API}/jobs/${id}/logs/?limit=${LOG_LINES}`;
  const imagePath = (id, imageId) => `${API}/jobs/${id}/images/${encodeURIComponent(imageId)}/`;
  const annotatedPath = (id, imageId, size, labels) =>
    `${API}/jobs/${id}/annotated/${encodeURIComponent(imageId)}/?max_size=${size}&labels=${labels}`;

  // Annotated images: fetched with the token (an <img src> cannot send it), shown as blob URLs.
  const fetchQueue = [];
  let fetching = 0;
  function pumpFetches() {
    while (fetching < FETCH_PARALLEL && fetchQueue.length) {
      const task = fetchQueue.shift();
      fetching += 1;
      task().finally(() => {
        fetching -= 1;
        pumpFetches();
      });
    }
  }
  function fetchImage(path, isWanted) {
    return new Promise((resolve, reject) => {
      fetchQueue.push(async () => {
        if (!isWanted()) {
          reject(new ApiError(0, "no longer wanted"));
          return;
        }
        try {
          const blob = await (await request(path)).blob();
          resolve(URL.createObjectURL(blob));
        } catch (err) {
          reject(err);
        }
      });
      pumpFetches();
    });
  }

  // ---- shell ------------------------------------------------------------

  let toastTimer = null;
  function toast(message, bad) {
    const box = $("toast");
    box.textContent = message;
    box.className = bad ? "toast bad" : "toast";
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      box.hidden = true;
    }, 5000);
  }

  function setLive(ok, why) {
    const live = $("live");
    live.className = ok ? "live on" : "live off";
    live.textContent = ok ? "live" : `not updating: ${why}`;
  }

  function setCrumbs(...parts) {
    $("crumbs").replaceChildren(
      ...parts.flatMap((part, i) => [i ? " / " : "", part]),
    );
  }

  /** Calls fn now and then every REFRESH_MS after it settles; paused while the tab is hidden. */
  function poll(fn) {
    let stopped = false;
    let timer = null;
    let running = false;
    let again = false;
    async function tick() {
      if (stopped) return;
      if (running) {
        again = true;
        return;
      }
      clearTimeout(timer);
      running = true;
      try {
        if (!document.hidden) {
          await fn();
          setLive(true);
        }
      } catch (err) {
        if (err.status !== 401) setLive(false, err.message);
      } finally {
        running = false;
      }
      if (stopped) return;
      if (again) {
        again = false;
        tick();
      } else {
        timer = setTimeout(tick, REFRESH_MS);
      }
    }
    tick();
    return {
      now: tick,
      stop() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  function badge(status) {
    return el("span", { class: `badge ${status}`, text: status });
  }

  function stageRow(stage, withParams) {
    const pct = Math.round((stage.progress || 0) * 1000) / 10;
    const fill = el("div", { class: `fill ${stage.status}` });
    fill.style.width = `${pct}%`;
    const row = el(
      "div",
      { class: "stage", title: `${stage.name}: ${stage.status}` },
      el("span", { class: "stage-name", text: stage.name }),
      el("div", { class: "track" }, fill),
      el("span", { class: "stage-pct", text: `${pct}%` }),
    );
    if (withParams && stage.params && stage.params.length) {
      const text = stage.params.map((p) => `${p.name}: ${p.value}`).join(" · ");
      row.append(el("div", { class: "stage-params", text }));
    }
    return row;
  }

  function countChips(counts) {
    return el(
      "div",
      { class: "counts" },
      ["queued", "reserved", "done", "failed"].map((state) =>
        el("span", { class: `chip ${state}` }, `${state} `, el("b", { text: counts[state] })),
      ),
      el("span", { class: "chip" }, "total ", el("b", { text: counts.total })),
    );
  }

  function topClassification(classifications) {
    const items = (classifications || []).filter((c) => c && typeof c === "object");
    if (!items.length) return { label: null, score: null };
    const terminal = items.filter((c) => c.terminal);
    const pool = terminal.length ? terminal : items;
    const chosen = pool[pool.length - 1];
    const label = chosen.classification ?? chosen.label ?? null;
    const scores = chosen.scores || [];
    const labels = chosen.labels || [];
    let score = null;
    if (label !== null && labels.includes(label) && labels.length === scores.length) {
      score = scores[labels.indexOf(label)];
    } else if (scores.length) {
      score = Math.max(...scores);
    }
    return { label, score };
  }

  // ---- jobs list ----------------------------------------------------------

  class JobsView {
    constructor() {
      this.offset = 0;
      this.count = 0;
    }

    start() {
      setCrumbs(el("span", { text: "Jobs" }));
      $("jobs-view").hidden = false;
      $("only-active").onchange = () => {
        this.offset = 0;
        this.poller.now();
      };
      $("jobs-prev").onclick = () => {
        this.offset = Math.max(0, this.offset - JOBS_PAGE);
        this.poller.now();
      };
      $("jobs-next").onclick = () => {
        this.offset += JOBS_PAGE;
        this.poller.now();
      };
      this.poller = poll(() => this.refresh());
    }

    stop() {
      this.poller.stop();
      $("jobs-view").hidden = true;
    }

    async refresh() {
      const query = new URLSearchParams({ limit: JOBS_PAGE, offset: this.offset });
      if ($("only-active").checked) query.set("incomplete_only", "true");
      const page = await getJSON(`${API}/jobs/?${query}`);
      this.count = page.count;
      const rows = page.results.map((job) => this.row(job));
      $("jobs-body").replaceChildren(...rows);
      $("jobs-empty").hidden = rows.length > 0;
      const last = Math.min(this.offset + rows.length, page.count);
      $("jobs-count").textContent = page.count ? `${this.offset + 1}–${last} of ${page.count}` : "";
      $("jobs-prev").disabled = !page.previous;
      $("jobs-next").disabled = !page.next;
    }

    row(job) {
      const open = () => {
        location.hash = `#/jobs/${job.id}`;
      };
      const errors = (job.progress && job.progress.errors) || [];
      const notes = el(
        "td",
        { class: "notes" },
        job.waiting ? el("div", { class: "waiting", text: job.waiting }) : null,
        errors.length ? el("div", { class: "err", text: errors[errors.length - 1] }) : null,
      );
      return el(
        "tr",
        { onclick: open },
        el(
          "td",
          {},
          el("a", { href: `#/jobs/${job.id}`, text: `#${job.id} ${job.name}` }),
          el("div", { class: "muted", text: `${job.pipeline_slug} · created ${ago(job.created_at)}` }),
        ),
        el("td", {}, badge(job.status)),
        el("td", {}, job.progress.stages.map((s) => stageRow(s, false))),
        el("td", {}, countChips(job.counts)),
        notes,
      );
    }
  }

  // ---- one job ------------------------------------------------------------

  class JobView {
    constructor(id) {
      this.id = id;
      this.stopped = false;
      this.thumbLimit = THUMB_PAGE;
      this.tiles = new Map(); // image id -> {node, url}
      this.job = null;
    }

    start() {
      setCrumbs(el("a", { href: "#/", text: "Jobs" }), el("span", { text: `Job ${this.id}` }));
      $("job-view").hidden = false;
      $("job-title").textContent = `Job ${this.id}`;
      $("thumbs").replaceChildren();
      $("job-logs").replaceChildren();
      $("thumbs-more").onclick = () => {
        this.thumbLimit += THUMB_PAGE;
        this.poller.now();
      };
      $("job-retry").onclick = () => this.act("retry", "Re-queue every failed image of this job?");
      $("job-cancel").onclick = () =>
        this.act("cancel", "Cancel this job? Results already in stay; no more tasks are handed out.");
      this.poller = poll(() => this.refresh());
    }

    stop() {
      this.stopped = true;
      this.poller.stop();
      for (const tile of this.tiles.values()) if (tile.url) URL.revokeObjectURL(tile.url);
      this.tiles.clear();
      $("thumbs").replaceChildren();
      $("job-view").hidden = true;
      closeViewer();
    }

    async act(action, question) {
      if (!window.confirm(question)) return;
      try {
        await postJSON(`${API}/jobs/${this.id}/${action}/`, {});
        toast(action === "retry" ? "Failed images re-queued." : "Job cancelled.");
      } catch (err) {
        toast(err.status === 403 ? `${err.message} (needs an admin token)` : err.message, true);
      }
      this.poller.now();
    }

    async refresh() {
      const id = this.id;
      const [job, failed, leased, logs, done] = await Promise.all([
        getJSON(jobPath(id)),
        getJSON(imagesPath(id, "failed", LIST_LIMIT)),
        getJSON(imagesPath(id, "reserved", LIST_LIMIT)),
        getJSON(logsPath(id)),
        getJSON(imagesPath(id, "done", this.thumbLimit)),
      ]);
      if (this.stopped) return;
      this.job = job;
      this.renderSummary(job);
      this.renderFailed(failed.results, job.counts.failed);
      this.renderLeases(leased.results);
      this.renderLogs(logs.logs);
      this.renderThumbs(done.results, job.counts.done);
    }

    renderSummary(job) {
      $("job-title").textContent = `#${job.id} ${job.name}`;
      const status = $("job-status");
      status.textContent = job.status;
      status.className = `badge ${job.status}`;
      const meta = [
        `pipeline ${job.pipeline_slug}`,
        `project ${job.project_id}`,
        `created ${stamp(job.created_at)}`,
        job.started_at ? `started ${stamp(job.started_at)}` : null,
        job.finished_at ? `finished ${stamp(job.finished_at)}` : null,
        job.deadline_at ? `deadline ${stamp(job.deadline_at)}` : null,
        `failure threshold ${Math.round(job.failure_threshold * 100)}%`,
        `${job.detections} detections`,
      ];
      $("job-meta").textContent = meta.filter(Boolean).join(" · ");
      $("job-waiting").hidden = !job.waiting;
      $("job-waiting").textContent = job.waiting || "";
      $("job-stages").replaceChildren(...job.progress.stages.map((s) => stageRow(s, true)));
      $("job-counts").replaceChildren(countChips(job.counts));
      $("job-errors").replaceChildren(
        ...(job.progress.errors || []).map((e) => el("li", { text: e })),
      );
      $("job-retry").hidden = !job.counts.failed;
      $("job-cancel").hidden = FINISHED.has(job.status) || job.status === "CANCELING";
    }

    renderFailed(rows, total) {
      $("failed-count").textContent = total ? `(${rows.length < total ? `${rows.length} of ` : ""}${total})` : "";
      $("failed-empty").hidden = rows.length > 0;
      $("failed-body").replaceChildren(
        ...rows.map((r) =>
          el(
            "tr",
            {},
            el("td", { class: "wrap" }, this.imageLink(r.image_id)),
            el("td", { class: "wrap", text: r.reason || "—" }),
            el("td", { class: "num", text: r.deliveries }),
            el("td", { title: r.failed_at || "", text: ago(r.failed_at) }),
          ),
        ),
      );
    }

    renderLeases(rows) {
      $("leases-count").textContent = rows.length ? `(${rows.length})` : "";
      $("leases-empty").hidden = rows.length > 0;
      $("leases-body").replaceChildren(
        ...rows.map((r) =>
          el(
            "tr",
            {},
            el("td", { class: "wrap", text: r.image_id }),
            el("td", { class: "wrap", title: r.holder_id || "", text: r.holder || "—" }),
            el("td", { class: "num", text: r.deliveries }),
            el("td", { title: stamp(r.lease_deadline), text: until(r.lease_deadline) }),
          ),
        ),
      );
    }

    renderLogs(lines) {
      const box = $("job-logs");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 8;
      box.replaceChildren(
        ...lines.map((line) =>
          el(
            "li",
            { class: line.level },
            el("span", { class: "at", title: line.at, text: stamp(line.at) }),
            el("span", { class: "lvl", text: line.level }),
            line.message,
          ),
        ),
      );
      if (!lines.length) box.append(el("li", { class: "muted", text: "No log lines yet." }));
      if (atBottom) box.scrollTop = box.scrollHeight;
    }

    renderThumbs(rows, total) {
      const grid = $("thumbs");
      const wanted = new Set(rows.map((r) => r.image_id));
      for (const [imageId, tile] of this.tiles) {
        if (!wanted.has(imageId)) {
          tile.node.remove();
          if (tile.url) URL.revokeObjectURL(tile.url);
          this.tiles.delete(imageId);
        }
      }
      for (const row of rows) {
        if (!this.tiles.has(row.image_id)) this.addTile(row.image_id);
        grid.append(this.tiles.get(row.image_id).node); // keeps API order
      }
      $("thumbs-count").textContent = total ? `(${rows.length} of ${total})` : "(none yet)";
      $("thumbs-more").hidden = rows.length >= total;
    }

    addTile(imageId) {
      const pic = el("div", { class: "pic", text: "loading…" });
      const node = el(
        "button",
        { type: "button", class: "thumb", title: imageId, onclick: () => openViewer(this.id, imageId) },
        pic,
        el("span", { class: "cap", text: imageId }),
      );
      const tile = { node, url: null };
      this.tiles.set(imageId, tile); // before the fetch, which checks it is still wanted
      fetchImage(annotatedPath(this.id, imageId, THUMB_SIZE, false), () => !this.stopped && this.tiles.get(imageId) === tile)
        .then((url) => {
          if (this.stopped || this.tiles.get(imageId) !== tile) {
            URL.revokeObjectURL(url);
            return;
          }
          tile.url = url;
          pic.replaceChildren(el("img", { src: url, alt: imageId, loading: "lazy" }));
        })
        .catch((err) => {
          pic.textContent = err.status ? err.message : "not loaded";
        });
    }

    imageLink(imageId) {
      return el("a", {
        href: "#",
        text: imageId,
        onclick: (event) => {
          event.preventDefault();
          openViewer(this.id, imageId);
        },
      });
    }
  }

  // ---- one image, larger ----------------------------------------------------

  let viewer = null; // {token, url}

  function closeViewer() {
    if (viewer && viewer.url) URL.revokeObjectURL(viewer.url);
    viewer = null;
    $("viewer").hidden = true;
    $("viewer-img").removeAttribute("src");
  }

  async function openViewer(jobId, imageId) {
    closeViewer();
    const mine = { url: null };
    viewer = mine;
    $("viewer").hidden = false;
    $("viewer-title").textContent = imageId;
    $("viewer-meta").textContent = "";
    $("viewer-dets").replaceChildren();
    $("viewer-nodets").hidden = true;
    $("viewer-msg").textContent = "loading…";
    const img = $("viewer-img");
    img.alt = imageId;
    fetchImage(annotatedPath(jobId, imageId, VIEW_SIZE, true), () => viewer === mine)
      .then((url) => {
        if (viewer !== mine) {
          URL.revokeObjectURL(url);
          return;
        }
        mine.url = url;
        img.src = url;
        $("viewer-msg").textContent = "";
      })
      .catch((err) => {
        if (viewer === mine) $("viewer-msg").textContent = err.message;
      });
    try {
      const image = await getJSON(imagePath(jobId, imageId));
      if (viewer !== mine) return;
      const meta = [
        `state ${image.state}`,
        `deliveries ${image.deliveries}`,
        image.result_at ? `result ${stamp(image.result_at)}` : null,
        image.holder ? `last holder ${image.holder}` : null,
        image.reason ? `reason: ${image.reason}` : null,
        image.url ? `url ${image.url}` : null,
      ];
      $("viewer-meta").textContent = meta.filter(Boolean).join(" · ");
      const dets = image.detections || [];
      $("viewer-nodets").hidden = dets.length > 0;
      $("viewer-dets").replaceChildren(
        ...dets.map((d) => {
          const top = topClassification(d.classifications);
          const b = d.bbox;
          const box = [b.x1, b.y1, b.x2, b.y2].map((v) => Math.round(v)).join(", ");
          const all = (d.classifications || [])
            .map((c) => `${c.classification ?? "?"} (${(c.algorithm && c.algorithm.key) || "?"})`)
            .join("; ");
          return el(
            "tr",
            { title: all },
            el("td", { class: "num", text: d.index }),
            el("td", { text: top.label ?? "—" }),
            el("td", { class: "num", text: top.score === null ? "—" : Number(top.score).toFixed(2) }),
            el("td", { text: box }),
          );
        }),
      );
    } catch (err) {
      if (viewer === mine) $("viewer-meta").textContent = err.message;
    }
  }

  // ---- routing and login ------------------------------------------------------

  let current = null;

  function showLogin(message) {
    if (current) current.stop();
    current = null;
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").hidden = !message;
    $("login-error").textContent = message || "";
    setCrumbs();
    $("live").className = "live";
    $("live").textContent = "";
    $("token").focus();
  }

  function route() {
    if (current) current.stop();
    current = null;
    if (!getToken()) {
      showLogin("");
      return;
    }
    $("login").hidden = true;
    $("logout").hidden = false;
    const match = /^#\/jobs\/(\d+)/.exec(location.hash);
    current = match ? new JobView(Number(match[1])) : new JobsView();
    current.start();
  }

  function init() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      setToken(token, $("remember").checked);
      $("token").value = "";
      route();
    });
    $("logout").addEventListener("click", () => {
      forgetToken();
      showLogin("Token forgotten.");
    });
    $("viewer-close").addEventListener("click", closeViewer);
    $("viewer").addEventListener("click", (event) => {
      if (event.target === $("viewer")) closeViewer();
    });
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape") closeViewer();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && current) current.poller.now();
    });
    window.addEventListener("hashchange", route);
    route();
  }

  init();
})();
