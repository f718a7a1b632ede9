"""Telegram Stars: invoice links, the pre-checkout handshake, charges and refunds.

Paying an invoice link runs Telegram's handshake: a `pre_checkout_query` update goes to the
bot, and only if the bot answers ok within `telegram_precheckout_timeout_seconds` (10 s at
Telegram) is the user charged, which the bot learns from a `successful_payment` message in
the payer's private chat. Each charge can be refunded once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from sandbox.store import JsonStore
from sandbox.telegram_chats import QUERY_EXPIRED, Method, TelegramChats
from sandbox.telegram_params import Params, bad_request
from sandbox.telegram_updates import TelegramUpdates


class TelegramStars:
    def __init__(
        self,
        store: JsonStore,
        chats: TelegramChats,
        updates: TelegramUpdates,
        checkout_timeout: float,
    ) -> None:
        self.store = store
        self._chats = chats
        self._updates = updates
        self._checkout_timeout = checkout_timeout
        self._invoices = store.collection("invoices")
        self._charges = store.collection("charges")
        self._refunds = store.collection("refunds")
        # Pre-checkout query id -> the bot's answer (ok, error_message), while a payer waits.
        self._checkouts: dict[str, asyncio.Future[tuple[bool, str | None]]] = {}

    def methods(self) -> dict[str, Method]:
        return {
            "createInvoiceLink": self._create_invoice_link,
            "answerPreCheckoutQuery": self._answer_pre_checkout_query,
            "refundStarPayment": self._refund_star_payment,
            "getStarTransactions": self._get_star_transactions,
        }

    async def _create_invoice_link(self, p: Params) -> str:
        title = p.text("title", required=True) or ""
        description = p.text("description", required=True) or ""
        payload = p.text("payload", required=True) or ""
        currency = p.text("currency", required=True)
        if not 1 <= len(title) <= 32:
            raise bad_request("TITLE_INVALID")
        if not 1 <= len(description) <= 255:
            raise bad_request("DESCRIPTION_INVALID")
        if not 1 <= len(payload.encode()) <= 128:
            raise bad_request("INVOICE_PAYLOAD_INVALID")
        if currency != "XTR":
            raise bad_request("CURRENCY_INVALID: the sandbox sells in Telegram Stars (XTR) only")
        if p.text("provider_token"):
            raise bad_request("PAYMENT_PROVIDER_INVALID")
        prices = p.parsed("prices")
        if not (
            isinstance(prices, list)
            and len(prices) == 1
            and isinstance(prices[0], dict)
            and isinstance(prices[0].get("label"), str)
            and isinstance(prices[0].get("amount"), int)
            and prices[0]["amount"] > 0
        ):
            # Stars invoices take exactly one price, a whole positive number of Stars.
            raise bad_request("STARS_INVOICE_INVALID")
        slug = secrets.token_urlsafe(18)
        self._invoices[slug] = {
            "slug": slug,
            "link": f"https://t.me/${slug}",
            "title": title,
            "description": description,
            "payload": payload,
            "currency": currency,
            "amount": prices[0]["amount"],
            "prices": prices,
            "created": int(time.time()),
            "charges": [],
            "attempts": [],
        }
        self.store.save()
        return f"https://t.me/${slug}"

    async def pay(
        self, slug: str, user_id: int, delay: float = 0.0, **names: str | None
    ) -> dict[str, Any]:
        """A user pays an invoice link: the pre-checkout handshake, then the payment or not.

        `delay` holds the payment that long after the bot's ok (Telegram's payment step can
        take a while), so a test can make it arrive after the order stopped waiting.

        Raises KeyError for an unknown slug. Links stay payable, as at Telegram: paying twice
        makes two charges (the bot must dedupe by invoice payload).
        """
        invoice = self._invoices[slug]
        user = self._chats.user(user_id, **names)
        chat = self._chats.chat(user_id)
        query_id = str(secrets.randbits(62))
        answer: asyncio.Future[tuple[bool, str | None]] = asyncio.get_running_loop().create_future()
        self._checkouts[query_id] = answer
        query = {
            "id": query_id,
            "from": user,
            "currency": invoice["currency"],
            "total_amount": invoice["amount"],
            "invoice_payload": invoice["payload"],
        }
        update_ids = [self._updates.push("pre_checkout_query", query, user_id)]
        outcome: dict[str, Any]
        try:
            async with asyncio.timeout(self._checkout_timeout):
                ok, error_message = await answer
        except TimeoutError:
            outcome = {"status": "timeout", "error_message": "the bot did not answer in time"}
        else:
            if ok:
                await asyncio.sleep(delay)
                charge_id = "stxSandbox" + secrets.token_urlsafe(24)
                payment = {
                    "currency": invoice["currency"],
                    "total_amount": invoice["amount"],
                    "invoice_payload": invoice["payload"],
                    "telegram_payment_charge_id": charge_id,
                    "provider_payment_charge_id": "",
                }
                self._charges[charge_id] = {
                    "telegram_payment_charge_id": charge_id,
                    "slug": slug,
                    "user_id": user_id,
                    "amount": invoice["amount"],
                    "currency": invoice["currency"],
                    "invoice_payload": invoice["payload"],
                    "date": int(time.time()),
                    "refunded": False,
                }
                invoice["charges"].append(charge_id)
                record = self._chats.add_message(chat, from_bot=False, successful_payment=payment)
                message = self._chats.wire(chat, record)
                update_ids.append(self._updates.push("message", message, user_id))
                outcome = {"status": "paid", "telegram_payment_charge_id": charge_id}
            else:
                outcome = {"status": "declined", "error_message": error_message}
        finally:
            self._checkouts.pop(query_id, None)
        invoice["attempts"].append({"user_id": user_id, "date": int(time.time()), **outcome})
        self.store.save()
        return {**outcome, "update_ids": update_ids}

    async def _answer_pre_checkout_query(self, p: Params) -> bool:
        query_id = p.text("pre_checkout_query_id", required=True) or ""
        if p.text("ok") is None:
            raise bad_request("ok is empty")
        ok = p.flag("ok")
        error_message = p.text("error_message")
        if not ok and not error_message:
            raise bad_request("ERROR_MESSAGE_EMPTY")
        answer = self._checkouts.get(query_id)
        if answer is None or answer.done():
            raise bad_request(QUERY_EXPIRED)
        answer.set_result((ok, None if ok else error_message))
        return True

    async def _refund_star_payment(self, p: Params) -> bool:
        user_id = p.integer("user_id", required=True)
        charge = self._charges.get(p.text("telegram_payment_charge_id", required=True) or "")
        if charge is None or charge["user_id"] != user_id:
            raise bad_request("CHARGE_NOT_FOUND")
        if charge["refunded"]:
            raise bad_request("CHARGE_ALREADY_REFUNDED")
        charge["refunded"] = True
        charge_id = charge["telegram_payment_charge_id"]
        self._refunds[charge_id] = {
            "user_id": user_id,
            "charge_id": charge_id,
            "amount": charge["amount"],
            "currency": charge["currency"],
            "invoice_payload": charge["invoice_payload"],
            "date": int(time.time()),
        }
        self.store.save()
        return True

    async def _get_star_transactions(self, p: Params) -> dict[str, Any]:
        offset = max(p.integer("offset") or 0, 0)
        limit = min(max(p.integer("limit") or 100, 1), 100)
        transactions = []
        for charge in self._charges.values():
            source = self._partner(charge["user_id"])
            source["invoice_payload"] = charge["invoice_payload"]
            transactions.append(
                {
                    "id": charge["telegram_payment_charge_id"],
                    "amount": charge["amount"],
                    "date": charge["date"],
                    "source": source,
                }
            )
        for refund in self._refunds.values():
            transactions.append(
                {
                    "id": refund["charge_id"],
                    "amount": refund["amount"],
                    "date": refund["date"],
                    "receiver": self._partner(refund["user_id"]),
                }
            )
        transactions.sort(key=lambda t: t["date"])
        return {"transactions": transactions[offset : offset + limit]}

    def _partner(self, user_id: int) -> dict[str, Any]:
        user = self._chats.users[str(user_id)]
        return {"type": "user", "transaction_type": "invoice_payment", "user": user}

    def invoice(self, slug: str) -> dict[str, Any]:
        """Raises KeyError for an unknown slug."""
        invoice = self._invoices[slug]
        charges = [self._charges[c] for c in invoice["charges"]]
        return {**invoice, "paid": bool(charges), "charges": charges}

    def refunds(self) -> list[dict[str, Any]]:
        return sorted(self._refunds.values(), key=lambda r: r["date"])
