// The inpaint-fleet page: paint a mask over an image, submit a job to the /v1 API, watch it run, look at the results.
// Plain JavaScript, no build step, no dependencies. Everything goes through the HTTP API of DESIGN §8 with the key
// the user typed in (kept in sessionStorage: gone when the browser session ends).
"use strict";

const KEY_STORAGE = "inpaint.apiKey";
// Images up to this size travel inline as data URIs; larger ones go to S3 through POST /v1/uploads first.
const INLINE_MAX_BYTES = 4 * 1024 * 1024;
const UNDO_DEPTH = 30;
const MASK_PAINT = "rgb(255, 48, 96)";        // how the mask shows over the image; it is sent as white on black
const QUEUE_POLL_MS = 1500;                   // queue_position is only in the job object, not in the events
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 5000];
const JOBS_PAGE = 12;
const KEPT_INPUTS = 50;                       // jobs whose inputs this browser remembers (IndexedDB)
const FINAL_STATES = new Set(["succeeded", "failed", "canceled"]);
// A running job's phase (its events' `phase`), in words.
const PHASE_LABELS = { fetching: "fetching inputs", encoding: "encoding", denoising: "denoising", decoding: "decoding",
                       uploading: "uploading" };

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------------------------
// Errors shown in words, where they happen

class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function showError(element, message) {
  element.textContent = message;
  element.hidden = false;
}

function clearError(element) {
  element.textContent = "";
  element.hidden = true;
}

function clearAllErrors() {
  for (const id of ["key-error", "image-error", "form-error", "job-error"]) clearError($(id));
}

// An API error goes next to what caused it: the key field, the image, or the form (`fallback`).
function reportError(error, fallback) {
  if (!(error instanceof ApiError)) {
    showError(fallback, `Something went wrong in the page: ${error.message}`);
    console.error(error);
    return;
  }
  if (error.status === 401) {
    showError($("key-error"), error.code === "no_key" ? "Enter your API key first." : `The API key was refused: ${error.message}`);
    $("api-key").focus();
  } else if (error.status === 413) {
    showError($("image-error"), `The image is too large for the API: ${error.message}`);
  } else if (error.status === 429) {
    const wait = error.retryAfter ? ` Try again in ${error.retryAfter} s.` : "";
    showError(fallback, `Too many requests: ${error.message}.${wait}`);
  } else if (["limit_exceeded", "invalid_input"].includes(error.code) && /\b(image|mask|pixels?)\b/i.test(error.message)) {
    showError($("image-error"), `${error.message} (${error.code})`);
  } else {
    showError(fallback, `${error.message} (${error.code})`);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The API

function apiKey() {
  return $("api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  if (!key) throw new ApiError(401, "no_key", "no API key");
  return { Authorization: `Bearer ${key}` };
}

async function api(method, path, body = undefined, headers = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, "network", `the API did not answer (${error.message})`);
  }
  return readAnswer(response);
}

async function readAnswer(response) {
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const error = (payload && payload.error) || {};
    throw new ApiError(response.status, error.code || `http_${response.status}`,
      error.message || `the API answered HTTP ${response.status}`, response.headers.get("Retry-After"));
  }
  return payload;
}

function randomHex(bytes) {
  // crypto.randomUUID needs a secure context; getRandomValues works on plain http too.
  return Array.from(crypto.getRandomValues(new Uint8Array(bytes)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// Server-sent events over fetch(): EventSource cannot send the Authorization header.
// Yields {id, data} for each event; comment lines (keep-alives) are skipped.
async function* readServerSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A chunk may end between the \r and \n of one line break: keep a trailing \r for the next chunk.
    const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(cut);
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { id: event.id, data: event.data.join("\n") };
        event = { id: null, data: [] };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") event.data.push(value);
      else if (field === "id") event.id = value;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The key

function setUpKey() {
  const field = $("api-key");
  field.value = sessionStorage.getItem(KEY_STORAGE) || "";
  field.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, apiKey());
    clearError($("key-error"));
    loadJobs();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    field.dispatchEvent(new Event("change"));
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    field.value = "";
    $("job-list").replaceChildren();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The input image: file input, drag and drop, paste, a result ("use as input") or a reopened job

// {src: an object URL of `file`, file: the image's File, width, height}
let input = null;

function loadImageElement(src) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("the browser could not decode it"));
    image.src = src;
  });
}

