// Standby web console: one ES module, no framework, no build step.
//
// - The token the operator types is kept in sessionStorage (this tab only) and sent as
//   `Authorization: Bearer` to /api/v1; a 401 signs out with the API's message.
// - Pages are addressed by the URL fragment (#/vms, #/vms/NAME, #/jobs, #/jobs/ID, #/disks,
//   #/store), so links, the back button and bookmarks work. Each page has controls built once
//   (forms, action buttons: never rebuilt under the operator's fingers) and a live part that is
//   reloaded every POLL_MS; focus inside the live part is kept across reloads.
// - A job of no VM (store verify) is shown as the replica store's; a job's live `counts` and
//   its `result` (a verification report) are shown on its page.
// - Every error shown is the API's own `error` sentence; state changes and action results are
//   announced through the polite live region (#notice).
// - Nothing here writes HTML from strings: elements are built with `el()` and text nodes, so no
//   value from the API can inject markup.

const POLL_MS = 2000;
const TOKEN_KEY = "standby.token";

const $ = (id) => document.getElementById(id);

/** Builds an element: el("td", {class: "num"}, "42", child, [more]). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "value") e.value = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  append(e, children);
  return e;
}

function append(parent, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    parent.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

// ---- API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(TOKEN_KEY) || ""}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(`/api/v1${path}`, init);
  } catch (e) {
    throw new ApiError(0, "network", `The gateway does not answer (${e.message}): is standby serve running?`);
  }
  const text = await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) {
    const msg = data && typeof data.error === "string" ? data.error : `HTTP ${res.status}: ${text.slice(0, 200)}`;
    throw new ApiError(res.status, (data && data.code) || "http", msg);
  }
  return data;
}

const enc = encodeURIComponent;

// ---- Formatting ----------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

const pad = (n) => String(n).padStart(2, "0");

function when(ms) {
  if (ms === null || ms === undefined) return "–";
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function timeEl(ms) {
  return ms === null || ms === undefined ? "–" : el("time", { datetime: new Date(ms).toISOString() }, when(ms));
}

const STATE_CLASS = {
  Protected: "good", normal: "good", succeeded: "good", healthy: "good", served: "good",
  InitialReplication: "busy", EnablingProtection: "busy", FinalizeProtection: "busy",
  Resyncing: "busy", running: "busy", warning: "warn", ResyncRequired: "warn",
  interrupted: "warn", Critical: "bad", critical: "bad", failed: "bad", intact: "good",
  damaged: "bad",
};

function badge(text) {
  return el("span", { class: `badge ${STATE_CLASS[text] || ""}` }, text || "–");
}

function progress(pct, label) {
  const v = Math.max(0, Math.min(100, pct || 0));
  return el("span", {}, el("progress", { max: 100, value: v, "aria-label": label }), ` ${v.toFixed(0)} %`);
}

function table(caption, headers, rows, empty) {
  if (rows.length === 0) return el("p", { class: "muted" }, empty);
  return el("table", {},
    el("caption", {}, caption),
    el("thead", {}, el("tr", {}, headers.map((h) => {
      const [text, cls] = Array.isArray(h) ? h : [h, null];
      return el("th", { scope: "col", class: cls }, text);
    }))),
    el("tbody", {}, rows));
}

function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

const vmLink = (name) => el("a", { href: `#/vms/${enc(name)}`, "data-key": `vm-${name}` }, name);
const jobLink = (id) => el("a", { href: `#/jobs/${id}`, "data-key": `job-${id}` }, `#${id}`);
/** What a job concerns: its VM, or the replica store for a job of no VM (store verify). */
const jobOwner = (j) => (j.vm ? vmLink(j.vm) : el("a", { href: "#/store" }, "replica store"));

// ---- Messages ------------------------------------------------------------------------------

let noticeTimer = null;

/** Announces a sentence in the polite live region (and shows it briefly). */
function notice(text) {
  const n = $("notice");
  n.textContent = text;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { n.textContent = ""; }, 8000);
}

/** A loading error (cleared by the next successful reload). */
function showError(text) {
  $("error").textContent = text || "";
}

