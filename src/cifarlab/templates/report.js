// report.html's only script: inline, fetches nothing, and writes names with textContent only (never as markup).
(function () {
  "use strict";

  function readJSON(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  // One thumbnail cut out of a sprite (a grid of `cols` images of `size` px), shown `scale` times larger.
  function thumb(sprite, k, scale, index) {
    var s = sprite.size * scale, span = document.createElement("span"), label = "test image #" + index;
    span.className = "thumb";
    span.style.width = s + "px";
    span.style.height = s + "px";
    span.style.backgroundImage = 'url("' + sprite.src + '")';
    span.style.backgroundSize = sprite.cols * s + "px auto";
    span.style.backgroundPosition = -(k % sprite.cols) * s + "px " + -Math.floor(k / sprite.cols) * s + "px";
    span.dataset.index = String(index);
    span.title = label;
    span.setAttribute("role", "img");
    span.setAttribute("aria-label", label);
    return span;
  }

  // The confusion matrix: a click on a cell shows that (true, predicted) pair's test images.
  var confusion = readJSON("confusion-data");
  if (confusion) {
    var gallery = document.getElementById("cell-gallery");
    var heading = document.getElementById("cell-heading");
    var grid = document.getElementById("cell-thumbs");
    var pressed = null;
    document.getElementById("confusion-table").addEventListener("click", function (event) {
      var button = event.target.closest("button[data-cell]");
      if (!button) return;
      var cell = confusion.cells[button.dataset.cell];
      var t = Number(button.dataset.t), p = Number(button.dataset.p);
      if (pressed) pressed.setAttribute("aria-pressed", "false");
      pressed = button;
      button.setAttribute("aria-pressed", "true");
      heading.textContent = "True class " + confusion.classes[t] + ", predicted " + confusion.classes[p] +
        ": showing " + cell.idx.length + " of " + cell.n + " test images" +
        (cell.n > cell.idx.length ? " (the first " + cell.idx.length + " in test-set order)" : "");
      grid.replaceChildren.apply(grid, cell.idx.map(function (index, k) { return thumb(cell, k, 2, index); }));
      gallery.hidden = false;
    });
  }

  // The feature map: hovering a point shows its test image.
  var map = readJSON("map-data");
  if (map) {
    var svg = document.getElementById("feature-map");
    var tip = document.getElementById("map-tip");
    var tipThumb = document.getElementById("map-tip-thumb");
    var tipText = document.getElementById("map-tip-text");
    svg.addEventListener("mouseover", function (event) {
      var dot = event.target.closest("circle[data-k]");
      if (!dot) return;
      var k = Number(dot.dataset.k), index = map.idx[k];
      tipThumb.replaceChildren(thumb(map, k, 3, index));
      tipText.textContent = "#" + index + " · true: " + map.classes[map["true"][k]] + " · predicted: " +
        map.classes[map.pred[k]] + " (p = " + map.conf[k].toFixed(3) + ")";
      var box = svg.parentNode.getBoundingClientRect(), at = dot.getBoundingClientRect();
      tip.style.left = Math.min(at.right - box.left + 8, box.width - 180) + "px";
      tip.style.top = Math.max(at.top - box.top - 40, 0) + "px";
      tip.dataset.index = String(index);
      tip.hidden = false;
    });
    svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  }

  // Channel pages: arrow keys for the previous and next channel, Escape back to the stimuli.
  document.addEventListener("keydown", function (event) {
    var page = document.querySelector(".channel-page:target");
    if (!page) return;
    var link = event.key === "ArrowLeft" ? page.querySelector("a.prev") :
      event.key === "ArrowRight" ? page.querySelector("a.next") : null;
    if (link) location.hash = link.getAttribute("href");
    else if (event.key === "Escape") location.hash = "#stimuli";
  });
})();