async function useFile(file, maskImage = null) {
  clearError($("image-error"));
  if (!file.type.startsWith("image/")) {
    showError($("image-error"), `That file is not an image (${file.type || "unknown type"}): choose a PNG, JPEG or WebP.`);
    return;
  }
  const src = URL.createObjectURL(file);
  try {
    const image = await loadImageElement(src);
    setInput({ src, file, width: image.naturalWidth, height: image.naturalHeight }, maskImage);
  } catch (error) {
    showError($("image-error"), `That image cannot be opened: ${error.message}.`);
  }
}

function setInput(newInput, maskImage) {
  input = newInput;
  const source = $("source");
  source.src = input.src;
  source.hidden = false;
  $("stage").classList.remove("empty");
  mask.reset(input.width, input.height, maskImage);
  $("tools").disabled = false;
  fitStage();
}

// The image shown as large as the editor allows (small images scaled up, so they can be painted on).
function fitStage() {
  if (!input) return;
  const room = document.querySelector(".editor").clientWidth - 32;
  const tallest = window.innerHeight * 0.68;
  const width = Math.max(1, Math.min(room, tallest * input.width / input.height));
  $("source").style.width = `${Math.round(width)}px`;
}

function setUpImageInput() {
  $("image").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useFile(file);
  });
  const editor = document.querySelector(".editor");
  editor.addEventListener("dragover", (event) => {
    event.preventDefault();
    editor.classList.add("dragging");
  });
  editor.addEventListener("dragleave", () => editor.classList.remove("dragging"));
  editor.addEventListener("drop", (event) => {
    event.preventDefault();
    editor.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) useFile(file);
  });
  document.addEventListener("paste", (event) => {
    const item = Array.from(event.clipboardData.items).find((entry) => entry.type.startsWith("image/"));
    if (item) {
      event.preventDefault();
      useFile(item.getAsFile());
    }
  });
}

// An image too large to inline goes to S3 first (a presigned PUT); the job then names its s3:// URI.
async function uploadImage(file) {
  const upload = await api("POST", "/v1/uploads", { content_type: file.type });
  let response;
  try {
    response = await fetch(upload.upload_url, { method: upload.method, headers: upload.headers, body: file });
  } catch (error) {
    throw new ApiError(0, "upload_failed", `uploading the image failed (${error.message}); the bucket may not allow this page (CORS)`);
  }
  if (!response.ok) throw new ApiError(response.status, "upload_failed", `uploading the image failed (HTTP ${response.status})`);
  return upload.uri;
}

