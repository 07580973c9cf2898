// Ferry status page: refreshes the page's live part in place every few
// seconds (the same path, asked with x-ferry-part: live), without reloading.
"use strict";
(function () {
  const live = document.getElementById("live");
  const stamp = document.getElementById("updated");
  if (!live) return;
  const every = Number(live.dataset.every) || 2000;
  let busy = false;
  async function tick() {
    if (busy || document.hidden) return;
    busy = true;
    try {
      const r = await fetch(location.pathname + location.search, {
        headers: { "x-ferry-part": "live" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (r.status === 401) {
        location.assign("/ui/login?next=" + encodeURIComponent(location.pathname + location.search));
        return;
      }
      if (!r.ok) throw new Error("the site answered " + r.status);
      live.innerHTML = await r.text();
      if (stamp) {
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
        stamp.classList.remove("stale");
      }
    } catch (e) {
      if (stamp) {
        stamp.textContent = "cannot reach the site (" + e.message + "); trying again";
        stamp.classList.add("stale");
      }
    } finally {
      busy = false;
    }
  }
  setInterval(tick, every);
  document.addEventListener("visibilitychange", tick);
})();
