// Keeps the order page live. The server already rendered the current state; this script
// only updates it: server-sent events first, polling the JSON every 2 s if they fail, every
// 10 s if the server refused the stream (too many open from this address, say).
"use strict";

(() => {
  const root = document.getElementById("order");
  if (!root || root.dataset.final === "true") return;

  const POLL_MS = 2000;
  // Each poll is a read of the order; a server that refused a stream is asked gently.
  const REFUSED_POLL_MS = 10000;
  // A stream ended by the server (its lifetime, a restart) comes back after the retry it
  // named; this long without an event after that means it did not.
  const RECONNECT_MS = 12000;
  // The first event arrives as soon as the stream opens; silence means a proxy is buffering.
  const FIRST_EVENT_MS = 5000;
  const money = JSON.parse(root.dataset.money);
  const labels = JSON.parse(root.dataset.labels);
  let source = null;
  let timer = null;
  let done = false;
  let pollMs = POLL_MS;
  let reconnecting = false;

  const field = (scope, name) => scope.querySelector(`[data-field="${name}"]`);

  // Same rule as format_money in api/routes/pages.py, from the style it hands us.
  function formatMoney(amount) {
    const digits = money.digits;
    const number = (amount / 10 ** digits).toLocaleString("en-US", {
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    });
    return money.prefix + number + money.suffix;
  }

  function renderVideo(item, video) {
    const generating = video.status === "generating";
    const label = field(item, "label");
    label.textContent =
      labels[video.retrying ? "retrying" : video.status] + (generating ? ` · ${video.progress}%` : "");
    label.dataset.status = video.status;

    const bar = item.querySelector("progress");
    bar.hidden = !generating;
    bar.value = video.progress;
    bar.textContent = `${video.progress}%`;

    item.querySelector(".player").hidden = !video.url;
    const player = item.querySelector("video");
    // Setting src again would restart a video the customer is already watching.
    if (video.url && player.getAttribute("src") !== video.url) {
      if (video.thumbnail_url) player.poster = video.thumbnail_url;
      player.src = video.url;
      field(item, "download").href = video.url;
    }

    item.querySelector(".video-error").hidden = video.status !== "failed";
    field(item, "error").textContent = video.error || "This video could not be made.";
    field(item, "refund").hidden = !video.refunded_amount;
    field(item, "refund-amount").textContent = formatMoney(video.refunded_amount);
  }

  function render(order) {
    const status = field(root, "status");
    status.textContent = order.status.replace(/_/g, " ");
    status.dataset.status = order.status;

    for (const notice of root.querySelectorAll("[data-notice]")) {
      notice.hidden = notice.dataset.notice !== order.status;
    }
    for (const el of root.querySelectorAll('[data-notice] [data-field="refunded"]')) {
      el.textContent = formatMoney(order.refunded_amount);
    }
    field(root.querySelector('[data-notice="failed"]'), "error").textContent = order.error || "";
    field(root.querySelector('[data-notice="needs_attention"]'), "attention").textContent =
      order.attention || "";
    const pay = field(root, "checkout");
    if (pay && order.checkout_url) pay.href = order.checkout_url;

    // Same rule as order.html: no video list before payment or for an order that never started.
    field(root, "videos").hidden = !(
      order.status === "paid" ||
      order.status === "generating" ||
      order.videos.some((v) => v.status !== "pending")
    );
    for (const video of order.videos) {
      const item = root.querySelector(`.video[data-index="${video.index}"]`);
      if (item) renderVideo(item, video);
    }
    if (order.final) stop();
  }

  function stop() {
    done = true;
    clearTimeout(timer);
    if (source) source.close();
  }

  async function poll() {
    try {
      const response = await fetch(root.dataset.jsonUrl, { cache: "no-store" });
      if (response.status === 404) return stop();
      if (response.ok) render(await response.json());
    } catch {
      // Offline for a moment: the next poll tries again.
    }
    if (!done) timer = setTimeout(poll, pollMs);
  }

  function fallBackToPolling(interval = POLL_MS) {
    if (source) source.close();
    source = null;
    pollMs = interval;
    clearTimeout(timer);
    if (!done) poll();
  }

  if (!("EventSource" in window)) return fallBackToPolling();
  source = new EventSource(root.dataset.eventsUrl);
  timer = setTimeout(fallBackToPolling, FIRST_EVENT_MS);
  source.addEventListener("order", (event) => {
    clearTimeout(timer);
    render(JSON.parse(event.data));
  });
  // The order's workflow closed without a final status: nothing more will change.
  source.addEventListener("end", stop);
  // The server is about to end the stream on purpose and has said when to come back.
  source.addEventListener("reconnect", () => {
    reconnecting = true;
  });
  source.addEventListener("error", (event) => {
    // The server names an event "error" when the order is gone.
    if (event.data) return stop();
    if (reconnecting && source.readyState === EventSource.CONNECTING) {
      // The browser reconnects by itself after the server's retry hint.
      reconnecting = false;
      clearTimeout(timer);
      timer = setTimeout(() => fallBackToPolling(), RECONNECT_MS);
      return;
    }
    // CLOSED: the server answered with an error (429, 503, 404) instead of a stream.
    // CONNECTING: the connection broke; polling also gets through proxies that break
    // long streams.
    fallBackToPolling(source.readyState === EventSource.CLOSED ? REFUSED_POLL_MS : POLL_MS);
  });
})();
