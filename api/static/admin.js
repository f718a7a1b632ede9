// Admin files page: the token lives in sessionStorage (this tab only) and goes to the JSON
// API as a Bearer header. The orders are rendered with textContent, never as HTML.
"use strict";

(() => {
  const form = document.getElementById("admin-login");
  if (!form) return; // admin disabled: the server rendered the explanation

  const KEY = "orderflow.adminToken";
  const input = document.getElementById("admin-token");
  const session = document.getElementById("admin-session");
  const message = document.getElementById("admin-message");
  const list = document.getElementById("admin-orders");

  function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  }

  function say(text, kind) {
    message.replaceChildren();
    if (text) message.append(el("div", { className: `notice notice--${kind}` }, el("p", {}, text)));
  }

  function signedIn(yes) {
    form.hidden = yes;
    session.hidden = !yes;
  }

  // ISO 4217 exponents, which match Stripe's minor units for the currencies we sell in.
  function money(amount, currency) {
    const format = new Intl.NumberFormat("en-US", { style: "currency", currency });
    return format.format(amount / 10 ** format.resolvedOptions().maximumFractionDigits);
  }

  function renderVideo(video) {
    const item = el("li", {}, `Video ${video.index + 1}: ${video.status}`);
    if (video.error) item.append(` (${video.detail || video.error})`);
    if (video.url) {
      item.append(
        " · ",
        el("a", { href: video.url }, "open file"),
        // preload="none": a page of orders must not start dozens of downloads.
        el("video", { src: video.url, controls: true, preload: "none" }),
      );
    }
    return item;
  }

  function renderOrder(order) {
    const link = el("a", { href: `/orders/${encodeURIComponent(order.order_id)}` }, order.order_id);
    let amounts = money(order.amount_total, order.currency);
    if (order.refunded_amount) amounts += `, refunded ${money(order.refunded_amount, order.currency)}`;
    return el(
      "article",
      { className: "card" },
      el("h2", {}, link, " ", el("span", { className: "badge" }, order.status.replace(/_/g, " "))),
      el("p", { className: "prompt" }, order.prompt),
      el("p", { className: "muted" }, `${order.created_at.slice(0, 16).replace("T", " ")} UTC · ${amounts}`),
      order.error ? el("p", { className: "notice notice--error" }, order.error) : "",
      order.status === "needs_attention" ? attention(order) : "",
      order.settlement
        ? el("p", { className: "muted" }, `Settled by hand: ${order.settlement.reason}`)
        : "",
      el("ul", { className: "files" }, ...order.videos.map(renderVideo)),
    );
  }

  // What is stuck, what the providers said, and the two ways out (see README).
  function attention(order) {
    const id = encodeURIComponent(order.order_id);
    const reason = el("input", { type: "text", maxLength: 500, placeholder: "Why it is settled" });
    const retry = el("button", { className: "button", type: "button" }, "Retry now");
    const settle = el("button", { className: "button button--secondary", type: "button" },
      "Mark settled");
    retry.addEventListener("click", () => act(`/api/admin/video-orders/${id}/retry-refunds`));
    settle.addEventListener("click", () =>
      act(`/api/admin/video-orders/${id}/mark-settled`, { reason: reason.value }));
    return el(
      "div",
      { className: "notice notice--warn" },
      el("p", {}, el("strong", {}, order.attention_code), ` ${order.attention}`),
      el("ul", {}, ...(order.problems || []).map((p) => el("li", {}, p))),
      el("p", {}, retry, " ", reason, " ", settle),
    );
  }

  async function act(url, body) {
    const response = await fetch(url, {
      method: "POST",
      headers: {
        Authorization: `Bearer ${sessionStorage.getItem(KEY)}`,
        "Content-Type": "application/json",
      },
      body: body ? JSON.stringify(body) : undefined,
    }).catch(() => null);
    const answer = response ? await response.json().catch(() => ({})) : {};
    if (!response || !response.ok) return say(answer.detail || "The action failed.", "error");
    await load();
  }

  async function load() {
    const token = sessionStorage.getItem(KEY);
    list.replaceChildren();
    if (!token) {
      signedIn(false);
      return say("Enter the admin token to see orders.", "info");
    }
    signedIn(true);
    say("Loading orders…", "info");
    let response;
    try {
      response = await fetch("/api/admin/video-orders", {
        headers: { Authorization: `Bearer ${token}` },
        cache: "no-store",
      });
    } catch {
      return say("Could not reach the API. Try again.", "error");
    }
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      signedIn(false);
      return say("That token is wrong. Enter the admin token again.", "error");
    }
    const body = await response.json().catch(() => ({}));
    if (!response.ok) return say(body.detail || `The API answered ${response.status}.`, "error");
    say(body.orders.length ? "" : "No orders yet.", "info");
    list.append(...body.orders.map(renderOrder));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    load();
  });
  document.getElementById("admin-logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    load();
  });
  form.hidden = false;
  load();
})();
