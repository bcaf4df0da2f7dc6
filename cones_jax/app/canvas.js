// The box canvas of the cones_jax app: Gradio runs this as gr.HTML's js_on_load, with `element` (the
// component), `props` (props.value is the JSON of cones_jax.app.state.canvas_json), `trigger` and `watch`.
// Boxes are kept as fractions of the image; the Python side owns words, residuals and γ⁺, this only
// draws, moves, resizes and deletes boxes, and sends `input` (user edits only) so Python can follow.
const canvas = element.querySelector("canvas");
const ctx = canvas.getContext("2d");
const COLORS = __COLORS__;
const STRENGTH = __STRENGTH__, MAX_BOXES = __MAX__, HANDLE = 0.025, MIN_SIZE = 0.02;
let state = { boxes: [], background: "" };
let selected = -1, drag = null, background = null, backgroundSrc = "";

const clamp = (v) => Math.min(1, Math.max(0, v));
const round = (v) => Math.round(v * 10000) / 10000;  // state.DECIMALS

function load() {
  try { state = JSON.parse(props.value || "{}"); } catch (e) { state = {}; }
  state.boxes = state.boxes || [];
  if (selected >= state.boxes.length) selected = -1;
  if ((state.background || "") !== backgroundSrc) {
    backgroundSrc = state.background || "";
    background = null;
    if (backgroundSrc) {
      const img = new Image();
      img.onload = () => { background = img; draw(); };
      img.src = backgroundSrc;
    }
  }
  draw();
}

function commit() {  // a user edit: the new value goes to Python
  props.value = JSON.stringify(state);
  canvas.dataset.boxes = JSON.stringify(state.boxes.map((b) => b.box));  // for tests and scripts
  trigger("input");
}

function point(e) {
  const r = canvas.getBoundingClientRect();
  return [clamp((e.clientX - r.left) / r.width), clamp((e.clientY - r.top) / r.height)];
}

function corners(b) { return [[b[0], b[1]], [b[2], b[1]], [b[0], b[3]], [b[2], b[3]]]; }

function hit(p) {  // the selected box's corner handles first, then the topmost box under the pointer
  if (selected >= 0) {
    const c = corners(state.boxes[selected].box).findIndex(
      (q) => Math.abs(q[0] - p[0]) < HANDLE && Math.abs(q[1] - p[1]) < HANDLE);
    if (c >= 0) return { k: selected, mode: "corner", corner: c };
  }
  for (let k = state.boxes.length - 1; k >= 0; k--) {
    const b = state.boxes[k].box;
    if (p[0] >= b[0] && p[0] <= b[2] && p[1] >= b[1] && p[1] <= b[3]) return { k, mode: "move" };
  }
  return null;
}

function ordered(a, b) {
  return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])].map(round);
}

canvas.addEventListener("mousedown", (e) => {
  e.preventDefault();
  canvas.focus();
  const p = point(e), h = hit(p);
  if (h) {
    selected = h.k;
    drag = { ...h, start: p, orig: state.boxes[h.k].box.slice() };
  } else {
    selected = -1;
    drag = { mode: "new", start: p, box: null };
  }
  draw();
});

window.addEventListener("mousemove", (e) => {
  if (!drag) return;
  const p = point(e);
  if (drag.mode === "new") {
    drag.box = ordered(drag.start, p);
  } else if (drag.mode === "move") {
    const o = drag.orig, w = o[2] - o[0], h = o[3] - o[1];
    const x = Math.min(1 - w, Math.max(0, o[0] + p[0] - drag.start[0]));
    const y = Math.min(1 - h, Math.max(0, o[1] + p[1] - drag.start[1]));
    state.boxes[drag.k].box = [x, y, x + w, y + h].map(round);
  } else {  // a corner: the opposite corner stays
    const o = drag.orig, c = drag.corner;
    const fixed = [c % 2 === 0 ? o[2] : o[0], c < 2 ? o[3] : o[1]];
    state.boxes[drag.k].box = ordered(fixed, p);
  }
  draw();
});

window.addEventListener("mouseup", () => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (d.mode === "new") {
    const b = d.box;
    if (b && b[2] - b[0] >= MIN_SIZE && b[3] - b[1] >= MIN_SIZE && state.boxes.length < MAX_BOXES) {
      state.boxes.push({ box: b, word: "", residual: "", strength: STRENGTH });
      selected = state.boxes.length - 1;
      commit();
    }
  } else if (JSON.stringify(d.orig) !== JSON.stringify(state.boxes[d.k].box)) {
    commit();
  }
  draw();
});

function remove() {
  if (selected < 0) return;
  state.boxes.splice(selected, 1);
  selected = -1;
  commit();
  draw();
}

canvas.addEventListener("keydown", (e) => {
  if (e.key === "Delete" || e.key === "Backspace") { e.preventDefault(); remove(); }
});
element.querySelector(".cones-delete").addEventListener("click", remove);
element.querySelector(".cones-clear").addEventListener("click", () => {
  state.boxes = []; selected = -1; commit(); draw();
});

function draw() {
  const W = canvas.width, H = canvas.height;
  ctx.clearRect(0, 0, W, H);
  if (background) ctx.drawImage(background, 0, 0, W, H);
  else { ctx.fillStyle = "#d0d0d0"; ctx.fillRect(0, 0, W, H); }
  const shown = state.boxes.map((b) => b.box);
  if (drag && drag.mode === "new" && drag.box) shown.push(drag.box);
  shown.forEach((b, k) => {
    const [r, g, bl] = COLORS[k % COLORS.length];
    const x = b[0] * W, y = b[1] * H, w = (b[2] - b[0]) * W, h = (b[3] - b[1]) * H;
    ctx.fillStyle = `rgba(${r},${g},${bl},0.25)`;
    ctx.fillRect(x, y, w, h);
    ctx.lineWidth = k === selected ? 4 : 2;
    ctx.strokeStyle = `rgb(${r},${g},${bl})`;
    ctx.strokeRect(x, y, w, h);
    const sub = state.boxes[k];
    const label = `${k + 1}${sub && sub.word ? ": " + sub.word : ""}`;
    ctx.font = "bold 16px sans-serif";
    ctx.fillRect(x, y, ctx.measureText(label).width + 8, 20);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x + 4, y + 15);
    if (k === selected) {
      ctx.fillStyle = `rgb(${r},${g},${bl})`;
      corners(b).forEach((q) => ctx.fillRect(q[0] * W - 6, q[1] * H - 6, 12, 12));
    }
  });
  canvas.dataset.boxes = JSON.stringify(state.boxes.map((b) => b.box));
}

watch("value", load);  // Python set the value (a word typed, a layout uploaded, a background)
load();
