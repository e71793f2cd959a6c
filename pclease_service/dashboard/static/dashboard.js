// pclease dashboard: ticking clocks and live refresh. No dependencies.
(function () {
  "use strict";
  var body = document.body;
  var offset = 0; // server time minus browser time, in ms
  if (body.dataset.serverNow) offset = Date.parse(body.dataset.serverNow) - Date.now();
  function now() { return Date.now() + offset; }

  function duration(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
  }
  function money(v) {
    return v >= 1 ? "$" + v.toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2})
                    : "$" + v.toFixed(4);
  }

  function tick() {
    var t = now();
    document.querySelectorAll("[data-since]").forEach(function (el) {
      el.textContent = duration((t - Date.parse(el.dataset.since)) / 1000) + (el.dataset.suffix || "");
    });
    document.querySelectorAll("[data-until]").forEach(function (el) {
      var left = (Date.parse(el.dataset.until) - t) / 1000;
      el.textContent = left > 0 ? duration(left) : (el.dataset.due || "due");
    });
    document.querySelectorAll("[data-cost-since]").forEach(function (el) {
      var hours = (t - Date.parse(el.dataset.costSince)) / 3600000;
      el.textContent = money(Math.max(0, hours) * parseFloat(el.dataset.rate));
    });
    document.querySelectorAll("[data-bar-until]").forEach(function (el) {
      var left = (Date.parse(el.dataset.barUntil) - t) / 1000;
      var total = parseFloat(el.dataset.barTotal) || 1;
      el.setAttribute("width", String(Math.max(0, Math.min(100, 100 * left / total))));
    });
  }
  tick();
  setInterval(tick, 1000);

  // Admin forms: ask first, then tell the server the person confirmed.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.dataset || !form.dataset.confirm) return;
    if (!window.confirm(form.dataset.confirm)) { event.preventDefault(); return; }
    var field = form.querySelector("input[name=confirm]");
    if (field) field.value = "yes";
  });

  // Live refresh: poll a cheap version probe; fetch the page's live part when it changed
  // (and every 10 s regardless, for heartbeats, which record no event).
  var live = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!live || !body.dataset.live) return;
  var version = null;
  var refreshedAt = Date.now();
  var busy = false;

  function setOnline(ok) {
    if (!status) return;
    status.classList.toggle("offline", !ok);
    status.querySelector(".label").textContent = ok ? "live" : "reconnecting";
  }
  function toSignIn() {
    location.href = "/ui/login?next=" + encodeURIComponent(location.pathname + location.search);
  }
  function refresh() {
    return fetch(location.href, {headers: {"X-Pclease-Fragment": "1"}, credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { toSignIn(); return; }
        if (!r.ok) return;
        return r.text().then(function (html) {
          live.innerHTML = html;
          refreshedAt = Date.now();
          tick();
        });
      });
  }
  function poll() {
    if (busy) return;
    busy = true;
    fetch("/ui/api/version", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) {
        if (r.status === 401) { toSignIn(); return; }
        return r.json().then(function (v) {
          setOnline(true);
          offset = Date.parse(v.now) - Date.now();
          var changed = version !== null && v.version !== version;
          version = v.version;
          if (changed || Date.now() - refreshedAt > 10000) return refresh();
        });
      })
      .catch(function () { setOnline(false); })
      .then(function () { busy = false; });
  }
  setInterval(poll, 1500);
  poll();
})();