/** An action's refusal: stays until the next action or page change (reloads keep it). */
function showActionError(text) {
  $("action-error").textContent = text || "";
}

/** Asks before a destructive action; resolves true when confirmed. */
/** Asks for confirmation; `extra`: optional controls shown under the text (e.g. a checkbox). */
function confirmAction(title, text, okLabel, extra) {
  const d = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-extra").replaceChildren(...(extra ? [extra] : []));
  $("confirm-ok").textContent = okLabel;
  d.returnValue = "cancel";
  return new Promise((resolve) => {
    d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    d.showModal();
  });
}

/** Runs an action from a button: disables it meanwhile, announces the result or the error. */
async function act(button, label, fn) {
  button.disabled = true;
  showActionError("");
  try {
    const text = await fn();
    notice(text || `${label}: done`);
    await refresh();
  } catch (e) {
    if (e.status === 401) signOut(e.message);
    else showActionError(`${label}: ${e.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---- Pages ---------------------------------------------------------------------------------
// Each page: title(route), controls(route, data) built once per visit, load(route) → data,
// render(route, data) → the live part.

function backlog(vm) {
  return vm.disks.reduce((sum, d) => sum + (d.backlog_bytes || 0), 0);
}

const vmsPage = {
  title: () => "Virtual machines",
  load: async () => {
    const [vms, disks] = await Promise.all([api("GET", "/vms"), api("GET", "/disks")]);
    return { vms, disks };
  },
  controls: (_route, { disks }) => {
    const free = disks.filter((d) => !d.vm && !d.read_only);
    const name = el("input", { id: "protect-vm", type: "text", required: true, autocomplete: "off", spellcheck: "false" });
    const boxes = free.map((d) => el("label", {},
      el("input", { type: "checkbox", name: "disk", value: d.name }), ` ${d.name} (${bytes(d.size_bytes)})`));
    const button = el("button", { type: "submit", class: "primary", id: "protect-button" }, "Protect");
    const form = el("form", { class: "inline", id: "protect-form" },
      el("label", { for: "protect-vm" }, "VM name"), name,
      free.length ? el("fieldset", {}, el("legend", {}, "Disks"), boxes)
        : el("span", { class: "muted" }, "No disk is free: every disk is in a VM or read-only."),
      button);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const chosen = [...form.querySelectorAll("input[name=disk]:checked")].map((b) => b.value);
      act(button, "Protect", async () => {
        const r = await api("POST", "/vms", { vm: name.value.trim(), disks: chosen });
        name.value = "";
        rebuildControls = true;
        return `VM ${r.vm} protected: initial replication of ${r.disks.join(", ")} starts.`;
      });
    });
    return el("section", { "aria-labelledby": "protect-title" }, el("h2", { id: "protect-title" }, "Protect a VM"), form);
  },
  render: (_route, { vms }) => table("Protected VMs, refreshed every 2 seconds",
    ["VM", "State", "Health", ["RPO", "num"], ["Backlog", "num"], "Last recovery point", "Last error"],
    vms.map((v) => el("tr", { "data-vm": v.name },
      el("th", { scope: "row" }, vmLink(v.name)),
      el("td", { class: "state" }, badge(v.state), v.state === "Protected" ? null : ` ${v.progress_percent.toFixed(0)} %`),
      el("td", { class: "health" }, badge(v.health)),
      el("td", { class: "num" }, seconds(v.rpo_seconds)),
      el("td", { class: "num" }, bytes(backlog(v))),
      el("td", {}, timeEl(v.last_point_ms)),
      el("td", {}, v.last_error || "–"))),
    "No VM is protected yet: protect one with the form above."),
};

function timeline(points) {
  if (points.length === 0) return el("p", { class: "muted" }, "No recovery point yet.");
  const first = points[0].created_ms;
  const last = points[points.length - 1].created_ms;
  const span = Math.max(1, last - first);
  const bar = el("div", { class: "timeline", "aria-hidden": "true" });
  for (const p of points) {
    const m = el("span", { class: `mark ${p.consistency}`, title: `${when(p.created_ms)} (${p.consistency})` });
    m.style.left = `${points.length === 1 ? 100 : ((p.created_ms - first) / span) * 100}%`;
    bar.append(m);
  }
  const newest = points.slice(-10).reverse();
  return el("div", {},
    bar,
    el("div", { class: "timeline-scale", "aria-hidden": "true" }, el("span", {}, when(first)), el("span", {}, when(last))),
    el("p", {}, `${points.length} recovery point${points.length === 1 ? "" : "s"} from ${when(first)} to ${when(last)}.`),
    table("Newest recovery points", ["Point", "Created", "Consistency", "Disks"],
      newest.map((p) => el("tr", {},
        el("td", { class: "mono" }, p.id), el("td", {}, timeEl(p.created_ms)), el("td", {}, p.consistency),
        el("td", {}, p.disks.map((d) => d.name).join(", ")))), ""));
}

function jobsTable(jobs, caption, withVm) {
  return table(caption,
    ["Job", withVm ? "VM or store" : null, "Kind", "State", "Progress", "Started", ["Duration", "num"], "Detail or error"].filter(Boolean),
    jobs.map((j) => el("tr", { "data-job": j.id },
      el("th", { scope: "row" }, jobLink(j.id)),
      withVm ? el("td", {}, jobOwner(j)) : null,
      el("td", { class: "kind" }, j.kind),
      el("td", { class: "state" }, badge(j.state)),
      el("td", {}, progress(j.progress_percent, `job ${j.id} progress`)),
      el("td", {}, timeEl(j.created_ms)),
      el("td", { class: "num" }, seconds(j.duration_seconds)),
      el("td", {}, j.error ? el("span", { class: "bad" }, j.error) : j.detail || "–"))),
    "No job yet.");
}

let lastStates = new Map();

const vmPage = {
  title: (r) => `VM ${r.id}`,
  load: async (r) => {
    const [vm, points, jobs, attachments] = await Promise.all([
      api("GET", `/vms/${enc(r.id)}`),
      api("GET", `/points?vm=${enc(r.id)}`).catch((e) => ({ error: e.message })),
      api("GET", `/jobs?vm=${enc(r.id)}&limit=10`),
      api("GET", "/attachments"),
    ]);
    return { vm, points, jobs, attachments: attachments.filter((a) => a.vm === r.id) };
  },
  controls: (r) => {
    const vm = r.id;
    const mk = (id, label, cls, handler) => {
      const b = el("button", { type: "button", id, class: cls }, label);
      b.addEventListener("click", () => handler(b));
      return b;
    };
    return el("section", { "aria-labelledby": "actions-title" },
      el("h2", { id: "actions-title" }, "Actions"),
      el("div", { class: "actions" },
        mk("resync", "Resync", null, (b) => act(b, "Resync", async () => {
          const x = await api("POST", `/vms/${enc(vm)}/resync`, {});
          return `VM ${x.vm}: resync requested (${x.state}).`;
        })),
        mk("resync-full", "Full resync…", null, async (b) => {
          if (!(await confirmAction("Full resync", `Read and hash every chunk of every disk of VM ${vm}? This reads the whole disks and may take long.`, "Start full resync"))) return;
          act(b, "Full resync", async () => {
            const x = await api("POST", `/vms/${enc(vm)}/resync`, { full: true });
            return `VM ${x.vm}: full resync requested (${x.state}).`;
          });
        }),
        mk("resume", "Resume", null, (b) => act(b, "Resume", async () => {
          const x = await api("POST", `/vms/${enc(vm)}/resume`);
          return x.outcome === "resumed" ? `VM ${x.vm} resumed.` : `VM ${x.vm}: nothing to resume.`;
        })),
        mk("unprotect", "Unprotect…", "danger", async (b) => {
          if (!(await confirmAction("Unprotect VM", `Stop protecting VM ${vm}? Replication stops; its recovery points stay in the store.`, "Unprotect"))) {
            notice("Unprotect cancelled.");
            return;
          }
          act(b, "Unprotect", async () => {
            const x = await api("POST", `/vms/${enc(vm)}/unprotect`);
            location.hash = "#/vms";
            return `VM ${x.vm} is no longer protected.`;
          });
        })),
      el("h3", { id: "failover-title" }, "Test failover"),
      el("div", { class: "actions", role: "group", "aria-labelledby": "failover-title" },
        mk("test-failover", "Test failover…", null, async (b) => {
          let command = null;
          try {
            command = (await api("GET", "/policy")).failover_command || null;
          } catch (e) {
            showActionError(`Test failover: ${e.message}`);
            return;
          }
          const boot = el("input", { id: "boot-vm", type: "checkbox", checked: command !== null, disabled: command === null, "aria-describedby": "boot-vm-why" });
          const extra = el("p", {}, el("label", {}, boot, " Boot the VM with the failover command"), " ",
            el("span", { id: "boot-vm-why", class: "muted" }, command === null
              ? "(no failover command is configured: set one with standby policy set --failover-command, or boot a VM from the exports yourself)"
              : ["(", el("code", {}, command), ")"]));
          if (!(await confirmAction("Test failover", `Serve every disk of VM ${vm} from its newest recovery point, through local overlays (exports VM.DISK.test)? Replication continues; the store is only read. Cleaning up stops the VM and discards its writes.`, "Start test failover", extra))) {
            notice("Test failover cancelled.");
            return;
          }
          const launch = boot.checked;
          act(b, "Test failover", async () => {
            const x = await api("POST", `/vms/${enc(vm)}/failover/test`, { launch });
            const booted = x.vm_process ? ` VM launched (pid ${x.vm_process.pid}), output in ${x.vm_process.log}.` : "";
            return `VM ${x.vm}: test failover from point ${x.point} started (job #${x.job}): ${x.exports.map((e) => e[1]).join(", ")}.${booted}`;
          });
        }),
        mk("test-cleanup", "Clean up test failover…", "danger", async (b) => {
          if (!(await confirmAction("Clean up test failover", `Remove the test failover of VM ${vm}? Its exports stop and the writes made to them are discarded.`, "Clean up"))) {
            notice("Cleanup cancelled.");
            return;
          }
          act(b, "Cleanup", async () => {
            const x = await api("POST", `/vms/${enc(vm)}/failover/cleanup`);
            const vms = x.stopped_vms.map((s) => ` VM process ${s.pid} ${s.detail}.`).join("");
            return `VM ${x.vm}: test failover removed (${x.exports.length} exports, job #${x.job}).${vms}`;
          });
        })),
      el("p", { class: "muted" },
        "Failover to the recovery site and its commit: ",
        el("code", {}, `standby failover start ${vm}`), " and ", el("code", {}, `standby failover commit ${vm}`),
        " on the recovery gateway (or POST /api/v1/vms/VM/failover/start, /commit)."));
  },
  render: (r, { vm, points, jobs, attachments }) => {
    const prev = lastStates.get(vm.name);
    if (prev && prev !== vm.state) notice(`VM ${vm.name} is now ${vm.state}.`);
    lastStates.set(vm.name, vm.state);
    return el("div", {},
      facts([
        ["State", el("span", { id: "vm-state" }, badge(vm.state), vm.reason ? ` ${vm.reason}` : null)],
        ["Progress", progress(vm.progress_percent, "protection progress")],
        ["Health", el("span", { id: "vm-health" }, badge(vm.health), vm.health_reasons.length ? ` ${vm.health_reasons.join("; ")}` : null)],
        ["RPO", seconds(vm.rpo_seconds)],
        ["Backlog", bytes(backlog(vm))],
        ["Last recovery point", vm.last_point ? [timeEl(vm.last_point_ms), " ", el("span", { class: "mono" }, vm.last_point)] : "–"],
        ["Last cycle", timeEl(vm.last_cycle_ms)],
        ["Last error", vm.last_error ? el("span", { class: "bad" }, vm.last_error) : "–"],
        ["Failures in a row", String(vm.failures)],
        ["Next retry", timeEl(vm.next_retry_ms)],
      ]),
      el("h2", {}, "Disks"),
      table(`Disks of VM ${vm.name}`, ["Disk", ["Size", "num"], ["Backlog", "num"], "Change log", "Reported"],
        vm.disks.map((d) => el("tr", {},
          el("th", { scope: "row" }, d.name), el("td", { class: "num" }, bytes(d.size_bytes)),
          el("td", { class: "num" }, bytes(d.backlog_bytes)), el("td", {}, badge(d.log_state)),
          el("td", {}, timeEl(d.reported_ms)))), "No disk."),
      el("h2", {}, "Recovery points"),
      points.error ? el("p", { class: "error" }, points.error) : timeline(points),
      el("h2", {}, "Recent jobs"),
      jobsTable(jobs, `Last jobs of VM ${vm.name}`, false),
      testVm(attachments),
      attachments.length ? [el("h2", {}, "Attachments and failovers"), attachmentsTable(attachments)] : null);
  },
};

