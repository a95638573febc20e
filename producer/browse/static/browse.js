// The job page: draws the summary, the charts and the lists from /api/jobs/<job>,
// and polls it while the job runs, so counts and charts move without a reload.
"use strict";

const root = document.getElementById("job");
const jobId = root.dataset.job;
const enc = encodeURIComponent;
const ENDED = new Set(["done", "cancelled"]);
const POLL_MS = 1000;

function text(id, value) {
  document.getElementById(id).textContent = value;
}

function thumb(image) {
  const figure = document.createElement("figure");
  figure.className = "thumb";
  figure.title = image.top.map((t) => `${t.label} ${t.score.toFixed(3)}`).join("\n");
  const img = document.createElement("img");
  img.src = `/jobs/${enc(jobId)}/thumbs/${image.batch}/${image.index}`;
  img.alt = image.uri;
  img.loading = "lazy";
  img.onerror = () => img.replaceWith(Object.assign(document.createElement("div"),
    { className: "nothumb", textContent: "no preview" }));
  const caption = document.createElement("figcaption");
  const first = image.top[0];
  caption.textContent = image.error
    ? `${image.error.kind}: ${image.error.message}`
    : `${first.label} ${first.score.toFixed(3)}`;
  const uri = document.createElement("code");
  uri.textContent = image.uri;
  caption.append(document.createElement("br"), uri);
  figure.append(img, caption);
  return figure;
}

function drawTimes(times) {
  text("started", times.started_at);
  text("finished", times.finished_at ?? "not yet");
  text("elapsed", `${times.elapsed_s} s`);
}

function drawSummary(status) {
  const state = document.getElementById("state");
  state.textContent = status.state;
  state.className = `state ${status.state}`;
  const i = status.images;
  text("count-total", i.total);
  text("count-ok", i.ok);
  text("count-error", i.error);
  text("count-skipped", i.skipped);
  text("count-carried", i.carried);
  document.getElementById("carried-box").hidden = !status.incremental;
  const m = status.model;
  text("model", `${m.name} version ${m.version ?? "not pinned yet"} weights ${m.weights ?? "?"}`);
  document.getElementById("random-weights").hidden = !m.note;
  text("rate", status.images_per_s);
  text("eta", status.eta_s === null ? "unknown" : `${status.eta_s} s`);
  text("input", status.input);
  text("output", status.output);
}

function drawCharts(summary) {
  const labels = summary.labels.slice().reverse(); // the most frequent on top
  Plotly.react("labels-chart", [{
    type: "bar", orientation: "h",
    x: labels.map((l) => l.count), y: labels.map((l) => l.label),
    hovertemplate: "%{y}: %{x}<extra></extra>",
  }], {
    margin: { l: 20, r: 20, t: 10, b: 40 }, height: 120 + 22 * labels.length,
    xaxis: { title: { text: "images (top-1)" } },
    // ImageNet names list synonyms ("sloth bear, Melursus ursinus, ..."): the
    // axis shows the first, the hover and the gallery the whole name.
    yaxis: {
      automargin: true, tickmode: "array", tickvals: labels.map((l) => l.label),
      ticktext: labels.map((l) => l.label.split(",")[0]),
    },
  }, { displayModeBar: false, responsive: true });
  const h = summary.histogram;
  Plotly.react("confidence-chart", [{
    type: "bar", x: h.edges.slice(0, -1).map((e) => e + 0.025), y: h.counts, width: 0.05,
    hovertemplate: "%{x:.2f}: %{y}<extra></extra>",
  }], {
    margin: { l: 50, r: 20, t: 10, b: 40 }, height: 260,
    xaxis: { title: { text: "top-1 score" }, range: [0, 1] },
    yaxis: { title: { text: "images" } },
  }, { displayModeBar: false, responsive: true });
}

function drawLists(summary) {
  document.getElementById("least").replaceChildren(...summary.least_confident.map(thumb));
  const errors = document.getElementById("errors");
  if (!summary.errors.length) {
    errors.replaceChildren(Object.assign(document.createElement("p"), { textContent: "None." }));
    return;
  }
  errors.replaceChildren(...summary.errors.map((group) => {
    const section = document.createElement("section");
    section.className = "error-kind";
    section.dataset.kind = group.kind;
    const title = document.createElement("h3");
    title.textContent = `${group.kind} (${group.count})`;
    const grid = document.createElement("div");
    grid.className = "grid";
    grid.append(...group.lines.map(thumb));
    section.append(title, grid);
    return section;
  }));
}

let shown = "";

function draw(data) {
  drawSummary(data.status);
  drawTimes(data.times);
  const key = JSON.stringify(data.summary);
  if (key !== shown) { // redraw charts and lists only when they changed
    shown = key;
    drawCharts(data.summary);
    drawLists(data.summary);
  }
}

async function poll() {
  try {
    const response = await fetch(`/api/jobs/${enc(jobId)}`, { cache: "no-store" });
    if (response.ok) {
      const data = await response.json();
      draw(data);
      if (ENDED.has(data.status.state)) return;
    }
  } catch (err) {
    console.warn("poll failed", err);
  }
  setTimeout(poll, POLL_MS);
}

draw(JSON.parse(document.getElementById("initial").textContent));
document.getElementById("labels-chart").on("plotly_click", (event) => {
  window.location.href = `/jobs/${enc(jobId)}/labels/${enc(event.points[0].y)}`;
});
const initialState = document.getElementById("state").textContent;
if (!ENDED.has(initialState)) setTimeout(poll, POLL_MS);