function readAsDataUri(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The mask: a canvas at the image's own size over the image. Painted pixels are opaque; the job gets white there.

const mask = {
  canvas: null,
  context: null,
  undoStack: [],
  lastPoint: null,

  setUp() {
    this.canvas = $("mask");
    this.context = this.canvas.getContext("2d", { willReadFrequently: true });
    this.canvas.addEventListener("pointerdown", (event) => this.start(event));
    this.canvas.addEventListener("pointermove", (event) => this.move(event));
    for (const type of ["pointerup", "pointercancel"]) this.canvas.addEventListener(type, () => { this.lastPoint = null; });
    this.canvas.addEventListener("pointerleave", () => { $("brush-cursor").hidden = true; });
    $("undo").addEventListener("click", () => this.undo());
    $("clear-mask").addEventListener("click", () => this.change(() => this.context.clearRect(0, 0, this.canvas.width, this.canvas.height)));
    $("invert-mask").addEventListener("click", () => this.change(() => this.invert()));
    $("brush-size").addEventListener("input", (event) => { $("brush-size-value").value = event.target.value; });
  },

  reset(width, height, maskImage) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.canvas.hidden = false;
    this.undoStack = [];
    if (maskImage) this.drawMaskImage(maskImage);
  },

  // A black and white mask image (a reopened job's) back into painted pixels.
  drawMaskImage(maskImage) {
    const { width, height } = this.canvas;
    this.context.drawImage(maskImage, 0, 0, width, height);
    const pixels = this.context.getImageData(0, 0, width, height);
    const [red, green, blue] = MASK_PAINT.match(/\d+/g).map(Number);
    for (let i = 0; i < pixels.data.length; i += 4) {
      pixels.data[i + 3] = pixels.data[i];   // white (repaint) becomes opaque
      pixels.data[i] = red;
      pixels.data[i + 1] = green;
      pixels.data[i + 2] = blue;
    }
    this.context.putImageData(pixels, 0, 0);
  },

  // Pointer position in the canvas's own pixels (the canvas is shown scaled).
  point(event) {
    const box = this.canvas.getBoundingClientRect();
    return { x: (event.clientX - box.left) * this.canvas.width / box.width,
             y: (event.clientY - box.top) * this.canvas.height / box.height,
             scale: this.canvas.width / box.width };
  },

  start(event) {
    if (event.button !== 0) return;
    this.canvas.setPointerCapture(event.pointerId);
    this.snapshot();
    this.lastPoint = this.point(event);
    this.stroke(this.lastPoint, this.lastPoint);
  },

  move(event) {
    this.showCursor(event);
    if (!this.lastPoint) return;
    const point = this.point(event);
    this.stroke(this.lastPoint, point);
    this.lastPoint = point;
  },

  stroke(from, to) {
    const context = this.context;
    const erasing = document.querySelector('input[name="tool"]:checked').value === "eraser";
    context.globalCompositeOperation = erasing ? "destination-out" : "source-over";
    context.strokeStyle = MASK_PAINT;
    context.lineWidth = Number($("brush-size").value) * to.scale;
    context.lineCap = "round";
    context.lineJoin = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
    context.globalCompositeOperation = "source-over";
  },

  showCursor(event) {
    const cursor = $("brush-cursor");
    const box = this.canvas.getBoundingClientRect();
    const stage = $("stage").getBoundingClientRect();
    const size = Number($("brush-size").value);
    cursor.style.width = cursor.style.height = `${size}px`;
    cursor.style.left = `${event.clientX - stage.left - size / 2}px`;
    cursor.style.top = `${event.clientY - stage.top - size / 2}px`;
    cursor.hidden = !(event.clientX >= box.left && event.clientX <= box.right);
  },

  snapshot() {
    this.undoStack.push(this.context.getImageData(0, 0, this.canvas.width, this.canvas.height));
    if (this.undoStack.length > UNDO_DEPTH) this.undoStack.shift();
  },

  change(action) {
    if (!input) return;
    this.snapshot();
    action();
  },

  undo() {
    const previous = this.undoStack.pop();
    if (previous) this.context.putImageData(previous, 0, 0);
  },

  invert() {
    const painted = document.createElement("canvas");
    painted.width = this.canvas.width;
    painted.height = this.canvas.height;
    painted.getContext("2d").drawImage(this.canvas, 0, 0);
    this.context.fillStyle = MASK_PAINT;
    this.context.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.context.globalCompositeOperation = "destination-out";
    this.context.drawImage(painted, 0, 0);
    this.context.globalCompositeOperation = "source-over";
  },

  isEmpty() {
    const { data } = this.context.getImageData(0, 0, this.canvas.width, this.canvas.height);
    for (let i = 3; i < data.length; i += 4) if (data[i] !== 0) return false;
    return true;
  },

  // White where painted (its coverage, so soft edges stay soft), black elsewhere, as a PNG data URI.
  toDataUri() {
    return this.blackAndWhite().toDataURL("image/png");
  },

  toBlob() {
    return new Promise((resolve) => this.blackAndWhite().toBlob(resolve, "image/png"));
  },

  blackAndWhite() {
    const out = document.createElement("canvas");
    out.width = this.canvas.width;
    out.height = this.canvas.height;
    const context = out.getContext("2d");
    context.drawImage(this.canvas, 0, 0);
    context.globalCompositeOperation = "source-in";
    context.fillStyle = "#fff";
    context.fillRect(0, 0, out.width, out.height);
    context.globalCompositeOperation = "destination-over";
    context.fillStyle = "#000";
    context.fillRect(0, 0, out.width, out.height);
    return out;
  },
};