const jobsPage = {
  title: () => "Jobs",
  load: () => api("GET", "/jobs?limit=50"),
  render: (_r, jobs) => jobsTable(jobs, "The last 50 jobs, newest first, refreshed every 2 seconds", true),
};

/** The live figures of a job that reports them (store verify). */
function jobCounts(c, running) {
  if (!c) return null;
  return [el("h2", {}, running ? "Checked so far" : "Checked"), facts([
    ["Points", `${c.points_read} of ${c.points_total}`],
    ["Chunks", el("span", { id: "job-chunks" }, `${c.chunks_checked} of ${c.chunks_total}`)],
    ["Bytes", `${bytes(c.bytes_checked)} of ${bytes(c.bytes_total)}`],
  ])];
}

/** The outcome of a finished store verification. */
function verifyResult(r) {
  if (!r || typeof r !== "object") return null;
  const problems = (list, what) => list.map((p) => el("tr", {},
    el("td", {}, what), el("td", { class: "mono" }, p.chunk), el("td", {}, p.reason), el("td", {}, p.points.join(", ") || "–")));
  return [el("h2", {}, "Verification result"), facts([
    ["Verdict", el("span", { id: "verify-verdict" }, r.ok ? badge("intact") : badge("damaged"))],
    ["Points checked", String(r.points_checked)],
    ["Chunks checked", `${r.chunks_checked} (${bytes(r.bytes_checked)})`],
    ["Broken points", r.broken_points.length ? el("span", { class: "bad mono" }, r.broken_points.join(", ")) : "none"],
  ]),
  table("Chunks missing or corrupt", ["Problem", "Chunk", "Reason", "Used by"],
    [...problems(r.missing, "missing"), ...problems(r.corrupt, "corrupt")], "No chunk is missing or corrupt."),
  r.bad_objects.length ? table("Objects that cannot be read", ["Object", "Reason"],
    r.bad_objects.map((b) => el("tr", {}, el("td", { class: "mono" }, b.key), el("td", {}, b.reason))), "") : null];
}

