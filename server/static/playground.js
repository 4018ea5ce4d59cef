// The relat playground: asks POST /v1/relat (streaming) and shows the answer, the training loss per training
// step, the time per phase and the trace. No build step and no third-party code; the chart is plain SVG.
//
// The knobs are generated from the server's own OpenAPI document (the RelatRequest schema: enums, bounds,
// descriptions), so an option added to the server appears here without touching this file. Until the document
// can be read (a key is needed and not given yet), a few basic knobs stand in.
"use strict";

const METHODS = ["direct", "latent", "relat"];
// Fields the page sets itself, or that make no sense in a form.
const OWN_FIELDS = new Set(["question", "stream", "model", "method"]);
// Shown at once; every other field goes under "More options".
const MAIN_FIELDS = ["steps", "latent_steps", "lr", "max_tokens", "temperature", "agents"];
const KEY_STORE = "relat.apiKey";
const SHIFT_FULL = 2;  // nats of logprob shift at which a token's colour is at its strongest
const NULLABLE = (schema) => ({anyOf: [schema, {type: "null"}], default: null});
// The stand-in schema: the first knobs of the real one.
const FALLBACK = {
  method: NULLABLE({type: "string", enum: METHODS}),
  steps: {...NULLABLE({type: "integer", minimum: 0}), description: "test-time training steps N"},
  latent_steps: {...NULLABLE({type: "integer", minimum: 0}), description: "latent thought length L"},
  lr: {...NULLABLE({type: "number", exclusiveMinimum: 0, maximum: 1}), description: "AdamW learning rate"},
  max_tokens: {...NULLABLE({type: "integer", minimum: 1}), description: "answer length limit in tokens"},
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attributes = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

// -- the API key -------------------------------------------------------------------------------------------------

function apiKey() {
  return $("#api-key").value.trim();
}

function authHeaders() {
  const key = apiKey();
  return key ? {Authorization: `Bearer ${key}`} : {};
}

// An OpenAI-shaped error body's message, or the status line.
async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) {
      return `${response.status}: ${body.error.message}`;
    }
  } catch (_) { /* not JSON: the text itself */ }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

function showFormMessage(text) {
  const message = $("#form-message");
  message.textContent = text || "";
  message.hidden = !text;
}

// -- the form, from the OpenAPI document --------------------------------------------------------------------------

// A field's own schema without the `null` that every optional field allows.
function unwrap(schema) {
  const options = (schema.anyOf || [schema]).filter((option) => option.type !== "null");
  return options.length === 1 ? {...options[0], description: schema.description, default: schema.default}
    : {anyOf: options, description: schema.description, default: schema.default};
}

function resolve(document, schema) {
  if (schema && schema.$ref) return document.components.schemas[schema.$ref.split("/").pop()];
  return schema;
}

function bounds(schema) {
  const low = schema.minimum !== undefined ? `${schema.minimum}` : schema.exclusiveMinimum !== undefined
    ? `>${schema.exclusiveMinimum}` : "";
  const high = schema.maximum !== undefined ? `${schema.maximum}` : schema.exclusiveMaximum !== undefined
    ? `<${schema.exclusiveMaximum}` : "";
  return low || high ? `${low}…${high}` : "";
}

// One knob: a select for enums and booleans, checkboxes for a list of enums, a number input for numbers, a text
// input for anything else (sent as JSON when it parses, else as a string).
function knob(name, schema) {
  const field = unwrap(schema);
  const id = `knob-${name}`;
  let input;
  let kind = "text";
  if (field.enum) {
    kind = "enum";
    input = el("select", {id, name}, el("option", {value: "", text: "default"}),
      ...field.enum.map((value) => el("option", {value, text: value})));
  } else if (field.type === "boolean") {
    kind = "boolean";
    input = el("select", {id, name}, el("option", {value: "", text: "default"}),
      el("option", {value: "true", text: "true"}), el("option", {value: "false", text: "false"}));
  } else if (field.type === "array" && field.items && field.items.enum) {
    kind = "set";
    input = el("span", {id, class: "set", role: "group"},
      ...field.items.enum.map((value) => el("label", {}, el("input", {type: "checkbox", value}), ` ${value}`)));
  } else if (field.type === "integer" || field.type === "number") {
    kind = field.type;
    input = el("input", {id, name, type: "number", inputmode: field.type === "integer" ? "numeric" : "decimal",
      min: field.minimum, max: field.maximum, step: field.type === "integer" ? 1 : "any", placeholder: "default"});
  } else {
    input = el("input", {id, name, type: "text", placeholder: "default", spellcheck: "false"});
  }
  const range = bounds(field);
  const wrapper = el("div", {class: "knob", "data-field": name, "data-kind": kind},
    el("label", {for: id, text: name}), input);
  if (field.description || range) {
    wrapper.append(el("small", {text: [field.description, range && `(${range})`].filter(Boolean).join(" ")}));
  }
  return wrapper;
}