// ---------------------------------------------------------------------------------------------------------------
// Submitting a job

// The form's job fields: [element id, job field, label (named in errors), kind].
const JOB_FIELDS = [
  ["prompt", "prompt", "Prompt", "text"],
  ["negative-prompt", "negative_prompt", "Negative prompt", "text"],
  ["steps", "num_inference_steps", "Steps", "integer"],
  ["seed", "seed", "Seed", "optional integer"],
  ["scheduler", "scheduler", "Scheduler", "choice"],
  ["guidance", "guidance_scale", "Guidance", "number"],
  ["strength", "strength", "Strength", "number"],
  ["mask-blur", "mask_blur", "Mask blur", "integer"],
  ["num-images", "num_images", "Images", "integer"],
  ["keep-unmasked", "keep_unmasked", "Keep unmasked", "flag"],
];

function jobParameters() {
  return Object.fromEntries(JOB_FIELDS.map(([id, name, label, kind]) => [name, readField($(id), label, kind)]));
}

function readField(element, label, kind) {
  if (kind === "flag") return element.checked;
  if (kind === "text") return element.value;
  if (kind === "choice") return element.value || null;
  const text = element.value.trim();
  if (text === "" && kind === "optional integer") return null;
  const value = Number(text);
  const integer = kind !== "number";
  if (text === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value))) {
    throw new ApiError(422, "invalid_input", `${label} must be ${integer ? "a whole number" : "a number"}`);
  }
  return value;
}

function setParameters(parameters) {
  for (const [id, name, , kind] of JOB_FIELDS) {
    if (!(name in parameters)) continue;
    if (kind === "flag") $(id).checked = Boolean(parameters[name]);
    else $(id).value = parameters[name] ?? "";
  }
}

async function submitJob(event) {
  event.preventDefault();
  clearAllErrors();
  if (!input) {
    showError($("image-error"), "Choose an image first (file, drop or paste).");
    return;
  }
  if (mask.isEmpty()) {
    showError($("image-error"), "Paint the mask first: the painted area is what gets repainted.");
    return;
  }
  setBusy(true);
  try {
    const parameters = jobParameters();
    const job = await sendJob(parameters);
    watchJob(job, input.src);
    inputMemory.remember(job.id, { image: input.file, mask: await mask.toBlob(), parameters });
  } catch (error) {
    reportError(error, $("form-error"));
    setBusy(false);
  }
}

async function sendJob(parameters) {
  const file = input.file;
  const maskUri = mask.toDataUri();
  const submit = async (image) => {
    const body = { ...parameters, image, mask: maskUri };
    const headers = { "Idempotency-Key": randomHex(16) };
    try {
      return await api("POST", "/v1/jobs", body, headers);
    } catch (error) {
      // The answer was lost: the same request again returns the job it made, if it made one, never a second one.
      if (error instanceof ApiError && error.status === 0) return api("POST", "/v1/jobs", body, headers);
      throw error;
    }
  };
  if (file.size > INLINE_MAX_BYTES) return submit(await uploadImage(file));
  try {
    return await submit(await readAsDataUri(file));
  } catch (error) {
    // The API's body limit is its own setting: an inline image over it is uploaded instead.
    if (error instanceof ApiError && error.status === 413) return submit(await uploadImage(file));
    throw error;
  }
}