const jobPage = {
  title: (r) => `Job #${r.id}`,
  load: (r) => api("GET", `/jobs/${enc(r.id)}`),
  render: (_r, j) => el("div", {},
    facts([
      [j.vm ? "VM" : "Concerns", jobOwner(j)],
      ["Kind", j.kind],
      ["State", el("span", { id: "job-state" }, badge(j.state))],
      ["Progress", progress(j.progress_percent, "job progress")],
      ["Started", timeEl(j.created_ms)],
      ["Finished", timeEl(j.finished_ms)],
      ["Duration", seconds(j.duration_seconds)],
      ["Detail", j.detail || "–"],
      ["Error", j.error ? el("span", { class: "bad" }, j.error) : "–"],
    ]),
    jobCounts(j.counts, j.state === "running"),
    verifyResult(j.result),
    el("h2", {}, "Steps"),
    table(`Steps of job #${j.id}`, [["#", "num"], "Step", "State", "Started", "Finished", "Detail"],
      (j.steps || []).map((s) => el("tr", {},
        el("td", { class: "num" }, String(s.seq)), el("th", { scope: "row" }, s.name), el("td", {}, badge(s.state)),
        el("td", {}, timeEl(s.started_ms)), el("td", {}, timeEl(s.finished_ms)), el("td", {}, s.detail || "–"))),
      "No step recorded."),
    el("p", {}, el("a", { href: "#/jobs" }, "All jobs"))),
};

