// Review pages: draw evidence boxes over photos, and keyboard shortcuts
// (c = confirm, d = dismiss, n = claim the next flag). No framework, no build step.
"use strict";

function drawBoxes(holder) {
  const img = holder.querySelector("img");
  let boxes = [];
  try { boxes = JSON.parse(holder.dataset.boxes || "[]"); } catch (e) { return; }
  const place = () => {
    const w = Number(holder.dataset.w) || img.naturalWidth;
    const h = Number(holder.dataset.h) || img.naturalHeight;
    if (!w || !h) return;
    holder.querySelectorAll(".box").forEach((el) => el.remove());
    for (const b of boxes) {
      const [x0, y0, x1, y1] = b.box;
      const el = document.createElement("div");
      el.className = "box";
      // Percentages of the stored pixel size: the boxes follow the photo when it is scaled.
      el.style.left = (100 * x0 / w) + "%";
      el.style.top = (100 * y0 / h) + "%";
      el.style.width = (100 * (x1 - x0) / w) + "%";
      el.style.height = (100 * (y1 - y0) / h) + "%";
      el.title = b.label || "";
      const tag = document.createElement("span");
      tag.textContent = b.label || "";
      el.appendChild(tag);
      holder.appendChild(el);
    }
  };
  if (img.complete) place(); else img.addEventListener("load", place);
}

function submit(id) {
  const form = document.getElementById(id);
  if (!form) return false;
  const note = document.getElementById("note");
  form.querySelectorAll(".note-copy").forEach((el) => { el.value = note ? note.value : ""; });
  form.requestSubmit();
  return true;
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".boxed").forEach(drawBoxes);
  document.querySelectorAll("form[id$='-form']").forEach((form) => {
    form.addEventListener("submit", () => {
      const note = document.getElementById("note");
      form.querySelectorAll(".note-copy").forEach((el) => { el.value = note ? note.value : ""; });
    });
  });
  document.addEventListener("keydown", (ev) => {
    const t = ev.target;
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
    const target = { c: "confirm-form", d: "dismiss-form", n: "next-form" }[ev.key];
    if (target && submit(target)) ev.preventDefault();
  });
});
