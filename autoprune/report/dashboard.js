// The dashboard's only script: clicking a point of the Pareto front shows that trial.
// The per-trial data is the JSON embedded in the page (id "autoprune-details").
window.addEventListener("load", function () {
  var details = JSON.parse(document.getElementById("autoprune-details").textContent);

  function format(value) {
    if (typeof value !== "number") return String(value);
    return Number.isInteger(value) ? String(value) : value.toPrecision(4);
  }

  function cells(row, texts) {
    texts.forEach(function (text) {
      var cell = document.createElement("td");
      cell.textContent = text;  // text, never HTML: names come from user data
      row.appendChild(cell);
    });
  }

  function curve(points, split) {
    return {
      x: points.map(function (p) { return p[0]; }),
      y: points.map(function (p) { return p[1]; }),
      mode: "lines+markers",
      name: split,
      line: {dash: split === "val" ? "dash" : "solid"},
    };
  }

  function show(key) {
    var d = details[key];
    if (!d) return;
    document.getElementById("detail-title").textContent = d.study + ": trial " + d.trial;
    var rows = document.getElementById("detail-rows");
    rows.replaceChildren();
    Object.entries(d.metrics).concat(Object.entries(d.policy)).forEach(function (entry) {
      var row = document.createElement("tr");
      cells(row, [entry[0], format(entry[1])]);
      rows.appendChild(row);
    });
    var layers = Object.keys(d.layer_sparsity);
    var bars = [["target", d.target_sparsity], ["achieved", d.layer_sparsity]].map(function (b) {
      return {type: "bar", name: b[0], x: layers, y: layers.map(function (l) { return b[1][l]; })};
    });
    Plotly.react("detail-sparsity", bars, {
      title: {text: "Per-layer sparsity"}, barmode: "group", height: 300,
      yaxis: {range: [0, 1]}, margin: {t: 40, b: 80},
    }, {displayModeBar: false});
    var curves = ["train", "val"].filter(function (s) { return d.history[s]; }).map(function (s) {
      return curve(d.history[s], s);
    });
    Plotly.react("detail-loss", curves, {
      title: {text: "Fine-tuning loss"}, height: 300, margin: {t: 40},
      xaxis: {title: {text: "epoch"}}, yaxis: {type: "log", title: {text: "loss"}},
    }, {displayModeBar: false});
    document.getElementById("detail").dataset.shown = key;
  }

  document.getElementById("pareto").on("plotly_click", function (event) {
    var point = event.points && event.points[0];
    if (point && point.customdata !== undefined) {
      history.replaceState(null, "", "#" + encodeURIComponent(point.customdata));
      show(point.customdata);
    }
  });
  // A page rewritten by --watch reloads itself: keep showing the trial chosen before.
  var chosen = decodeURIComponent(location.hash.slice(1));
  show(details[chosen] ? chosen : document.body.dataset.initial);
});
