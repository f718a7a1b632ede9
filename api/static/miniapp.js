// The shop's Mini App: the catalog, buying, the order's live status, the goods, the
// balance. Every call carries Telegram's signed initData; the API trusts nothing else.
(function () {
  "use strict";
  var tg = window.Telegram && window.Telegram.WebApp;
  var FINAL = ["delivered", "expired", "refunded", "failed"];
  var WORDS = {
    awaiting_payment: "Waiting for your payment.",
    awaiting_supplier: "Paid. It is being made for you.",
    delivered: "Delivered. Your goods are below and in your chat with the bot.",
    expired: "The order expired before it was paid. Nothing was charged.",
    refunded: "Refunded.",
    failed: "The order could not be completed.",
    needs_attention: "Our team is looking into this order.",
  };
  var STATUS = {
    awaiting_payment: "Awaiting payment", awaiting_supplier: "Being made",
    delivered: "Delivered", expired: "Expired", refunded: "Refunded", failed: "Failed",
    needs_attention: "Needs attention", placing: "Placing",
  };
  var $ = function (id) { return document.getElementById(id); };
  var products = [];
  var current = null; // the product in the buy sheet
  var pending = null; // {what, key}: the order request not yet answered
  var polling = null;

  function money(amount, currency) {
    return (amount / 100).toFixed(2) + " " + String(currency || "").toUpperCase();
  }

  function notice(text) {
    var el = $("notice");
    el.textContent = text || "";
    el.hidden = !text;
  }

  function api(method, path, body, headers) {
    var init = {
      method: method,
      headers: Object.assign({ Authorization: "tma " + (tg ? tg.initData : "") }, headers),
    };
    if (body) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (resp) {
      return resp.json().catch(function () { return {}; }).then(function (data) {
        if (!resp.ok) {
          var err = new Error(data.detail || "Something went wrong; try again.");
          err.code = data.error;
          err.status = resp.status;
          throw err;
        }
        return data;
      });
    });
  }

  function show(id) {
    ["catalog", "buy", "order", "me"].forEach(function (s) { $(s).hidden = s !== id; });
    window.scrollTo(0, 0);
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function priceLine(p) {
    var line = el("p", "price", money(p.final_price, p.currency));
    if (p.discount_percent > 0) {
      line.appendChild(el("span", "old", money(p.price, p.currency)));
      line.appendChild(el("span", "off", "-" + p.discount_percent + "%"));
    }
    return line;
  }

  function stockLine(p) {
    if (p.available > 0) return p.available + " in stock";
    if (p.made_to_order) return "Made to order in " + p.fulfillment_time_hours + " h (prepaid)";
    return "Out of stock";
  }

  function renderCatalog() {
    var root = $("catalog");
    root.textContent = "";
    if (!products.length) root.appendChild(el("p", "muted", "Nothing on sale right now."));
    products.forEach(function (p) {
      var card = el("article", "product");
      card.setAttribute("data-product", p.id);
      card.appendChild(el("h2", "", p.name));
      card.appendChild(el("p", "muted", p.description));
      card.appendChild(priceLine(p));
      card.appendChild(el("p", "stock", stockLine(p)));
      var buy = el("button", "primary", "Buy");
      buy.type = "button";
      buy.disabled = p.available <= 0 && !p.made_to_order;
      buy.addEventListener("click", function () { openBuy(p); });
      card.appendChild(buy);
      root.appendChild(card);
    });
  }

  function loadCatalog() {
    return api("GET", "/api/shop/products").then(function (data) {
      products = data.products;
      renderCatalog();
    });
  }

  function loadMe() {
    return api("GET", "/api/shop/me").then(function (me) {
      $("balance").textContent = money(me.balance, me.currency);
      $("me-balance").textContent = money(me.balance, me.currency);
      var list = $("me-orders");
      list.textContent = "";
      if (!me.orders.length) list.appendChild(el("li", "muted", "No orders yet."));
      me.orders.forEach(function (o) {
        var item = el("li");
        var open = el("button", "link", o.product_name + " x " + o.quantity);
        open.type = "button";
        open.addEventListener("click", function () { openOrder(o.order_id); });
        item.appendChild(open);
        item.appendChild(el("span", "muted", " " + (STATUS[o.status] || o.status) + ", " +
          money(o.amount, o.currency)));
        list.appendChild(item);
      });
      return me;
    });
  }

  function openBuy(p) {
    current = p;
    notice("");
    $("buy-name").textContent = p.name;
    $("buy-desc").textContent = stockLine(p);
    $("buy-price").textContent = money(p.final_price, p.currency) + " each";
    $("buy-stars").textContent = "(" + p.price_stars + " \u2B50 each)";
    $("buy-qty").value = 1;
    $("buy-qty").max = Math.max(p.available, p.made_to_order ? 100 : 1);
    show("buy");
  }

  function newKey() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) {
      return ("0" + b.toString(16)).slice(-2);
    }).join("");
  }

  function buy() {
    var method = document.querySelector("input[name=method]:checked").value;
    var quantity = parseInt($("buy-qty").value, 10) || 1;
    var request = { product_id: current.id, quantity: quantity, payment_method: method };
    var what = JSON.stringify(request);
    // The same request again (after a timeout or a lost answer) carries the same key, so
    // the shop answers with the order it already placed instead of placing a second one.
    if (!pending || pending.what !== what) pending = { what: what, key: newKey() };
    var go = $("buy-go");
    go.disabled = true; // a double tap is one order
    api("POST", "/api/shop/orders", request, { "Idempotency-Key": pending.key })
      .then(function (order) {
        pending = null;
        openOrder(order.order_id, order);
        pay(order);
      })
      .catch(function (err) {
        // A refusal is final for that key; a failure to answer may be retried with it.
        if (err.status && err.status < 500 && err.code !== "rate_limited") pending = null;
        notice(err.message);
      })
      .then(function () { go.disabled = false; });
  }

  function pay(order) {
    var payment = order.payment;
    if (!payment) return;
    if (payment.invoice_link) {
      tg.openInvoice(payment.invoice_link, function (status) {
        if (status === "failed") notice("The payment did not go through.");
        refresh(order.order_id);
      });
    } else if (payment.checkout_url) {
      tg.openLink(payment.checkout_url);
    }
  }

  function renderOrder(o) {
    $("order-id").textContent = o.order_id.slice(0, 8);
    $("order-product").textContent = (o.product_name || "") + " x " + o.quantity;
    var status = $("order-status");
    status.textContent = STATUS[o.status] || o.status;
    status.setAttribute("data-status", o.status);
    var words = WORDS[o.status] || "";
    if (o.status === "awaiting_supplier" && o.fulfillment_deadline) {
      words += " Due by " + new Date(o.fulfillment_deadline).toLocaleString() + ".";
    }
    $("order-words").textContent = words;
    $("order-amount").textContent = money(o.amount, o.currency) +
      (o.payment_method === "stars" ? " (" + o.amount_stars + " \u2B50)" : "");
    var payButton = $("order-pay");
    payButton.hidden = !(o.status === "awaiting_payment" && o.payment);
    payButton.onclick = function () { pay(o); };
    var goods = o.content || [];
    $("order-goods").hidden = !goods.length;
    var list = $("order-content");
    list.textContent = "";
    goods.forEach(function (line) { list.appendChild(el("li", "", line)); });
  }

  function refresh(orderId) {
    return api("GET", "/api/shop/orders/" + encodeURIComponent(orderId)).then(function (o) {
      renderOrder(o);
      if (FINAL.indexOf(o.status) >= 0) {
        stopPolling();
        loadMe();
        loadCatalog();
      }
      return o;
    });
  }

  function stopPolling() {
    if (polling) clearInterval(polling);
    polling = null;
  }

  function openOrder(orderId, placed) {
    stopPolling();
    notice("");
    if (placed) renderOrder(Object.assign({ content: null }, placed));
    show("order");
    refresh(orderId).catch(function (err) { notice(err.message); });
    polling = setInterval(function () {
      refresh(orderId).catch(function () { /* keep trying */ });
    }, 2000);
  }

  function back() {
    stopPolling();
    notice("");
    show("catalog");
  }

  function start() {
    if (!tg || !tg.initData) {
      notice("Open this page from the shop's bot in Telegram.");
      return;
    }
    tg.ready();
    tg.expand();
    $("buy-go").addEventListener("click", buy);
    $("buy-cancel").addEventListener("click", back);
    $("order-back").addEventListener("click", back);
    $("me-back").addEventListener("click", back);
    $("show-me").addEventListener("click", function () { loadMe(); show("me"); });
    var wanted = new URLSearchParams(location.search).get("order");
    Promise.all([loadCatalog(), loadMe()])
      .then(function () { if (wanted) openOrder(wanted); })
      .catch(function (err) { notice(err.message); });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