function setBusy(busy) {
  $("inpaint").disabled = busy;
  $("cancel").hidden = !busy;
  $("cancel").disabled = false;
}

// ---------------------------------------------------------------------------------------------------------------
// Watching a job: its events over SSE (resumed with Last-Event-ID when the connection drops), its queue position
// from the job object while it waits.

let current = null;   // the job being watched: {id, beforeSrc, abort, lastEventId, timing, ...}

// What the page knows of a job it follows, from its job object and then its events.
function newRun(job, beforeSrc) {
  return { id: job.id, beforeSrc, abort: new AbortController(), lastEventId: null, state: job.state,
           step: job.step, total: job.total_steps, phase: null, queuePosition: job.queue_position,
           startedTs: null, clockOffset: 0, firstStep: null, lastStep: null, retryMessage: null, canceling: false,
           reconnecting: false };
}

function watchJob(job, beforeSrc) {
  if (current) current.abort.abort();
  current = newRun(job, beforeSrc);
  const run = current;
  $("results").hidden = true;
  $("progress").hidden = false;
  clearError($("job-error"));
  setBusy(true);
  renderProgress(run);
  const ticker = setInterval(() => renderProgress(run), 500);
  const poller = setInterval(() => pollQueuePosition(run), QUEUE_POLL_MS);
  followEvents(run)
    .then(() => finishJob(run))
    .catch((error) => { if (!run.abort.signal.aborted) reportError(error, $("job-error")); })
    .finally(() => {
      clearInterval(ticker);
      clearInterval(poller);
      if (current === run) setBusy(false);
    });
}

