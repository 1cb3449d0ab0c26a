// The dashboard's behaviour: copy buttons, the playground and the usage chart. No build step.
"use strict";

function csrfToken() {
  const match = document.cookie.match(/(?:^|; )csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const text = document.querySelector(button.dataset.copy).textContent.trim();
  navigator.clipboard.writeText(text).then(
    () => { button.textContent = "Copied"; },
    () => { button.textContent = "Select and copy it"; },
  );
});

// Behaviour the markup asks for with data attributes (the pages' Content-Security-Policy refuses inline handlers):
// a form with data-confirm asks before it is sent; a select with data-autosubmit sends its form when changed.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

document.addEventListener("change", (event) => {
  if (event.target.matches("select[data-autosubmit]")) event.target.form.requestSubmit();
});

// Playground: a form generated from the endpoint's input schema (the one /v1/models publishes).
function fieldFor(name, schema, required) {
  const wrapper = document.createElement("p");
  const label = document.createElement("label");
  label.htmlFor = `field-${name}`;
  label.textContent = name.replaceAll("_", " ");
  wrapper.append(label);
  let input;
  const def = schema.default;
  if (name === "image_size") {
    const size = def || { width: 512, height: 512 };
    input = document.createElement("span");
    for (const side of ["width", "height"]) {
      const box = document.createElement("input");
      const limits = schema.oneOf[1].properties[side];
      Object.assign(box, { type: "number", min: limits.minimum, max: limits.maximum, step: limits.multipleOf, value: size[side] });
      box.id = side === "width" ? `field-${name}` : `field-${name}-height`;
      box.dataset.size = side;
      box.setAttribute("aria-label", side);
      input.append(box, side === "width" ? " × " : "");
    }
    input.dataset.name = name;
  } else if (schema.enum) {
    input = document.createElement("select");
    // No default in the schema: the endpoint decides (the first choice would otherwise always be sent).
    if (def === undefined) input.add(new Option("(endpoint's default)", "", false, true));
    for (const value of schema.enum) input.add(new Option(value, value, false, value === def));
  } else if (schema.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(def);
  } else if (schema.type === "integer" || schema.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    input.step = schema.type === "integer" ? "1" : "any";
    if (schema.minimum !== undefined) input.min = schema.minimum;
    if (schema.maximum !== undefined) input.max = schema.maximum;
    if (def !== undefined) input.value = def;
  } else if (name === "image_url") {
    // A URL or a data URI; a file chosen here is sent as a data URI.
    input = document.createElement("span");
    const url = document.createElement("input");
    Object.assign(url, { type: "text", id: `field-${name}`, placeholder: "https://… or data:image/png;base64,…" });
    url.dataset.name = name;
    url.dataset.type = "string";
    if (required) url.required = true;
    const file = document.createElement("input");
    Object.assign(file, { type: "file", accept: "image/*" });
    file.setAttribute("aria-label", "or choose an image");
    file.addEventListener("change", () => {
      const chosen = file.files && file.files[0];
      if (!chosen) return;
      const reader = new FileReader();
      reader.onload = () => { url.value = String(reader.result); };
      reader.readAsDataURL(chosen);
    });
    input.append(url, " ", file);
  } else if (name.includes("prompt")) {
    input = document.createElement("textarea");
    input.maxLength = schema.maxLength || 2000;
    if (name === "prompt") input.value = "a lighthouse on a cliff at dawn";
  } else {
    input = document.createElement("input");
    input.type = "text";
    if (def !== undefined) input.value = def;
    if (schema.pattern) input.pattern = schema.pattern.replace(/^\^|\$$/g, "");
  }
  if (name !== "image_url") {
    if (!input.dataset.name) { input.id = `field-${name}`; input.name = name; }
    input.dataset.name = name;
    input.dataset.type = schema.type || "";
  }
  if (required && input.tagName !== "SPAN") input.required = true;
  wrapper.append(input);
  if (schema.description) {
    const help = document.createElement("small");
    help.className = "muted";
    help.textContent = ` ${schema.description}`;
    wrapper.append(help);
  }
  return wrapper;
}

function readInput(container) {
  const input = {};
  for (const element of container.querySelectorAll("[data-name]")) {
    const name = element.dataset.name;
    if (name === "image_size") {
      input.image_size = {};
      for (const box of element.querySelectorAll("[data-size]")) input.image_size[box.dataset.size] = Number(box.value);
    } else if (element.type === "checkbox") {
      input[name] = element.checked;
    } else if (element.value !== "") {
      input[name] = element.dataset.type === "integer" || element.dataset.type === "number" ? Number(element.value) : element.value;
    }
  }
  return input;
}