const disksPage = {
  title: () => "Disks",
  load: () => api("GET", "/disks"),
  render: (_r, disks) => table("Disks of this gateway",
    ["Disk", ["Size", "num"], "VM", "Tracked", "Served", "Access", "Origin", "Image"],
    disks.map((d) => el("tr", { "data-disk": d.name },
      el("th", { scope: "row" }, d.name), el("td", { class: "num" }, bytes(d.size_bytes)),
      el("td", {}, d.vm ? vmLink(d.vm) : "–"), el("td", {}, d.tracked ? "yes" : "no"),
      el("td", {}, d.served ? "yes" : "no"), el("td", {}, d.read_only ? "read-only" : "read-write"),
      el("td", {}, typeof d.origin === "string" ? d.origin : JSON.stringify(d.origin)),
      el("td", { class: "mono" }, d.image))),
    "No disk: create one with standby disk create."),
};

/** The VM a test failover launched: pid, running or how it exited, its log. */
function testVm(attachments) {
  const p = attachments.map((a) => a.vm_process).find((x) => x);
  if (!p) return null;
  return [el("h2", {}, "Test failover VM"),
    facts([
      ["Process", el("span", { id: "test-vm-pid", class: "mono" }, `pid ${p.pid}`)],
      ["State", el("span", { id: "test-vm-state" }, badge(p.state), p.exit ? ` ${p.exit}` : null)],
      ["Output", el("span", { class: "mono" }, p.log)],
    ])];
}

