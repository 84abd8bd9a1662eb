// cifarlab explore: the page's behaviour. Plain JS, no library, nothing fetched from any other host.
// Every name that comes from a file or the run (file names, class names, layer names) is inserted as
// text (textContent), never as markup.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const bytes = (b64) => Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
  const lut = bytes(config.colormap);  // 256 RGB entries (viridis), from the server
  let originalUrl = null;

  function el(tag, props = {}, children = []) {
    const e = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") e.textContent = value;
      else if (key === "data") Object.assign(e.dataset, value);
      else if (key === "class") e.className = value;
      else e.setAttribute(key, value);
    }
    for (const child of children) e.append(child);
    return e;
  }

  function setState(state, message) {
    document.body.dataset.state = state;
    $("status").textContent = message || "";
  }

  function finished() {
    document.body.dataset.done = String(Number(document.body.dataset.done) + 1);
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
    setState("error", "");
  }

  async function ask(url, options) {
    // The JSON answer, or an Error carrying the server's one-line message.
    let response;
    try {
      response = await fetch(url, options);
    } catch (e) {
      throw new Error(`the explorer did not answer (${e.message}); is it still running?`);
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      throw new Error(`the explorer answered HTTP ${response.status} without a message`);
    }
    if (!response.ok) throw new Error(body && body.error ? body.error : `HTTP ${response.status}`);
    return body;
  }

  async function explain(url, options, original) {
    setState("busy", "working: reading the picture, predicting, computing the maps ...");
    $("error").hidden = true;
    try {
      const answer = await ask(url, options);
      showExplanation(answer, original);
      setState("ready", `${answer.name}: explained in ${answer.seconds.toFixed(2)} s`);
    } catch (e) {
      $("results").hidden = true;
      showError(e.message);
    } finally {
      finished();
    }
  }

  function uploadFile(file) {
    if (!file) return;
    if (file.size > config.max_upload_bytes) {
      const mb = (n) => (n / 1048576).toFixed(1);
      showError(`${file.name}: ${mb(file.size)} MB is more than the ${mb(config.max_upload_bytes)} MB the explorer takes`);
      finished();
      return;
    }
    if (originalUrl) URL.revokeObjectURL(originalUrl);
    originalUrl = URL.createObjectURL(file);  // a blob: URL: the file shown from memory, not fetched
    const form = new FormData();
    form.append("photo", file, file.name);
    explain("/api/photo", { method: "POST", body: form }, originalUrl);
  }

  // ---------------------------------------------------------------------------------------------
  // One picture

  function showExplanation(x, original) {
    $("results").hidden = false;
    $("channel-panel").hidden = true;
    $("as-seen").src = x.image;
    $("seen-caption").textContent = `${x.name}: ${x.size}\u00d7${x.size}, as the net sees it`;
    $("original-figure").hidden = !(x.kind === "upload" && original);
    if (x.kind === "upload" && original) $("original").src = original;
    $("true-class").hidden = x.kind !== "test";
    $("true-class").textContent = x.kind === "test" ? `true class: ${x.true_class}` : "";
    showClasses(x);
    showMaps(x);
    showNeighbours(x);
    showLayers(x.layers);
    $("notes").replaceChildren(...x.notes.map((n) => el("p", { class: "note", text: n })));
  }

  function showClasses(x) {
    const calibrated = x.temperature ? `calibrated, T = ${x.temperature.toFixed(3)}` : "plain softmax";
    $("top-classes").replaceChildren(...x.predictions.map((p) => {
      const button = el("button", { type: "button", class: "class-button", data: { index: p.index },
                                    title: `what the net thinks '${p.class}' looks like` }, [p.class]);
      button.addEventListener("click", () => showChannel("classes", p.index, button));
      return el("li", {}, [button, el("progress", { max: "1", value: String(p.probability) }),
                           el("span", { class: "percent", text: `${(100 * p.probability).toFixed(1)}%` })]);
    }));
    $("top-classes").title = calibrated;
    $("verdict").textContent = x.verdict;
    $("verdict").className = x.flagged ? "flagged" : "";
  }

  function figure(src, caption, extraClass = "") {
    return el("figure", { class: extraClass }, [el("img", { src, alt: caption, class: "pixels" }),
                                                 el("figcaption", { text: caption })]);
  }

  function showMaps(x) {
    $("maps").replaceChildren(...x.maps.map((m) => {
      const layer = m.method.startsWith("grad_cam") && x.gradcam_layer ? ` (${x.gradcam_layer})` : "";
      return figure(m.image, m.title + layer);
    }));
  }

  function showNeighbours(x) {
    const top = x.predictions[0].class;
    $("neighbours-section").hidden = x.neighbours.length === 0;
    $("agree").textContent = x.neighbours.length
      ? `${x.agree} of ${x.neighbours.length} are \u201c${top}\u201d (cosine similarity of the net's penultimate features)`
      : "";
    $("neighbours").replaceChildren(...x.neighbours.map((n) =>
      figure(n.image, `#${n.index} ${n.class} \u00b7 cos ${n.similarity.toFixed(2)}`, n.class === top ? "" : "disagree")));
  }

  function channelCanvas(data, offset, width, height) {
    const canvas = el("canvas", { width: String(width), height: String(height) });
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    for (let i = 0; i < width * height; i++) {
      const v = data[offset + i] * 3;
      image.data.set([lut[v], lut[v + 1], lut[v + 2], 255], 4 * i);
    }
    context.putImageData(image, 0, 0);
    return canvas;
  }

  function showLayers(layers) {
    $("layers").replaceChildren(...layers.map((layer) => {
      const data = bytes(layer.data);
      const size = layer.height * layer.width;
      const buttons = layer.means.map((mean, c) => {
        const button = el("button", { type: "button", class: "channel", data: { layer: layer.name, channel: c },
                                      title: `${layer.name} channel ${c}: mean activation ${mean.toFixed(3)}` },
                          [channelCanvas(data, c * size, layer.width, layer.height)]);
        button.addEventListener("click", () => showChannel(layer.name, c, button));
        return button;
      });
      const heading = `${layer.name}: ${layer.channels} channels, ${layer.height}\u00d7${layer.width} (max ${layer.max.toFixed(2)})`;
      return el("div", { class: "layer", data: { layer: layer.name } },
                [el("h3", { text: heading }), el("div", { class: "channels" }, buttons)]);
    }));
  }

  // ---------------------------------------------------------------------------------------------
  // One channel (or class)

  async function showChannel(layer, channel, button) {
    document.querySelectorAll(".selected").forEach((b) => b.classList.remove("selected"));
    button.classList.add("selected");
    const panel = $("channel-panel");
    panel.hidden = false;
    const what = layer === "classes" ? `class \u201c${config.classes[channel]}\u201d` : `${layer}, channel ${channel}`;
    $("channel-heading").textContent = what;
    $("channel-text").textContent = "making its maximum stimulus and finding the training images that excite it most ...";
    $("stimulus").removeAttribute("src");
    $("stimulus-caption").textContent = "";
    $("examples").replaceChildren();
    setState("busy", `exploring ${what} ...`);
    try {
      const c = await ask(`/api/channel?layer=${encodeURIComponent(layer)}&channel=${channel}`);
      $("stimulus").src = c.stimulus;
      $("stimulus-caption").textContent =
        `maximum stimulus (${c.stimulus_method} method, seed ${c.stimulus_seed}, ${c.stimulus_source}): ` +
        `${layer === "classes" ? "logit" : "activation"} ${c.stimulus_activation.toFixed(3)}`;
      const unit = layer === "classes" ? "logit" : "mean activation";
      $("channel-text").textContent = c.examples.length
        ? `The ${c.examples.length} of ${c.examples_from.toLocaleString("en")} training images with the highest ${unit}` +
          (c.ratio !== null ? `; the stimulus reaches ${c.ratio.toFixed(2)}\u00d7 the best of them.` : ".")
        : "No training images to compare with (the run's data is unavailable).";
      $("examples").replaceChildren(...c.examples.map((e) =>
        figure(e.image, `#${e.index} ${e.class} \u00b7 ${e.activation.toFixed(2)}`)));
      setState("ready", `${what}: done`);
    } catch (e) {
      $("channel-text").textContent = "";
      showError(e.message);
    } finally {
      finished();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Input

  $("file-input").addEventListener("change", (event) => {
    uploadFile(event.target.files[0]);
    event.target.value = "";  // choosing the same file again is a new upload
  });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    uploadFile(event.dataTransfer.files[0]);
  });
  zone.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file-input").click();
  });
  const testForm = $("test-form");
  if (testForm) {
    testForm.addEventListener("submit", (event) => {
      event.preventDefault();
      explain(`/api/test?index=${encodeURIComponent($("test-index").value)}`);
    });
    $("random-button").addEventListener("click", () => {
      $("test-index").value = String(Math.floor(Math.random() * config.test_images));
      testForm.requestSubmit();
    });
  }
  setState("ready", "");
})();
