// The sandbox's stand-in for https://telegram.org/js/telegram-web-app.js: the same
// window.Telegram.WebApp surface a shop uses, for a plain browser in development.
// window.__sandboxWebApp (prepended by the sandbox) holds the signed initData and the
// sandbox's address.
(function () {
  "use strict";
  var cfg = window.__sandboxWebApp || {};
  var handlers = {};

  function parse(initData) {
    var out = {};
    new URLSearchParams(initData).forEach(function (value, key) {
      out[key] = key === "user" ? JSON.parse(value) : value;
    });
    if (out.auth_date) out.auth_date = Number(out.auth_date);
    return out;
  }

  function emit(name, payload) {
    (handlers[name] || []).slice().forEach(function (fn) {
      try { fn(payload); } catch (e) { console.error(e); }
    });
  }

  function button() {
    var b = {
      text: "", isVisible: false, isActive: true, _cb: [],
      setText: function (t) { b.text = t; return b; },
      show: function () { b.isVisible = true; return b; },
      hide: function () { b.isVisible = false; return b; },
      enable: function () { b.isActive = true; return b; },
      disable: function () { b.isActive = false; return b; },
      onClick: function (fn) { b._cb.push(fn); return b; },
      offClick: function (fn) { b._cb = b._cb.filter(function (f) { return f !== fn; }); return b; },
      setParams: function () { return b; },
      showProgress: function () { return b; },
      hideProgress: function () { return b; },
    };
    return b;
  }

  function sheet(slug, done) {
    var overlay = document.createElement("div");
    overlay.setAttribute("data-sandbox-invoice", slug);
    overlay.style.cssText =
      "position:fixed;inset:0;background:rgba(0,0,0,.45);display:flex;align-items:flex-end;" +
      "justify-content:center;z-index:2147483647;font:16px system-ui,sans-serif";
    var box = document.createElement("div");
    box.style.cssText =
      "background:#fff;color:#111;width:100%;max-width:480px;border-radius:16px 16px 0 0;" +
      "padding:20px;box-sizing:border-box";
    box.innerHTML =
      '<div style="font-size:13px;color:#777">Telegram Stars (sandbox)</div>' +
      '<h2 class="sbx-title" style="margin:6px 0"></h2><p class="sbx-desc"></p>' +
      '<p class="sbx-status" style="color:#777"></p>' +
      '<button class="sbx-pay" style="width:100%;padding:12px;border:0;border-radius:10px;' +
      'background:#2481cc;color:#fff;font-size:16px">Pay</button>' +
      '<button class="sbx-cancel" style="width:100%;padding:10px;margin-top:8px;border:0;' +
      'background:none;color:#2481cc;font-size:15px">Cancel</button>';
    overlay.appendChild(box);
    document.body.appendChild(overlay);
    var pay = box.querySelector(".sbx-pay");
    var status = box.querySelector(".sbx-status");

    function close(result) {
      overlay.remove();
      done(result);
    }

    fetch(cfg.api + "/invoices/" + encodeURIComponent(slug))
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (inv) {
        box.querySelector(".sbx-title").textContent = inv.title;
        box.querySelector(".sbx-desc").textContent = inv.description;
        pay.textContent = "Pay " + inv.amount + " \u2B50";
      })
      .catch(function () { status.textContent = "This invoice does not exist."; pay.disabled = true; });

    pay.addEventListener("click", function () {
      pay.disabled = true;
      status.textContent = "Paying\u2026";
      fetch(cfg.api + "/invoices/" + encodeURIComponent(slug) + "/pay", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ user_id: cfg.userId }),
      })
        .then(function (r) { return r.json(); })
        .then(function (out) { close(out.status === "paid" ? "paid" : "failed"); })
        .catch(function () { close("failed"); });
    });
    box.querySelector(".sbx-cancel").addEventListener("click", function () { close("cancelled"); });
  }

  var unsafe = parse(cfg.initData || "");
  var WebApp = {
    initData: cfg.initData || "",
    initDataUnsafe: unsafe,
    version: "8.0",
    platform: "sandbox",
    colorScheme: "light",
    themeParams: {},
    isExpanded: true,
    viewportHeight: window.innerHeight,
    viewportStableHeight: window.innerHeight,
    MainButton: button(),
    SecondaryButton: button(),
    BackButton: button(),
    HapticFeedback: {
      impactOccurred: function () {},
      notificationOccurred: function () {},
      selectionChanged: function () {},
    },
    ready: function () {},
    expand: function () {},
    close: function () {},
    isVersionAtLeast: function () { return true; },
    onEvent: function (name, fn) { (handlers[name] = handlers[name] || []).push(fn); },
    offEvent: function (name, fn) {
      handlers[name] = (handlers[name] || []).filter(function (f) { return f !== fn; });
    },
    sendData: function () {},
    openLink: function (url) { window.open(url, "_blank"); },
    openTelegramLink: function (url) { window.open(url, "_blank"); },
    showAlert: function (message, cb) { window.alert(message); if (cb) cb(); },
    showConfirm: function (message, cb) { var ok = window.confirm(message); if (cb) cb(ok); },
    openInvoice: function (url, callback) {
      // Links look like https://t.me/$<slug>, as Telegram's own.
      var slug = String(url).split("$").pop();
      sheet(slug, function (status) {
        emit("invoiceClosed", { url: url, status: status });
        if (callback) callback(status);
      });
    },
  };
  window.Telegram = window.Telegram || {};
  window.Telegram.WebApp = WebApp;
})();
