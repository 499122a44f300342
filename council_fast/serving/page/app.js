// The council-fast page: pick or drop a photo (or a webcam snapshot), choose members and styles,
// POST /v1/translate once per chosen member (or once with member=all), show the outputs as a grid
// (rows: styles, columns: members) and the detected face box over the photo.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let photo = null;       // Blob to upload
let photoName = "photo.png";
let photoBitmap = null; // for the preview canvas

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadInfo() {
  try {
    const r = await fetch("/v1/info");
    info = await r.json();
  } catch (e) {
    setStatus("cannot reach the server: " + e, true);
    return;
  }
  $("model-info").textContent = `${info.members.length} members · ${info.size}×${info.size} · ${info.engine} on ${info.device}`;
  $("styles").max = info.max_styles;
  $("face-crop").checked = info.face_crop;
  const box = $("members");
  box.innerHTML = "";
  for (const m of info.members) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" class="member" value="${m}" checked> member ${m}`;
    box.appendChild(label);
  }
}

async function usePhoto(blob, name) {
  photo = blob;
  photoName = name || "photo.png";
  photoBitmap = await createImageBitmap(blob);
  drawPreview(null);
  $("drop-text").textContent = photoName;
  $("translate-button").disabled = false;
}

function drawPreview(face) {
  if (!photoBitmap) return;
  const canvas = $("preview");
  canvas.width = photoBitmap.width;
  canvas.height = photoBitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(photoBitmap, 0, 0);
  $("preview-box").hidden = false;
  $("face-note").textContent = "";
  if (!face) return;
  const line = Math.max(2, Math.round(canvas.width / 150));
  ctx.lineWidth = line;
  ctx.strokeStyle = "#ffd400";
  ctx.setLineDash([4 * line, 2 * line]);
  ctx.strokeRect(...face.crop);
  ctx.setLineDash([]);
  if (face.found) {
    ctx.strokeStyle = "#2f2";
    ctx.strokeRect(...face.box);
    $("face-note").textContent = `face at ${face.box.join(", ")} (green); crop dashed`;
  } else {
    $("face-note").textContent = "no face found: centre crop (dashed)";
  }
}

function chosenMembers() {
  return [...document.querySelectorAll("input.member:checked")].map((el) => Number(el.value));
}

async function translateOne(member, styles, seed, faceCrop) {
  const form = new FormData();
  form.append("image", photo, photoName);
  form.append("member", member);
  form.append("styles", String(styles));
  if (seed !== "") form.append("seed", seed);
  form.append("face_crop", faceCrop ? "1" : "0");
  const r = await fetch("/v1/translate", { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

async function translate() {
  const members = chosenMembers();
  if (!members.length) { setStatus("choose at least one member", true); return; }
  const styles = Math.max(1, Number($("styles").value) || 1);
  let seed = $("seed").value.trim();
  if (seed === "") seed = String(Math.floor(Math.random() * 2 ** 31));
  const faceCrop = $("face-crop").checked;
  $("translate-button").disabled = true;
  setStatus("translating…");
  const started = performance.now();
  try {
    const all = members.length === info.members.length;
    const answers = all ? [await translateOne("all", styles, seed, faceCrop)]
                        : await Promise.all(members.map((m) => translateOne(String(m), styles, seed, faceCrop)));
    const outputs = answers.flatMap((a) => a.outputs);
    showResults(outputs, members, styles);
    drawPreview(answers[0].face);
    setStatus(`${outputs.length} images in ${Math.round(performance.now() - started)} ms · seed ${seed}`);
  } catch (e) {
    setStatus("failed: " + e.message, true);
  } finally {
    $("translate-button").disabled = false;
  }
}

function showResults(outputs, members, styles) {
  const grid = $("results");
  grid.innerHTML = "";
  grid.style.gridTemplateColumns = `repeat(${members.length}, minmax(0, 1fr))`;
  const byKey = new Map(outputs.map((o) => [`${o.member}/${o.style}`, o]));
  for (let s = 0; s < styles; s++) {
    for (const m of members) {
      const o = byKey.get(`${m}/${s}`);
      const fig = document.createElement("figure");
      fig.innerHTML = `<img class="result" alt="member ${m}, style ${s}" src="data:image/png;base64,${o.png_base64}">` +
                      `<figcaption>member ${m} · style ${s}</figcaption>`;
      grid.appendChild(fig);
    }
  }
}

// ------------------------------------------------------------------ input: file, drop, webcam

$("file-input").addEventListener("change", (e) => {
  const f = e.target.files[0];
  if (f) usePhoto(f, f.name);
});
const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  const f = e.dataTransfer.files[0];
  if (f) usePhoto(f, f.name);
});

$("camera-button").addEventListener("click", async () => {
  const video = $("camera");
  try {
    video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "user" } });
  } catch (e) {
    setStatus("no webcam: " + e.message, true);
    return;
  }
  await video.play();
  video.hidden = false;
  $("snap-button").hidden = false;
});
$("snap-button").addEventListener("click", () => {
  const video = $("camera");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => usePhoto(blob, "snapshot.png"), "image/png");
  video.srcObject.getTracks().forEach((t) => t.stop());
  video.hidden = true;
  $("snap-button").hidden = true;
});
$("translate-button").addEventListener("click", translate);

loadInfo();