function setupPlayground(form) {
  const endpoints = JSON.parse(document.getElementById("schemas").textContent);
  const select = form.querySelector("#endpoint");
  const fields = form.querySelector("#fields");
  const render = () => {
    const endpoint = endpoints.find((e) => e.id === select.value);
    fields.replaceChildren();
    if (!endpoint) return;
    const schema = endpoint.schema;
    for (const [name, property] of Object.entries(schema.properties)) {
      if (name === "sync_mode") continue;
      fields.append(fieldFor(name, property, schema.required.includes(name)));
    }
  };
  select.addEventListener("change", render);
  render();

  const state = document.getElementById("run-state");
  const status = document.getElementById("run-status");
  const progress = state.querySelector(".progress");
  const bar = progress.querySelector(".bar");
  const outcome = document.getElementById("outcome");
  const show = (text, percent) => {
    status.textContent = text;
    if (percent !== undefined) { bar.style.width = `${percent}%`; progress.setAttribute("aria-valuenow", String(percent)); }
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("#run");
    button.disabled = true;
    state.hidden = false;
    outcome.replaceChildren();
    show("Submitting…", 0);
    try {
      const response = await fetch(form.dataset.runUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: JSON.stringify({ endpoint: select.value, input: readInput(fields) }),
      });
      const body = await response.json();
      if (!response.ok) {
        const detail = Array.isArray(body.detail) ? body.detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ") : body.detail;
        show(`Refused: ${detail}`);
        button.disabled = false;
        return;
      }
      show("In the queue…", 0);
      const events = new EventSource(body.events_url);
      events.onmessage = async (message) => {
        const update = JSON.parse(message.data);
        if (update.status === "IN_QUEUE") {
          show(`In the queue (position ${update.queue_position + 1})…`, 0);
        } else if (update.status === "IN_PROGRESS") {
          const { step, total } = update.progress || { step: 0, total: 0 };
          show(total ? `Step ${step} of ${total}` : "Starting…", total ? Math.round((100 * step) / total) : 0);
        } else if (update.status === "COMPLETED") {
          events.close();
          show(update.error ? `Finished: ${update.error}` : "Done", 100);
          const fragment = await fetch(body.outcome_url);
          outcome.innerHTML = await fragment.text();
          button.disabled = false;
        }
      };
      events.onerror = () => {
        if (events.readyState === EventSource.CLOSED) { show("Lost the connection; see the request page."); button.disabled = false; }
      };
    } catch (error) {
      show(`Could not submit: ${error}`);
      button.disabled = false;
    }
  });
}

// Charts: the data is in a json_script block next to the canvas; the tables carry the same figures.
const PALETTE = ["#4b3fd6", "#1b7f3b", "#d97706", "#b3261e", "#0e7490", "#7c3aed", "#64748b"];
// Axis figures as people write them: 0.0001, not Chart.js's 1.00000E-4 once the axis is narrow.
const plainTicks = { callback: (value) => Number(value).toLocaleString("en-US", { maximumSignificantDigits: 4 }) };

function setupUsageChart(canvas) {
  if (!window.Chart) return;
  const data = JSON.parse(document.getElementById("usage-data").textContent);
  new window.Chart(canvas, {
    type: "bar",
    data: {
      labels: data.days,
      datasets: data.series.map((line, n) => ({
        label: line.endpoint,
        data: line.cost_micros.map((micros) => micros / 1e6),
        backgroundColor: PALETTE[n % PALETTE.length],
      })),
    },
    options: {
      maintainAspectRatio: false,
      animation: false,
      scales: { x: { stacked: true }, y: { stacked: true, ticks: plainTicks, title: { display: true, text: "USD" } } },
    },
  });
}

function setupLineChart(canvas) {
  if (!window.Chart) return;
  const data = JSON.parse(document.getElementById(canvas.dataset.source).textContent);
  new window.Chart(canvas, {
    type: canvas.dataset.kind || "line",
    data: {
      labels: data.labels,
      datasets: data.series.map((line, n) => ({
        label: line.label, data: line.values, borderColor: PALETTE[n % PALETTE.length],
        backgroundColor: PALETTE[n % PALETTE.length], tension: 0.2,
      })),
    },
    options: { maintainAspectRatio: false, animation: false, scales: { y: { ticks: plainTicks, title: { display: true, text: data.unit || "" } } } },
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const playground = document.getElementById("playground");
  if (playground) setupPlayground(playground);
  const usage = document.getElementById("usage-chart");
  if (usage) setupUsageChart(usage);
  for (const canvas of document.querySelectorAll("canvas[data-source]")) setupLineChart(canvas);
});