function attachmentsTable(list) {
  return table("Recovery points served as exports", ["Export", "VM", "Disk", "Point", "Kind", "State", "Hydrated", "Error"],
    list.map((a) => el("tr", {},
      el("th", { scope: "row" }, a.export), el("td", {}, vmLink(a.vm)), el("td", {}, a.disk),
      el("td", { class: "mono" }, a.point), el("td", {}, a.kind), el("td", {}, badge(a.state)),
      el("td", {}, progress(a.hydrated_percent, `${a.export} hydrated`)), el("td", {}, a.error || "–"))),
    "No recovery point is attached or failed over.");
}

const storePage = {
  title: () => "Replica store",
  load: async () => {
    const [store, policy, attachments, jobs] = await Promise.all([
      api("GET", "/store").catch((e) => ({ error: e.message })),
      api("GET", "/policy"),
      api("GET", "/attachments"),
      api("GET", "/jobs?limit=100"),
    ]);
    return { store, policy, attachments, verifies: jobs.filter((j) => j.kind === "store-verify").slice(0, 5) };
  },
  controls: () => {
    const b = el("button", { type: "button", id: "verify-store", "aria-describedby": "verify-help" }, "Verify store");
    b.addEventListener("click", () => act(b, "Verify store", async () => {
      const x = await api("POST", "/store/verify", {});
      location.hash = `#/jobs/${x.job}`;
      return `Store verification started (job #${x.job}).`;
    }));
    return el("section", { "aria-labelledby": "store-actions-title" },
      el("h2", { id: "store-actions-title" }, "Actions"),
      el("div", { class: "actions" }, b),
      el("p", { id: "verify-help", class: "muted" },
        "Verify store reads and re-hashes every chunk of every recovery point (read-only, but it reads the whole store: on a remote store that is all its bytes). It runs as a job; one at a time."));
  },
  render: (_r, { store, policy, attachments, verifies }) => el("div", {},
    store.error ? el("p", { class: "error" }, store.error) : facts([
      ["Location", el("span", { class: "mono" }, store.location)],
      ["Store id", el("span", { class: "mono" }, store.store_id)],
      ["Format", String(store.format_version)],
      ["Chunk size", bytes(store.chunk_size_bytes)],
      ["Compression", String(store.compression)],
      ["Encrypted", store.encrypted ? "yes" : "no"],
      ["Chunks", `${store.chunks} (${bytes(store.chunk_bytes)})`],
      ["Recovery points", String(store.points)],
    ]),
    store.vms ? table("Recovery points per VM", ["VM", ["Points", "num"]],
      Object.entries(store.vms).map(([vm, n]) => el("tr", {}, el("th", { scope: "row" }, vm), el("td", { class: "num" }, String(n)))),
      "No VM has points in the store.") : null,
    el("h2", {}, "Verifications"),
    jobsTable(verifies, "The last store verifications", false),
    el("h2", {}, "Replication policy"),
    facts(Object.entries(policy).map(([k, v]) => [k.replaceAll("_", " "), v === null ? "–" : String(v)])),
    el("h2", {}, "Attachments and failovers"),
    attachmentsTable(attachments)),
};