function knobValue(wrapper) {
  const kind = wrapper.dataset.kind;
  if (kind === "set") {
    const checked = [...wrapper.querySelectorAll("input:checked")].map((box) => box.value);
    return checked.length ? checked : undefined;
  }
  const raw = $("input, select", wrapper).value.trim();
  if (raw === "") return undefined;
  if (kind === "boolean") return raw === "true";
  if (kind === "integer" || kind === "number") return Number(raw);
  if (kind === "enum") return raw;
  try {
    return JSON.parse(raw);
  } catch (_) {
    return raw;
  }
}

function knobState() {
  const state = {};
  for (const wrapper of document.querySelectorAll(".knob")) {
    state[wrapper.dataset.field] = wrapper.dataset.kind === "set"
      ? [...wrapper.querySelectorAll("input:checked")].map((box) => box.value) : $("input, select", wrapper).value;
  }
  return state;
}

function restoreKnobs(state) {
  for (const wrapper of document.querySelectorAll(".knob")) {
    const value = state[wrapper.dataset.field];
    if (value === undefined) continue;
    if (wrapper.dataset.kind === "set") {
      for (const box of wrapper.querySelectorAll("input")) box.checked = value.includes(box.value);
    } else {
      $("input, select", wrapper).value = value;
    }
  }
}

function buildForm(properties, source) {
  const state = knobState();
  const main = $("#knobs");
  const more = $("#more-knobs");
  main.replaceChildren();
  more.replaceChildren();
  for (const name of MAIN_FIELDS) {
    if (properties[name]) main.append(knob(name, properties[name]));
  }
  for (const [name, schema] of Object.entries(properties)) {
    if (!OWN_FIELDS.has(name) && !MAIN_FIELDS.includes(name)) more.append(knob(name, schema));
  }
  buildMethods(properties.method ? unwrap(properties.method).enum || METHODS : METHODS);
  main.dataset.source = source;
  restoreKnobs(state);
}

function buildMethods(methods) {
  const picker = $("#method-picker");
  const chosen = $("input[name=method]:checked", picker);
  const selected = chosen ? chosen.value : "relat";
  for (const old of picker.querySelectorAll(".method")) old.remove();
  const compare = $("#compare").parentElement;
  for (const method of methods) {
    picker.insertBefore(el("label", {class: "method"}, el("input", {type: "radio", name: "method", value: method,
      checked: method === selected}), ` ${method}`), compare);
  }
}

async function loadSchema() {
  let response;
  try {
    response = await fetch("openapi.json", {headers: authHeaders()});
  } catch (error) {
    showFormMessage(`Cannot reach the server: ${error.message}`);
    return;
  }
  if (!response.ok) {
    showFormMessage(`Cannot read the server's options (${await errorMessage(response)}); basic options only.`);
    return;
  }
  const document_ = await response.json();
  const schemas = document_.components && document_.components.schemas;
  const request = schemas && resolve(document_, schemas.RelatRequest);
  if (!request) {
    showFormMessage("The server's OpenAPI document has no RelatRequest; basic options only.");
    return;
  }
  showFormMessage("");
  buildForm(request.properties, "openapi");
}

// What the server says of itself: whether it needs a key, and the model it serves.
async function probe() {
  const status = $("#server-status");
  let response;
  try {
    response = await fetch("v1/models", {headers: authHeaders()});
  } catch (error) {
    status.textContent = `server unreachable: ${error.message}`;
    return;
  }
  if (response.status === 401) {
    $("#key-row").hidden = false;
    status.textContent = apiKey() ? "the API key was refused" : "an API key is needed";
    return;
  }
  if (!response.ok) {
    status.textContent = await errorMessage(response);
    if (response.status === 503) setTimeout(probe, 2000);  // loading: ask again
    return;
  }
  const models = await response.json();
  status.textContent = `serving ${models.data.map((model) => model.id).join(", ")}`;
}

