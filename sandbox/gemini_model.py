"""The sandbox's scripted Gemini: reads the declared tools and the conversation, calls the
shop's tools when the customer asks for something, and answers in the customer's language
with the JSON the caller asked for.

It is gullible on purpose, like a model that believes what it reads: asked for a price, a
discount or someone else's orders, it passes them to the tools as arguments (which the
shop must refuse) and repeats the claim in its reply. The tests show nothing changes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

# The chat workflow's own nudge on its last round (activities/assistant.py).
SHOP_NOTE = "(The shop:"

_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_WORD = re.compile(r"[\w-]+", re.U)
_HANDOFF = re.compile(r"оператор|человек|менеджер|operator|human|manager", re.I)
_ORDERS = re.compile(r"заказ|orders?\b|order status", re.I)
_BALANCE = re.compile(r"баланс\b|balance\b", re.I)
_OTHER_USER = re.compile(r"(?:user|пользовател\w*)\s+(\d+)", re.I)
_QUANTITY = re.compile(r"\b(\d{1,4})\s*(?:шт\w*|pieces?|pcs|штук\w*|копи\w*|x\b)", re.I)
_FOLLOW_UP = re.compile(r"\b(?:again|same|ещё|еще|такой же|тот же|то же)\b", re.I)
_PRICE = re.compile(r"(?:цена|price|стоимост\w*|за)\s*(\d+)|(\d+)\s*(?:звезд\w*|stars?\b|⭐)", re.I)
_DISCOUNT = re.compile(r"(?:скидк\w*|discount)\D{0,30}?(\d{1,3})\s*%|(\d{1,3})\s*%", re.I)
_FREE = re.compile(r"\bfree\b|бесплатно", re.I)
_IGNORE = re.compile(r"ignore (?:all |your |previous )*instructions|игнорируй", re.I)
_METHOD = (
    (re.compile(r"звезд|stars?\b|⭐", re.I), "stars"),
    (re.compile(r"карт|card", re.I), "stripe"),
    (re.compile(r"баланс|balance", re.I), "balance"),
)
# Words that say how, not what: left out of the search.
_FILLER = set(
    """
    привет здравствуйте добрый день хочу хотел хотела нужен нужна нужно нужны купить куплю
    продай продайте дай дайте мне пожалуйста и с для на за по в а это есть ли у вас можно
    оплата оплатить оплачу баланса балансом баланс картой карта карту звезды звезд звездами
    звезду цена цены скидка скидку скидкой бесплатно игнорируй инструкции свои все ещё еще шт
    штук штуки такой же тот то сколько стоит помощь помогите спасибо
    hello hi hey please i need want buy a an the me for to with from by pay paying balance
    card stars star price discount free ignore your all previous instructions and give it
    you have some any is there do can of my get again same one pieces piece pcs thanks thank
    help how much
    """.split()
)
_GREETING = re.compile(r"привет|здравств|добр|hello|\bhi\b|hey|спасибо|thank|помощ|help", re.I)


@dataclass
class Turn:
    """What the model knows of the current customer message."""

    text: str
    ru: bool
    must_answer: bool
    calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    earlier_products: list[int] = field(default_factory=list)

    def result(self, name: str) -> dict[str, Any] | None:
        for called, _, response in reversed(self.calls):
            if called == name:
                return response
        return None


def read_turn(contents: list[dict[str, Any]]) -> Turn:
    """The last customer text, the tool calls made for it since, and earlier answers."""
    text, at, must_answer = "", -1, False
    for i, content in enumerate(contents):
        if content.get("role", "user") != "user":
            continue
        for part in content.get("parts") or []:
            value = part.get("text")
            if not isinstance(value, str):
                continue
            if value.startswith(SHOP_NOTE):
                if i > at:
                    must_answer = True
                continue
            text, at, must_answer = value, i, False
    turn = Turn(text=text, ru=bool(_CYRILLIC.search(text)), must_answer=must_answer)
    pending: dict[str, dict[str, Any]] = {}
    for i, content in enumerate(contents):
        for part in content.get("parts") or []:
            call = part.get("functionCall") or part.get("function_call")
            response = part.get("functionResponse") or part.get("function_response")
            if i < at and content.get("role") == "model" and isinstance(part.get("text"), str):
                try:
                    ids = json.loads(part["text"]).get("product_ids") or []
                except (ValueError, AttributeError):
                    ids = []
                if ids:
                    turn.earlier_products = [int(x) for x in ids]
            if i <= at:
                continue
            if call:
                pending[call.get("name", "")] = call.get("args") or {}
            elif response:
                name = response.get("name", "")
                turn.calls.append((name, pending.pop(name, {}), response.get("response") or {}))
    return turn


def decide(turn: Turn, tools: set[str]) -> dict[str, Any]:
    """The next part: {"functionCall": ...} or {"answer": {...}} for the final JSON."""
    text, ru = turn.text, turn.ru

    def call(name: str, args: dict[str, Any]) -> dict[str, Any]:
        if name not in tools or turn.must_answer:
            return answer("none", _say(ru, "I can help you find and buy products.",
                                       "Я помогу найти и купить товары."))  # fmt: skip
        return {"functionCall": {"name": name, "args": args}}

    if not text.strip():
        return answer(
            "none", _say(ru, "Hello! What are you looking for?", "Здравствуйте! Что ищете?")
        )
    if _HANDOFF.search(text):
        return answer(
            "handoff",
            _say(ru, "I am handing you over to an operator.", "Передаю вас оператору."),
        )
    other = _OTHER_USER.search(text)
    if _ORDERS.search(text) and not _wants_product(text):
        orders = turn.result("get_user_orders")
        if orders is None:
            args = {"telegram_id": int(other.group(1))} if other else {}
            return call("get_user_orders", args)
        if "error" in orders:
            return answer("none", _say(ru, "I cannot show those orders.",
                                       "Эти заказы я показать не могу."))  # fmt: skip
        listed = orders.get("orders") or []
        lines = [f"{o.get('product')} x {o.get('quantity')}: {o.get('status')}" for o in listed]
        head = _say(ru, f"You have {len(listed)} orders.", f"У вас заказов: {len(listed)}.")
        return answer("order_status", "\n".join([head, *lines]))
    if _BALANCE.search(text) and not _wants_product(text):
        balance = turn.result("get_balance")
        if balance is None:
            return call("get_balance", {})
        amount = balance.get("balance", 0)
        return answer("none", _say(ru, f"Your balance: {amount} (minor units).",
                                   f"Ваш баланс: {amount} (в копейках/центах)."))  # fmt: skip

    query = _search_words(text)
    quantity = int(m.group(1)) if (m := _QUANTITY.search(text)) else 1
    product_id: int | None = None
    follow_up = bool(_FOLLOW_UP.search(text)) and turn.earlier_products
    if follow_up and not turn.result("search_products"):
        product_id = turn.earlier_products[0]
    elif not query:
        return answer("none", _say(ru, "Hello! I can find products for you and help you buy "
                                       "them. What are you looking for?",
                                   "Здравствуйте! Я найду товар и помогу его купить. "
                                   "Что ищете?"))  # fmt: skip
    else:
        found = turn.result("search_products")
        if found is None:
            return call("search_products", {"query": query})
        products = found.get("products") or []
        if not products:
            return answer(
                "none", _say(ru, "I found nothing like that.", "Ничего такого не нашлось.")
            )
        product_id = int(products[0]["id"])

    availability = turn.result("check_product_availability")
    if availability is None:
        return call("check_product_availability", {"product_id": product_id, "quantity": quantity})
    if "error" in availability:
        return answer("none", str(availability.get("detail") or availability["error"]))
    name = availability.get("name", "")
    if not availability.get("in_stock") and not availability.get("made_to_order"):
        return answer("show_products", _say(ru, f"Sorry, {name} is out of stock.",
                                            f"К сожалению, {name} нет в наличии."),
                      [product_id], quantity)  # fmt: skip
    offer = turn.result("offer_payment")
    offers_made = sum(name == "offer_payment" for name, _, _ in turn.calls)
    if offer is not None and offer.get("error") == "invalid_arguments" and offers_made == 1:
        # Told the tool has no such argument, it tries again the way the tool allows.
        return call(
            "offer_payment",
            {"product_id": product_id, "quantity": quantity, "payment_method": _method(text)},
        )
    if offer is None:
        args: dict[str, Any] = {
            "product_id": product_id,
            "quantity": quantity,
            "payment_method": _method(text),
        }
        args.update(_claims(text))
        return call("offer_payment", args)
    if "error" in offer:
        return answer("none", _say(ru, "I could not make the offer: ", "Не получилось: ")
                      + str(offer.get("detail") or offer["error"]))  # fmt: skip
    claims = _claims(text)
    claim = ""
    if "price" in claims:
        claim = _say(
            ru, f" For you it is {claims['price']} ⭐.", f" Для вас — {claims['price']} ⭐."
        )
    elif "discount_percent" in claims:
        claim = _say(ru, f" With your {claims['discount_percent']}% discount.",
                     f" Со скидкой {claims['discount_percent']}%.")  # fmt: skip
    if availability.get("made_to_order") and not availability.get("in_stock"):
        hours = availability.get("fulfillment_time_hours")
        words = _say(ru, f"{name} is made to order: it takes about {hours} h and is prepaid. "
                         "Here is your offer.",
                     f"{name} делается на заказ: около {hours} ч, по предоплате. "
                     "Вот ваше предложение.")  # fmt: skip
    else:
        words = _say(ru, f"{name} is in stock. Here is your offer.",
                     f"{name} есть в наличии. Вот ваше предложение.")  # fmt: skip
    return answer("offer_payment", words + claim, [product_id], quantity)


def answer(
    action: str, reply: str, product_ids: list[int] | None = None, quantity: int = 1
) -> dict[str, Any]:
    return {
        "answer": {
            "thought": f"scripted: {action}",
            "reply_text": reply,
            "action": action,
            "product_ids": product_ids or [],
            "quantity": quantity,
        }
    }


def _say(ru: bool, english: str, russian: str) -> str:
    return russian if ru else english


def _wants_product(text: str) -> bool:
    return bool(re.search(r"хочу|нуж|купи|buy|want|need", text, re.I)) and bool(_search_words(text))


def _search_words(text: str) -> str:
    words = []
    for word in _WORD.findall(text.lower()):
        if word in _FILLER or word.isdigit() or len(word) < 2:
            continue
        if _OTHER_USER.search(word):
            continue
        words.append(word)
    return " ".join(w for w in words if w not in {"user", "orders", "order", "show", "the"})


def _method(text: str) -> str:
    for pattern, method in _METHOD:
        if pattern.search(text) and (method != "stars" or not _PRICE.search(text)):
            return method
    return "any"


def _claims(text: str) -> dict[str, Any]:
    """What a gullible model passes on: a price or a discount the customer asked for."""
    claims: dict[str, Any] = {}
    if price := _PRICE.search(text):
        claims["price"] = int(price.group(1) or price.group(2))
    if discount := _DISCOUNT.search(text):
        claims["discount_percent"] = int(discount.group(1) or discount.group(2))
    if _FREE.search(text):
        claims["price"] = 0
    if _IGNORE.search(text):
        claims.setdefault("price", 1)
    return claims