// ---- Routing and polling -------------------------------------------------------------------

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const [page, id] = parts;
  if (page === "vms" && id) return { page: "vm", nav: "vms", id, key: location.hash };
  if (page === "jobs" && id) return { page: "job", nav: "jobs", id, key: location.hash };
  if (["jobs", "disks", "store"].includes(page)) return { page, nav: page, key: location.hash };
  return { page: "vms", nav: "vms", key: "#/vms" };
}

const PAGES = { vms: vmsPage, vm: vmPage, jobs: jobsPage, job: jobPage, disks: disksPage, store: storePage };

let shownKey = null;
let rebuildControls = false;
let timer = null;
let generation = 0;

async function refresh() {
  clearTimeout(timer);
  const gen = ++generation;
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  const r = route();
  const page = PAGES[r.page];
  try {
    const data = await page.load(r);
    if (gen !== generation) return;
    const view = $("view");
    const fresh = shownKey !== r.key;
    if (fresh || rebuildControls) {
      const h1 = el("h1", { id: "page-title", tabindex: "-1" }, page.title(r));
      view.replaceChildren(h1, page.controls ? page.controls(r, data) : "", el("div", { id: "live" }));
      for (const a of document.querySelectorAll("#nav a")) {
        if (a.dataset.page === r.nav) a.setAttribute("aria-current", "page");
        else a.removeAttribute("aria-current");
      }
      document.title = `${page.title(r)} – Standby`;
      if (fresh && shownKey !== null) h1.focus();
      shownKey = r.key;
      rebuildControls = false;
    }
    const live = $("live");
    const focusKey = live.contains(document.activeElement) ? document.activeElement.dataset.key : null;
    live.replaceChildren(page.render(r, data));
    if (focusKey) live.querySelector(`[data-key="${CSS.escape(focusKey)}"]`)?.focus();
    showError("");
    $("updated").textContent = `Updated ${when(Date.now()).slice(11)}`;
  } catch (e) {
    if (gen !== generation) return;
    if (e.status === 401) {
      signOut(e.message);
      return;
    }
    if (shownKey !== r.key) {
      $("view").replaceChildren(el("h1", { id: "page-title", tabindex: "-1" }, page.title(r)));
      shownKey = r.key;
    }
    showError(e.message);
  }
  if (gen === generation) timer = setTimeout(refresh, POLL_MS);
}

// ---- Sign in and out -----------------------------------------------------------------------

function showApp(on) {
  $("login").hidden = on;
  $("app").hidden = !on;
  $("nav").hidden = !on;
  $("logout").hidden = !on;
  if (!on) $("updated").textContent = "";
}

function signOut(message) {
  clearTimeout(timer);
  generation += 1;
  sessionStorage.removeItem(TOKEN_KEY);
  shownKey = null;
  lastStates = new Map();
  $("view").replaceChildren();
  showError("");
  showActionError("");
  showApp(false);
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function signIn(ev) {
  ev.preventDefault();
  const input = $("token");
  const button = $("login-button");
  const token = input.value.trim();
  $("login-error").textContent = "";
  button.disabled = true;
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("GET", "/vms");
    input.value = "";
    showApp(true);
    if (!location.hash) location.hash = "#/vms";
    await refresh();
    $("page-title")?.focus();
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("login-error").textContent = e.message;
    input.focus();
  } finally {
    button.disabled = false;
  }
}

function start() {
  $("login-form").addEventListener("submit", signIn);
  $("logout").addEventListener("click", () => signOut("Signed out."));
  window.addEventListener("hashchange", () => {
    showError("");
    showActionError("");
    refresh();
  });
  if (sessionStorage.getItem(TOKEN_KEY)) {
    showApp(true);
    refresh();
  } else {
    showApp(false);
    $("token").focus();
  }
}

start();