async function connect() {
  await probe();
  await loadSchema();
}

// -- a run: one method on the question, streamed -----------------------------------------------------------------

function requestBody(method) {
  const body = {question: $("#question").value, stream: true, method};
  for (const wrapper of document.querySelectorAll(".knob")) {
    const value = knobValue(wrapper);
    if (value !== undefined) body[wrapper.dataset.field] = value;
  }
  if ($("#logprob-shift").checked) Object.assign(body, {logprobs: true, logprob_shift: true});
  return body;
}

// An answer token coloured by its logprob shift, logprob - relat_base_logprob: green where the request (its thought,
// adapter, guidance) made the token likelier than the base model on the plain prompt does, red where it made it
// less likely, the stronger the larger |shift| (full at SHIFT_FULL nats); its title gives both numbers.
function shiftedToken(entry) {
  const span = el("span", {class: "token", text: entry.token});
  const base = entry.relat_base_logprob;
  if (base === undefined || base === null) return span;
  const shift = entry.logprob - base;
  span.dataset.shift = shift.toFixed(4);
  span.title = `${JSON.stringify(entry.token)}: logprob ${entry.logprob.toFixed(3)}, base ${base.toFixed(3)}, `
    + `shift ${shift >= 0 ? "+" : ""}${shift.toFixed(3)}`;
  const strength = Math.min(Math.abs(shift) / SHIFT_FULL, 1) * 0.7;
  const colour = shift >= 0 ? "47, 158, 110" : "180, 35, 24";
  span.style.backgroundColor = `rgba(${colour}, ${strength.toFixed(3)})`;  // CSSOM, which the page's CSP allows
  return span;
}

class Column {
  constructor(method) {
    this.method = method;
    this.losses = [];
    this.steps = 0;
    this.answer = el("div", {class: "answer"});
    this.shiftLegend = el("p", {class: "shift-legend", hidden: true});
    this.message = el("p", {class: "message error", role: "alert", hidden: true});
    this.elapsed = el("span", {class: "elapsed"});
    this.chart = svg("svg", {class: "loss-chart", viewBox: "0 0 320 150", role: "img",
      "aria-label": "training loss per training step"});
    this.chartCaption = el("figcaption", {text: method === "relat" ? "waiting for training…"
      : "no training for this method (unless it is asked of relat)"});
    this.bar = el("div", {class: "bar"});
    this.legend = el("p", {class: "legend"});
    this.agents = el("ol", {class: "agents"});
    this.trace = el("pre");
    this.traceBox = el("details", {class: "trace"}, el("summary", {text: "Trace"}), this.trace);
    this.node = el("article", {class: "column", "data-method": method},
      el("h2", {}, `${method} `, this.elapsed), this.message, this.answer, this.shiftLegend,
      el("figure", {class: "chart"}, this.chart, this.chartCaption),
      el("div", {class: "phases"}, this.bar, this.legend), this.agents, this.traceBox);
  }

  fail(text) {
    this.message.textContent = text;
    this.message.hidden = false;
    this.node.classList.add("failed");
    this.node.dataset.state = "failed";
    if (!this.losses.length) this.chartCaption.hidden = true;  // nothing trained: no "waiting for training"
    this.tick(true);
  }

  // The 200 ms timer may fire between the done event and the stream's end: once the final time is written,
  // later ticks leave it alone.
  tick(final = false) {
    if (this.stopped) return;
    this.stopped = final;
    const seconds = (performance.now() - this.started) / 1000;
    this.elapsed.textContent = final ? `${seconds.toFixed(2)} s` : `${seconds.toFixed(1)} s…`;
  }