async function followEvents(run) {
  let failures = 0;
  while (!FINAL_STATES.has(run.state)) {
    try {
      await readEventStream(run);
      failures = 0;
    } catch (error) {
      if (run.abort.signal.aborted || (error instanceof ApiError && error.status >= 400 && error.status < 500)) throw error;
      failures += 1;
    }
    if (FINAL_STATES.has(run.state)) return;
    // The stream broke (or ended early): say so, wait, and resume after the last event seen.
    run.reconnecting = true;
    renderProgress(run);
    const delay = RECONNECT_DELAYS_MS[Math.min(failures, RECONNECT_DELAYS_MS.length - 1)];
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

async function readEventStream(run) {
  const headers = { ...authHeaders(), Accept: "text/event-stream" };
  if (run.lastEventId) headers["Last-Event-ID"] = run.lastEventId;
  const response = await fetch(`/v1/jobs/${run.id}/events`, { headers, signal: run.abort.signal });
  if (!response.ok) await readAnswer(response);   // throws the API's error
  run.reconnecting = false;
  for await (const message of readServerSentEvents(response)) {
    if (message.id) run.lastEventId = message.id;
    applyEvent(run, JSON.parse(message.data));
    if (FINAL_STATES.has(run.state)) return;
  }
}

function applyEvent(run, event) {
  const now = Date.now() / 1000;
  run.clockOffset = now - event.ts;   // server clock to browser clock (and the stream's delay)
  run.state = event.state;
  run.step = event.step;
  run.total = event.total_steps;
  run.phase = event.phase || null;
  if (event.type === "retry") run.retryMessage = (event.data && event.data.error && event.data.error.message) || "a transient error";
  if (event.state === "running" && event.type === "state") {   // a start, or a restart after a retry
    run.startedTs = event.ts;
    run.firstStep = run.lastStep = run.retryMessage = null;
  }
  if (event.type === "progress" && event.step > 0) {
    if (!run.firstStep) run.firstStep = { step: event.step, ts: event.ts };
    run.lastStep = { step: event.step, ts: event.ts };
  }
  renderProgress(run);
}

async function pollQueuePosition(run) {
  if (run.state !== "queued" || run.abort.signal.aborted) return;
  try {
    const job = await api("GET", `/v1/jobs/${run.id}`);
    if (run.state === "queued") {
      run.queuePosition = job.queue_position;
      renderProgress(run);
    }
  } catch {
    // the event stream reports lasting trouble; a missed position is shown at the next poll
  }
}

function phaseOf(run) {
  if (run.phase) return PHASE_LABELS[run.phase] || run.phase;
  // Events from workers that do not report a phase: what the step says.
  if (run.step === 0) return "starting";
  return run.step >= run.total ? "decoding and uploading" : "denoising";
}

function formatSeconds(seconds) {
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function renderProgress(run) {
  const bar = $("progress-bar");
  const text = $("progress-text");
  let words;
  if (run.state === "queued") {
    const ahead = run.queuePosition;   // jobs the queue serves before this one
    words = ahead == null ? "Queued" : `Queued: position ${ahead + 1} in the queue (${ahead} ahead)`;
    bar.removeAttribute("value");
  } else if (run.state === "running") {
    const now = Date.now() / 1000 - run.clockOffset;
    const elapsed = run.startedTs ? `, ${formatSeconds(Math.max(0, now - run.startedTs))} elapsed` : "";
    const step = run.total ? `, step ${run.step}/${run.total}` : "";
    words = `Running: ${phaseOf(run)}${step}${elapsed}${phaseOf(run) === "denoising" ? etaText(run) : ""}`;
    bar.value = run.total ? run.step / run.total : 0;
    if (run.retryMessage) words += ` (retrying after ${run.retryMessage})`;
  } else {
    words = { succeeded: "Done", failed: "Failed", canceled: "Canceled" }[run.state] || run.state;
    bar.value = run.state === "succeeded" ? 1 : bar.value;
  }
  if (run.canceling && !FINAL_STATES.has(run.state)) words += " (canceling...)";
  if (run.reconnecting) words += " (connection lost, reconnecting...)";
  text.textContent = words;
}

function etaText(run) {
  const { firstStep, lastStep } = run;
  if (!firstStep || !lastStep || lastStep.step <= firstStep.step) return ", ETA ...";
  const perStep = (lastStep.ts - firstStep.ts) / (lastStep.step - firstStep.step);
  return `, ETA ${formatSeconds(perStep * Math.max(0, run.total - run.step))}`;
}

async function cancelJob() {
  const run = current;
  if (!run) return;
  $("cancel").disabled = true;
  try {
    await api("POST", `/v1/jobs/${run.id}/cancel`);
    run.canceling = true;
    renderProgress(run);
  } catch (error) {
    $("cancel").disabled = false;
    reportError(error, $("job-error"));
  }
}

async function finishJob(run) {
  const job = await api("GET", `/v1/jobs/${run.id}`);
  run.state = job.state;
  renderProgress(run);
  showJobOutcome(job, run.beforeSrc);
  loadJobs();
}

function showJobOutcome(job, beforeSrc) {
  if (job.state === "failed") {
    const error = job.error || {};
    const words = `The job failed (${error.code || "unknown"}): ${error.message || "no message"}`;
    showError($("job-error"), words);
    // A worker's verdict on the inputs (over a limit, undecodable) belongs next to the image as well.
    if (/^(image|mask)\b/.test(error.message || "")) showError($("image-error"), words);
  } else if (job.state === "canceled") {
    showError($("job-error"), "The job was canceled.");
  }
  showResults(job, beforeSrc);
}

// ---------------------------------------------------------------------------------------------------------------
// Results: the images, a before/after comparison, download, and "use as input"

function showResults(job, beforeSrc) {
  const images = (job.result && job.result.images) || [];
  const list = $("result-list");
  list.replaceChildren(...images.map((image, index) => resultFigure(job, image, index, beforeSrc)));
  $("results").hidden = images.length === 0;
  if (images.length) compare(beforeSrc, images[0].url);
}

function resultFigure(job, image, index, beforeSrc) {
  const number = index + 1;
  const extension = image.uri.split(".").pop();   // s3://bucket/jobs/<id>/<i>.png (or the job's output format)
  const figure = document.createElement("figure");
  const picture = document.createElement("img");
  picture.src = image.url;
  picture.alt = `Result ${number}`;
  const caption = document.createElement("figcaption");
  caption.textContent = `seed ${image.seed} · ${image.width}×${image.height}`;
  const actions = document.createElement("div");
  actions.className = "result-actions";
  actions.append(
    button("Compare", `Compare result ${number} with the input`, () => compare(beforeSrc, image.url)),
    downloadLink(image.url, `inpaint-${job.id.slice(0, 8)}-${number}.${extension}`, `Download result ${number}`),
    button("Use as input", `Use result ${number} as input`, () => useResult(image, `result-${number}.${extension}`)),
  );
  figure.append(picture, caption, actions);
  return figure;
}

function button(text, label, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.setAttribute("aria-label", label);
  element.addEventListener("click", onClick);
  return element;
}

// A presigned URL is on the S3 endpoint, another origin, where the download attribute is ignored: fetch it into a
// local blob first, and open it in a new tab if the bucket does not allow that (CORS).
function downloadLink(url, filename, label) {
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  link.textContent = "Download";
  link.setAttribute("aria-label", label);
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    try {
      const response = await fetch(url);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const local = URL.createObjectURL(await response.blob());
      const save = document.createElement("a");
      save.href = local;
      save.download = filename;
      save.click();
      setTimeout(() => URL.revokeObjectURL(local), 60000);
    } catch {
      window.open(url, "_blank", "noopener");
    }
  });
  return link;
}

function compare(beforeSrc, afterSrc) {
  if (!beforeSrc) {
    $("compare").hidden = true;
    return;
  }
  $("compare-before").src = beforeSrc;
  $("compare-after").src = afterSrc;
  $("compare").hidden = false;
  setComparePosition();
}

function setComparePosition() {
  const percent = Number($("compare-position").value);
  // The result covers the input from the left up to the slider.
  $("compare-after").style.clipPath = `inset(0 ${100 - percent}% 0 0)`;
}

// Inpaint again on a result: its image becomes the input (fetched from S3: the bucket must allow this origin).
async function useResult(image, name) {
  clearAllErrors();
  try {
    await useFile(await fetchAsFile(image.url, name));
    $("stage").scrollIntoView({ behavior: "smooth", block: "start" });
  } catch (error) {
    showError($("image-error"), `The result cannot be used as input: ${error.message}.`);
  }
}

async function fetchAsFile(url, name) {
  let response;
  try {
    response = await fetch(url);
  } catch (error) {
    throw new Error(`the image's storage did not answer (${error.message}); it may not allow this page (CORS)`);
  }
  if (!response.ok) throw new Error(`fetching it answered HTTP ${response.status}`);
  const blob = await response.blob();
  // Storage may label it generically; the file name says what the worker wrote.
  const type = blob.type.startsWith("image/") ? blob.type : `image/${name.split(".").pop()}`;
  return new File([blob], name, { type });
}

// The key's recent jobs (GET /v1/jobs), each reopening its results, and its inputs when this browser sent it

let nextCursor = null;

async function loadJobs(more = false) {
  const list = $("job-list");
  clearError($("jobs-error"));
  if (!apiKey()) {
    list.replaceChildren();
    return;
  }
  const query = new URLSearchParams({ limit: String(JOBS_PAGE) });
  if (more && nextCursor) query.set("cursor", nextCursor);
  try {
    const page = await api("GET", `/v1/jobs?${query}`);
    const items = page.jobs.map(jobListItem);
    if (more) list.append(...items);
    else list.replaceChildren(...items);
    nextCursor = page.next_cursor;
    $("more-jobs").hidden = !nextCursor;
  } catch (error) {
    reportError(error, $("jobs-error"));
  }
}

function jobListItem(job) {
  const item = document.createElement("li");
  const first = job.result && job.result.images && job.result.images[0];
  if (first) {
    const thumbnail = document.createElement("img");
    thumbnail.src = first.url;
    thumbnail.alt = "";
    item.append(thumbnail);
  }
  const words = document.createElement("span");
  const created = job.created_at ? new Date(job.created_at).toLocaleString() : "";
  words.textContent = `${job.state} · ${created} · ${job.total_steps || ""} steps · ${job.id.slice(0, 8)}`;
  item.append(words, button("Open", `Open job ${job.id}`, () => openJob(job.id)));
  return item;
}

async function openJob(id) {
  clearAllErrors();
  $("jobs-note").hidden = true;
  try {
    const job = await api("GET", `/v1/jobs/${id}`);
    const beforeSrc = await reopenInputs(job.id);
    if (FINAL_STATES.has(job.state)) {
      if (current) current.abort.abort();
      current = null;
      setBusy(false);
      $("progress").hidden = true;
      showJobOutcome(job, beforeSrc);
    } else {
      watchJob(job, beforeSrc);
    }
    $("results").scrollIntoView({ behavior: "smooth", block: "nearest" });
  } catch (error) {
    reportError(error, $("jobs-error"));
  }
}

// The job's image, mask and parameters back into the editor; returns what the comparison shows as "before".
async function reopenInputs(jobId) {
  const kept = await inputMemory.recall(jobId);
  if (!kept) {
    $("jobs-note").textContent = "This job was not sent from this browser: its results are shown, its inputs are not.";
    $("jobs-note").hidden = false;
    return null;
  }
  setParameters(kept.parameters);
  await useFile(kept.image, await createImageBitmap(kept.mask));
  return input.src;
}

// The inputs of the jobs sent from this browser, by job id, in IndexedDB (the job object carries no inputs).
const inputMemory = {
  database: null,

  open() {
    this.database ||= new Promise((resolve, reject) => {
      const request = indexedDB.open("inpaint-fleet", 1);
      request.onupgradeneeded = () => {
        request.result.createObjectStore("inputs", { keyPath: "jobId" }).createIndex("savedAt", "savedAt");
      };
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
    return this.database;
  },

  // Runs `work(store)` in one transaction; resolves with the result of the request it returns (if any).
  async transaction(mode, work) {
    const database = await this.open();
    return new Promise((resolve, reject) => {
      const transaction = database.transaction("inputs", mode);
      const request = work(transaction.objectStore("inputs"));
      transaction.oncomplete = () => resolve(request ? request.result : undefined);
      transaction.onerror = () => reject(transaction.error);
    });
  },

  async remember(jobId, record) {
    try {
      await this.transaction("readwrite", (store) => {
        store.put({ jobId, savedAt: Date.now(), ...record });
        this.forgetOldest(store);
        return null;
      });
    } catch (error) {
      // Without storage (a private window, a full disk) the job still runs; only reopening its inputs is lost.
      console.warn("the job's inputs are not kept in this browser:", error);
    }
  },

  forgetOldest(store) {
    const count = store.count();
    count.onsuccess = () => {
      let extra = count.result - KEPT_INPUTS;
      store.index("savedAt").openCursor().onsuccess = (event) => {
        const cursor = event.target.result;
        if (cursor && extra-- > 0) {
          cursor.delete();
          cursor.continue();
        }
      };
    };
  },

  async recall(jobId) {
    try {
      return await this.transaction("readonly", (store) => store.get(jobId));
    } catch {
      return undefined;
    }
  },
};

// ---------------------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setUpKey();
  setUpImageInput();
  mask.setUp();
  $("job-form").addEventListener("submit", submitJob);
  $("cancel").addEventListener("click", cancelJob);
  $("compare-position").addEventListener("input", setComparePosition);
  $("refresh-jobs").addEventListener("click", () => loadJobs());
  $("more-jobs").addEventListener("click", () => loadJobs(true));
  window.addEventListener("resize", fitStage);
  loadJobs();
});
