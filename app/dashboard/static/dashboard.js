// Lethe dashboard: charts from JSON blocks, and a poll that refreshes the page's live
// regions while work runs. No inline scripts (the Content-Security-Policy forbids them).
"use strict";

(function () {
  const charts = [];

  function data(id) {
    const node = document.getElementById(id);
    return node ? JSON.parse(node.textContent) : null;
  }

  const builders = {
    "per-day": function (canvas) {
      const series = data("per-day-data");
      return new Chart(canvas, {
        type: "bar",
        data: { labels: series.labels.map((d) => d.slice(5)),
                datasets: [{ label: "requests received", data: series.values,
                             backgroundColor: "#2f5fd0" }] },
        options: { maintainAspectRatio: false, animation: false,
                   plugins: { legend: { display: false } },
                   scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
      });
    },
    "versions": function (canvas) {
      const series = data("versions-data");
      return new Chart(canvas, {
        type: "line",
        data: { labels: series.labels, datasets: [
          { label: "MIA accuracy", data: series.mia_accuracy, borderColor: "#b3261e",
            backgroundColor: "#b3261e", spanGaps: true },
          { label: "test accuracy", data: series.test_accuracy, borderColor: "#1f7a3e",
            backgroundColor: "#1f7a3e", spanGaps: true },
          { label: "chance (0.5)", data: series.labels.map(() => 0.5), borderColor: "#6b7480",
            borderDash: [4, 4], pointRadius: 0 },
        ] },
        options: { maintainAspectRatio: false, animation: false,
                   scales: { y: { min: 0, max: 1 } } },
      });
    },
  };

  function drawCharts() {
    if (typeof Chart === "undefined") return;
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      const build = builders[canvas.dataset.chart];
      if (build) charts.push(build(canvas));
    });
  }

  // Fetch the same page and swap each [data-live-region] by id; stop once the page says the
  // work is done (no data-live on its body). A lost session sends the browser to sign in.
  function poll(seconds) {
    window.setTimeout(async function () {
      let response;
      try {
        response = await fetch(window.location.href, { credentials: "same-origin",
                                                      headers: { "X-Lethe-Live": "1" } });
      } catch (error) {
        poll(seconds * 2);  // the server is restarting: back off, keep trying
        return;
      }
      if (response.redirected || !response.ok) {
        window.location.reload();
        return;
      }
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      document.querySelectorAll("[data-live-region]").forEach(function (region) {
        const replacement = fresh.getElementById(region.id);
        if (replacement) region.innerHTML = replacement.innerHTML;
      });
      const next = fresh.body.dataset.live;
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
      if (next) {
        poll(Number(next));
      } else {
        delete document.body.dataset.live;
        const note = document.getElementById("live-note");
        if (note) note.textContent = "Work finished.";
      }
    }, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    const live = Number(document.body.dataset.live || 0);
    if (live > 0) poll(live);
  });
})();