  async run(body) {
    this.shift = Boolean(body.logprobs && body.logprob_shift);
    this.node.dataset.state = "running";
    this.node.dataset.tokens = "0";
    this.started = performance.now();
    this.stopped = false;
    this.arrivals = {};
    const timer = setInterval(() => this.tick(), 200);
    try {
      const response = await fetch("v1/relat", {method: "POST", body: JSON.stringify(body),
        headers: {"Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders()}});
      if (!response.ok) {
        this.fail(await errorMessage(response));
        return;
      }
      await this.read(response);
      if (!this.finished) this.fail("The stream ended before the answer was complete.");
    } catch (error) {
      this.fail(`The request failed: ${error.message}`);
    } finally {
      clearInterval(timer);
    }
  }

  // Server-Sent Events from a fetch body (EventSource cannot POST): blocks end with a blank line.
  async read(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), {stream: !done});
      buffer = buffer.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        this.block(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
      if (done) break;
    }
    if (buffer.trim()) this.block(buffer);
  }

  block(text) {
    let name = "message";
    const data = [];
    for (const line of text.split("\n")) {
      if (line.startsWith(":")) continue;  // a comment: keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") name = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let payload;
    try {
      payload = JSON.parse(data.join("\n"));
    } catch (_) {
      this.fail(`An event the page cannot read: ${data.join("\n").slice(0, 200)}`);
      return;
    }
    const at = (performance.now() - this.started) / 1000;
    this.arrivals[name] = this.arrivals[name] || at;  // the first of each kind
    this.arrivals[`last_${name}`] = at;
    const handler = {ttt_step: this.onStep, agent: this.onAgent, token: this.onToken, done: this.onDone,
      error: this.onError}[name];
    if (handler) handler.call(this, payload);
    if (!this.finished) this.drawPhases(phasesFromArrivals(this.arrivals, at), "in the browser, so far");
  }

  onStep(event) {
    this.losses.push(event.loss);
    this.steps = event.steps;
    this.chartCaption.textContent = `step ${event.step}/${event.steps}: loss ${event.loss.toFixed(4)}`;
    drawChart(this.chart, this.losses, this.steps);
  }

  onAgent(turn) {
    const work = turn.kind === "latent" ? `${turn.latent_positions} latent positions`
      : `${turn.completion_tokens} tokens`;
    this.agents.append(el("li", {text: `${turn.role}: ${turn.kind}, ${work}, ${turn.seconds.toFixed(2)} s`}));
  }

  onToken(event) {
    if (event.index) return;  // with n > 1 the first answer streams; all of them show when done
    if (this.shift && event.logprobs) this.answer.append(...event.logprobs.content.map(shiftedToken));
    else this.answer.textContent += event.text;
    this.node.dataset.tokens = String(Number(this.node.dataset.tokens) + 1);
  }

  onDone(result) {
    this.finished = true;
    this.showAnswers(result);
    const trace = result.trace || {};
    const losses = (trace.steps || []).map((step) => step.loss);
    if (losses.length) {
      this.losses = losses;
      this.steps = Math.max(this.steps, losses.length);
      drawChart(this.chart, this.losses, this.steps);
      // The objective the request trained on names the loss (a server before the objectives has none to name).
      this.chartCaption.textContent = `${trace.objective || "reconstruction"} loss `
        + `${trace.recon_loss_before.toFixed(3)} → `
        + `${trace.recon_loss_after.toFixed(3)} over ${losses.length} step${losses.length > 1 ? "s" : ""}`
        + (trace.stopped_early ? " (stopped early)" : "") + (trace.aborted ? ` (aborted: ${trace.aborted})` : "")
        + (trace.cache === "hit" ? "; adapter cache hit: no training ran, these losses were recorded when it was"
          + " trained" : trace.cache === "miss" ? "; adapter cache miss: trained now, and cached" : "");
    } else if (trace.gated) {
      // The gate kept direct's answer: say which signal against which threshold (relat_core/engine/gating.py).
      this.chartCaption.textContent = `gate ${trace.gate.kind}: ${trace.gate.signal} `
        + `${trace.gate.value.toFixed(3)} against ${trace.gate.threshold}: no training, direct's answer`;
    } else {
      this.chartCaption.textContent = `no training steps (method ${trace.method || this.method})`;
    }
    if (trace.gate && !trace.gated && losses.length) {
      this.chartCaption.textContent += `; gate ${trace.gate.kind}: ${trace.gate.signal} `
        + `${trace.gate.value.toFixed(3)} against ${trace.gate.threshold}: trained`;
    }
    const timings = trace.timings || {};
    const browser = [this.arrivals.token !== undefined && `first token after ${this.arrivals.token.toFixed(2)} s`,
      `done after ${this.arrivals.done.toFixed(2)} s`].filter(Boolean).join(", ");
    this.drawPhases(phasesFromTrace(trace), `server: total ${fmt(timings.total_s)}; browser: ${browser}`);
    this.trace.textContent = JSON.stringify(result, null, 2);
    this.node.dataset.state = "done";
    this.tick(true);
  }

  // Every answer (n > 1: each after its index); with logprob shift, each as its coloured tokens where they spell
  // its text (a stop string cuts the text inside a token: that answer stays plain, and the legend says so).
  showAnswers(result) {
    const many = result.choices && result.choices.length > 1;
    const choices = many ? result.choices : [{index: 0, answer: result.answer, logprobs: result.logprobs}];
    const parts = [];
    const shifts = [];
    const plain = [];
    choices.forEach((choice, i) => {
      if (i) parts.push("\n\n");
      if (many) parts.push(`[${choice.index}] `);
      const entries = this.shift && choice.logprobs ? choice.logprobs.content : null;
      if (entries && entries.map((entry) => entry.token).join("") === choice.answer) {
        parts.push(...entries.map(shiftedToken));
        shifts.push(...entries.map((entry) => entry.logprob - entry.relat_base_logprob));
      } else {
        parts.push(choice.answer);
        if (entries) plain.push(choice.index);
      }
    });
    this.answer.replaceChildren(...parts);
    if (!this.shift) return;
    const mean = shifts.length ? shifts.reduce((sum, shift) => sum + shift, 0) / shifts.length : 0;
    this.shiftLegend.replaceChildren(el("span", {class: "up"}, el("i"), " raised"),
      el("span", {class: "down"}, el("i"), " lowered"),
      ` logprob against the base model on the plain prompt (full colour at ${SHIFT_FULL} nats; hover a token for `
      + `both); mean shift ${mean >= 0 ? "+" : ""}${mean.toFixed(3)} over ${shifts.length} tokens`
      + (plain.length ? `; answer ${plain.join(", ")} uncoloured (a stop string cut its last token)` : ""));
    this.shiftLegend.hidden = false;
  }

  onError(event) {
    this.finished = true;
    const message = event.error && event.error.message ? event.error.message : JSON.stringify(event);
    this.fail(`${event.status || "error"}: ${message}`);
  }

  drawPhases(phases, note) {
    const total = phases.reduce((sum, phase) => sum + phase.seconds, 0) || 1;
    this.bar.replaceChildren(...phases.filter((phase) => phase.seconds > 0).map((phase) => {
      const part = el("span", {class: `phase phase-${phase.key}`, title: `${phase.name}: ${fmt(phase.seconds)}`});
      part.style.flexGrow = String(phase.seconds / total);  // CSSOM, which the page's CSP allows
      return part;
    }));
    this.legend.replaceChildren(...phases.map((phase) => el("span", {class: `key phase-${phase.key}`},
      el("i"), ` ${phase.name} ${fmt(phase.seconds)}`)), el("span", {class: "note", text: note}));
  }
}

function fmt(seconds) {
  return seconds === undefined || seconds === null ? "–" : `${Number(seconds).toFixed(2)} s`;
}

// The phases as the trace times them, every time measured from the request's arrival at the engine:
// train_s ends with the training (any wait included), think_s is the thought, decoding starts at
// total_s - decode_s, its first token comes at first_token_s. Whatever is left is waiting between phases.
// A request that trained no step (direct, latent) spent train_s waiting for the batch it joined, and a direct one
// has no thought: its think_s is the reading of its prompt.
function phasesFromTrace(trace) {
  const t = trace.timings || {};
  const trained = (trace.steps || []).length > 0;
  const total = t.total_s || 0;
  const decodeStart = total - (t.decode_s || 0);
  const train = t.train_s || 0;
  const think = t.think_s || 0;
  const first = t.first_token_s !== undefined ? Math.max(t.first_token_s - decodeStart, 0) : 0;
  const decode = t.first_token_s !== undefined ? Math.max(total - t.first_token_s, 0) : t.decode_s || 0;
  const phases = [trained ? {key: "train", name: "train", seconds: train}
    : {key: "other", name: "wait", seconds: train},
    {key: "think", name: trace.method === "direct" ? "prompt" : "think", seconds: think}];
  const other = decodeStart - train - think;
  if (other > 0.005) phases.push({key: "other", name: "waiting", seconds: other});
  phases.push({key: "first", name: "first token", seconds: first}, {key: "decode", name: "decode", seconds: decode});
  return phases;
}

// The same phases as the browser sees them before the trace comes: training until the last ttt_step arrived,
// thinking and the first token until the first token, decoding since.
function phasesFromArrivals(a, now) {
  const trained = a.last_ttt_step || 0;
  const first = a.token !== undefined ? a.token : now;
  return [{key: "train", name: "train", seconds: trained},
    {key: "think", name: "think + first token", seconds: Math.max(first - trained, 0)},
    {key: "decode", name: "decode", seconds: a.token !== undefined ? now - a.token : 0}];
}

// The loss chart: one point per training step, x from step 1 to the steps asked for, y over the losses' range.
function drawChart(chart, losses, steps) {
  const [left, right, top, bottom] = [46, 310, 12, 124];
  const most = Math.max(...losses);
  const least = Math.min(...losses);
  const spread = most - least;
  const high = spread > 0 ? most + spread * 0.05 : most * 1.05 || 1;
  const low = spread > 0 ? Math.max(least - spread * 0.15, 0) : 0;
  const x = (index) => left + (steps > 1 ? index / (steps - 1) : 0.5) * (right - left);
  const y = (loss) => bottom - ((loss - low) / (high - low)) * (bottom - top);
  const nodes = [
    svg("line", {class: "axis", x1: left - 8, y1: bottom + 6, x2: right + 6, y2: bottom + 6}),
    svg("line", {class: "axis", x1: left - 8, y1: top, x2: left - 8, y2: bottom + 6}),
    label(high.toPrecision(3), left - 12, top + 4, "end"), label(low.toPrecision(3), left - 12, bottom + 4, "end"),
    label("loss", left - 12, (top + bottom) / 2 + 4, "end"),
  ];
  const every = Math.ceil(steps / 10);  // at most about ten step numbers under the axis
  for (let i = 0; i < steps; i += 1) {
    if (i % every === 0 || i === steps - 1) label(`${i + 1}`, x(i), bottom + 20, "middle", nodes);
  }
  nodes.push(svg("polyline", {class: "line", points: losses.map((loss, i) => `${x(i)},${y(loss)}`).join(" ")}));
  losses.forEach((loss, i) => {
    const point = svg("circle", {class: "point", cx: x(i), cy: y(loss), r: 3.5});
    const title = svg("title");
    title.textContent = `step ${i + 1}: loss ${loss.toFixed(4)}`;
    point.append(title);
    nodes.push(point);
  });
  chart.replaceChildren(...nodes);
}

function label(text, x, y, anchor, into) {
  const node = svg("text", {x, y, "text-anchor": anchor});
  node.textContent = text;
  if (into) into.push(node);
  return node;
}

// -- the page ------------------------------------------------------------------------------------------------------

function ask(event) {
  event.preventDefault();
  showFormMessage("");
  if (!$("#question").value.trim()) {
    showFormMessage("Ask a question first.");
    return;
  }
  const invalid = [...document.querySelectorAll(".knob input[type=number]")].find((input) => !input.checkValidity());
  if (invalid) {
    showFormMessage(`${invalid.name}: ${invalid.validationMessage}`);
    return;
  }
  const chosen = $("input[name=method]:checked");
  const methods = $("#compare").checked ? METHODS : [chosen ? chosen.value : "relat"];
  const results = $("#results");
  results.replaceChildren();
  results.dataset.columns = String(methods.length);
  const columns = methods.map((method) => new Column(method));
  results.append(...columns.map((column) => column.node));
  const button = $("#ask");
  button.disabled = true;
  // Together: the server batches them, and each column shows its own times.
  Promise.allSettled(columns.map((column) => column.run(requestBody(column.method))))
    .finally(() => { button.disabled = false; });
}

function start() {
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  if (key.value) $("#key-row").hidden = false;
  key.addEventListener("change", () => {
    if (apiKey()) sessionStorage.setItem(KEY_STORE, apiKey());
    else sessionStorage.removeItem(KEY_STORE);
    connect();
  });
  $("#ask-form").addEventListener("submit", ask);
  buildForm(FALLBACK, "fallback");
  connect();
}

document.addEventListener("DOMContentLoaded", start);
