"""One Telegram chat with the shop's sales assistant (`chat:<chat_id>`).

The webhook signal-with-starts this workflow for every text message. Messages are answered
one at a time, in the order of their update ids, each update id once; a message that comes
while the model is thinking waits its turn. Each model call and each tool call is an
activity; the model only reads the shop through its tools and changes it only by asking for
an offer, which this workflow places as a purchase workflow (payment method `choice`, stock
held) and composes itself from the order's own figures, with buttons for each way to pay.
Whatever the model writes, the price on those buttons is the database's.

The workflow continues as new before its history grows large: it answers the messages that
are waiting first (a bounded number), and carries the rest, a bounded transcript, the update
ids it has seen lately and whether the assistant is on for this chat.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.assistant import (
        Answer,
        AssistantActivities,
        ModelTurn,
        Step,
        ThinkRequest,
        ToolRequest,
        check_args,
    )
    from activities.telegram import Button, MessageRequest, TelegramActivities
    from workflows import search_attributes as sa
    from workflows.purchase import (
        CHOICE,
        OFFER_PLACED_SIGNAL,
        ORDER_KIND,
        TELEGRAM_RETRY,
        PurchaseTerms,
        PurchaseView,
        PurchaseWorkflow,
        format_money,
    )
    from workflows.purchase import workflow_id as purchase_workflow_id

WORKFLOW_ID_PREFIX = "chat:"
# Update ids remembered across runs: Telegram redelivers an update within minutes.
SEEN_KEPT = 500
REPLIES_KEPT = 100
# Every model call carries the transcript, so a chat of long messages grows its history by
# bytes sooner than by events: it continues as new past this size too.
MAX_HISTORY_BYTES = 2 * 1024 * 1024
# What the model reads of one message (Telegram allows 4096 characters).
MAX_MESSAGE_CHARS = 2000
# Messages waiting for an answer at most; a flood past it is dropped (each update still
# counts as seen), so a chat's state stays far inside Temporal's payload limit.
MAX_PENDING = 20
# Tool calls of one model turn that run; the rest are answered "too many" unrun.
MAX_CALLS_PER_TURN = 5
# Changes of the commands a chat issues, for the runs that started before them.
BOUNDED_CALLS = "bounded-calls-per-turn"
RECHECK_ASSISTANT = "assistant-off-mid-answer"
# Messages answered after continue-as-new fell due, before the rest are carried over.
DRAIN_AT_MOST = 5
# A chat with the assistant on and nothing to say for this long ends; the next message
# starts it again (with an empty transcript).
IDLE_END = timedelta(days=7)
MODEL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=20),
    non_retryable_error_types=["GeminiRefused"],
)
TOOL_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
)
TOOL_PATIENCE = timedelta(seconds=30)
# Placing an offer: stock claimed and the order row written by the purchase workflow
# (which gives its database call two minutes), and its signal back.
OFFER_PATIENCE = timedelta(minutes=3)
SEND_PATIENCE = timedelta(minutes=30)

_CYRILLIC = re.compile(r"[\u0400-\u04ff]")

WORDS = {
    "en": {
        "fallback": "Sorry, I cannot answer right now. You can browse the catalog and buy "
        "in the shop:",
        "shop": "Open the shop",
        "operator_on": "An operator will answer you here soon. Write /start to browse the "
        "shop meanwhile.",
        "offer_instant": "Reserved for you until {until}.",
        "offer_prepaid": "Made to order: prepaid, delivered within {hours} h of payment "
        "(or your money back).",
        "offer_head": "Your offer: {name} x {quantity}\nPrice: {money} or {stars} ⭐",
        "pay_stars": "Pay {stars} ⭐",
        "pay_card": "Pay by card, {money}",
        "pay_balance": "Pay from balance, {money}",
        "tools_exhausted": "I could not finish that. Please put it another way, or browse "
        "the catalog:",
    },
    "ru": {
        "fallback": "Извините, сейчас я не могу ответить. Каталог и покупки — в магазине:",
        "shop": "Открыть магазин",
        "operator_on": "Оператор скоро ответит вам здесь. А пока можно посмотреть магазин: /start.",
        "offer_instant": "Зарезервировано для вас до {until}.",
        "offer_prepaid": "Изготовление на заказ: предоплата, доставка в течение {hours} ч "
        "после оплаты (или возврат денег).",
        "offer_head": "Ваше предложение: {name} x {quantity}\nЦена: {money} или {stars} ⭐",
        "pay_stars": "Оплатить {stars} ⭐",
        "pay_card": "Оплатить картой, {money}",
        "pay_balance": "Оплатить с баланса, {money}",
        "tools_exhausted": "Не получилось. Сформулируйте иначе или посмотрите каталог:",
    },
}


def workflow_id(chat_id: int) -> str:
    return f"{WORKFLOW_ID_PREFIX}{chat_id}"


def language(text: str) -> str:
    return "ru" if _CYRILLIC.search(text) else "en"


def pay_callback(order_id: str, method: str) -> str:
    """An offer button's callback data (at most 64 bytes, as Telegram allows)."""
    return f"pay:{order_id}:{method}"


@dataclass
class ChatMessage:
    update_id: int
    text: str
    user_id: int
    first_name: str = ""


@dataclass
class Turn:
    role: str  # user | model (the final answer as JSON) | shop (an operator's words)
    text: str


@dataclass
class ChatTerms:
    """The settings a chat keeps for its whole life (carried over continue-as-new)."""

    max_tool_rounds: int
    history_turns: int
    max_history_events: int
    operator_chat_id: int | None
    app_url: str
    purchase: PurchaseTerms
    # A model call is retried as Gemini asks (429 retryDelay, 5xx) for at most this long
    # before the customer gets the plain answer.
    model_patience_seconds: float = 90.0


@dataclass
class ChatStats:
    answered: int = 0
    model_calls: int = 0
    cached_tokens: int = 0
    fallbacks: int = 0
    offers: int = 0
    runs: int = 1


@dataclass
class ChatInput:
    chat_id: int
    terms: ChatTerms
    transcript: list[Turn] = field(default_factory=list)
    pending: list[ChatMessage] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    assistant_enabled: bool = True
    stats: ChatStats = field(default_factory=ChatStats)
    replies: dict[str, str] = field(default_factory=dict)


@dataclass
class OperatorReply:
    reply_id: str  # the same reply twice sends once
    text: str


@dataclass
class ChatView:
    chat_id: int
    assistant_enabled: bool
    pending: int
    transcript: list[Turn]
    stats: ChatStats
    offers: list[str]  # order ids offered in this run


@workflow.defn
class ChatWorkflow:
    @workflow.init
    def __init__(self, inp: ChatInput) -> None:
        self._in = inp
        self._terms = inp.terms
        self._transcript = list(inp.transcript)
        self._pending = list(inp.pending)
        self._seen = list(inp.seen)
        self._seen_set = set(self._seen)
        self._enabled = inp.assistant_enabled
        self._stats = inp.stats
        self._placed: dict[str, PurchaseView | None] = {}
        # Operators' reply ids and their outcomes, the latest kept across runs.
        self._replies: dict[str, str] = dict(inp.replies)

    # --- messages ---------------------------------------------------------------------

    @workflow.signal
    def message(self, msg: ChatMessage) -> None:
        if msg.update_id in self._seen_set:
            return  # Telegram delivered this update again: it acts once
        self._remember(msg.update_id)
        if len(self._pending) >= MAX_PENDING:
            workflow.logger.warning(
                "chat %s: %s messages wait already; update %s dropped",
                self._in.chat_id, len(self._pending), msg.update_id,
            )  # fmt: skip
            return
        msg = replace(msg, text=msg.text.strip()[:MAX_MESSAGE_CHARS])
        # In update-id order: two webhook requests may signal out of order.
        at = len(self._pending)
        while at > 0 and self._pending[at - 1].update_id > msg.update_id:
            at -= 1
        self._pending.insert(at, msg)

    @workflow.signal(name=OFFER_PLACED_SIGNAL)
    def offer_placed(self, view: PurchaseView) -> None:
        if view.order_id in self._placed:
            self._placed[view.order_id] = view

    @workflow.update
    async def operator_reply(self, reply: OperatorReply) -> str:
        """The shop answers as itself (an operator); 'sent' or 'blocked'."""
        if reply.reply_id in self._replies:
            # The same request again (a retry): the first one's outcome, once it is known.
            await workflow.wait_condition(lambda: self._replies[reply.reply_id] != "sending")
            return self._replies[reply.reply_id]
        self._replies[reply.reply_id] = "sending"
        outcome = await self._send(reply.text, [])
        self._replies[reply.reply_id] = outcome
        self._add_turn(Turn("shop", reply.text))
        return outcome

    @operator_reply.validator
    def _check_reply(self, reply: OperatorReply) -> None:
        if not reply.text.strip():
            raise ValueError("the reply is empty")

    @workflow.update
    def set_assistant(self, enabled: bool) -> ChatView:
        self._enabled = enabled
        return self.view()

    @workflow.query
    def view(self) -> ChatView:
        return ChatView(
            chat_id=self._in.chat_id,
            assistant_enabled=self._enabled,
            pending=len(self._pending),
            transcript=list(self._transcript),
            stats=self._stats,
            offers=list(self._placed),
        )

    # --- the flow ---------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: ChatInput) -> ChatView:
        drained = 0
        while True:
            try:
                await workflow.wait_condition(lambda: bool(self._pending), timeout=IDLE_END)
            except TimeoutError:
                if self._enabled:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    if not self._pending:
                        return self.view()
                continue
            if self._history_large():
                if drained >= DRAIN_AT_MOST:
                    await self._continue_as_new()
                drained += 1
            await self._answer(self._pending.pop(0))
            if self._history_large() and not self._pending:
                await self._continue_as_new()

    def _history_large(self) -> bool:
        info = workflow.info()
        return (
            info.get_current_history_length() >= self._terms.max_history_events
            or info.get_current_history_size() >= MAX_HISTORY_BYTES
            or info.is_continue_as_new_suggested()
        )

    async def _continue_as_new(self) -> None:
        # An operator's reply being sent finishes first; messages that arrive meanwhile
        # land in `pending`, which goes over with everything else.
        await workflow.wait_condition(workflow.all_handlers_finished)
        self._stats.runs += 1
        workflow.continue_as_new(
            ChatInput(
                chat_id=self._in.chat_id,
                terms=self._terms,
                transcript=self._transcript,
                pending=self._pending,
                seen=self._seen,
                assistant_enabled=self._enabled,
                stats=self._stats,
                replies=dict(list(self._replies.items())[-REPLIES_KEPT:]),
            )
        )

    async def _answer(self, msg: ChatMessage) -> None:
        text = msg.text.strip()[:MAX_MESSAGE_CHARS]
        lang = language(text)
        command = text.split(maxsplit=1)[0].split("@")[0].lower() if text else ""
        if command == "/operator":
            await self._hand_off(msg, lang, asked=True)
            return
        if not self._enabled:
            await self._tell_operators(f"Chat {self._in.chat_id} ({msg.first_name}): {text}")
            self._add_turn(Turn("user", text))
            return
        self._add_turn(Turn("user", text))
        # The conversation starts with the customer (the oldest turns were dropped).
        turns = list(self._transcript)
        while turns and turns[0].role != "user":
            turns.pop(0)
        steps = [Step(role=_step_role(t), text=t.text) for t in turns]
        offer: PurchaseView | None = None
        answer: Answer | None = None
        exhausted = False
        rounds = self._terms.max_tool_rounds
        for round_no in range(rounds + 1):
            turn = await self._think(msg, steps, round_no, final=round_no == rounds)
            if turn is None:
                break
            if turn.answer is not None:
                answer = turn.answer
                break
            if round_no == rounds:
                exhausted = True
                break
            for call in turn.calls:
                steps.append(
                    Step("model", name=call.name, args=call.args, signature=call.signature)
                )
            bounded = len(turn.calls) > MAX_CALLS_PER_TURN and workflow.patched(BOUNDED_CALLS)
            for i, call in enumerate(turn.calls):
                if bounded and i >= MAX_CALLS_PER_TURN:
                    result, placed = {
                        "error": "too_many_calls",
                        "detail": f"At most {MAX_CALLS_PER_TURN} tool calls run per turn.",
                    }, None
                else:
                    result, placed = await self._tool(call.name, call.args, msg, offer)
                offer = offer or placed
                steps.append(Step("tool", name=call.name, result=result))
        if not self._enabled and workflow.patched(RECHECK_ASSISTANT):
            # An operator took the chat while the model was thinking: the operator answers.
            await self._tell_operators(f"Chat {self._in.chat_id} ({msg.first_name}): {text}")
            return
        if answer is None:
            self._stats.fallbacks += 1
            words = WORDS[lang]["tools_exhausted" if exhausted else "fallback"]
            await self._send(words, [self._shop_button(lang)])
            if offer is not None:
                await self._send_offer(offer, lang, "any")
            self._add_turn(Turn("model", json.dumps({"reply_text": words, "action": "none"})))
            self._stats.answered += 1
            return
        reply = answer.reply_text
        buttons = [self._shop_button(lang)] if answer.action == "show_products" else []
        if not reply and offer is None:
            # Nothing of the model's answer could be sent (blocked, or only prices).
            reply, buttons = WORDS[lang]["fallback"], [self._shop_button(lang)]
        if reply:
            await self._send(reply, buttons)
        if offer is not None:
            preferred = next(
                (str(s.args.get("payment_method")) for s in steps if s.name == "offer_payment"
                 and s.role == "model" and s.args),
                "any",
            )  # fmt: skip
            await self._send_offer(offer, lang, preferred)
        self._add_turn(
            Turn(
                "model",
                json.dumps(
                    {
                        "reply_text": reply,
                        "action": answer.action,
                        "product_ids": answer.product_ids,
                        "quantity": answer.quantity,
                    },
                    ensure_ascii=False,
                ),
            )
        )
        self._stats.answered += 1
        if answer.action == "handoff":
            await self._hand_off(msg, lang, asked=False)

    async def _think(
        self, msg: ChatMessage, steps: list[Step], round_no: int, final: bool
    ) -> ModelTurn | None:
        try:
            turn: ModelTurn = await workflow.execute_activity_method(
                AssistantActivities.think,
                ThinkRequest(
                    chat_id=self._in.chat_id,
                    steps=steps,
                    call_key=f"{workflow.info().workflow_id}:{msg.update_id}:{round_no}",
                    final=final,
                ),
                start_to_close_timeout=timedelta(seconds=65),
                schedule_to_close_timeout=timedelta(seconds=self._terms.model_patience_seconds),
                retry_policy=MODEL_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("chat %s: the model failed: %s", self._in.chat_id, err.cause)
            return None
        self._stats.model_calls += 1
        self._stats.cached_tokens += turn.cached_tokens
        return turn

    async def _tool(
        self, name: str, raw: dict[str, Any], msg: ChatMessage, offer: PurchaseView | None
    ) -> tuple[dict[str, Any], PurchaseView | None]:
        """A tool's result for the model, and the offer it placed (offer_payment only)."""
        try:
            args = check_args(name, raw)
        except ValueError as err:
            return {"error": "invalid_arguments", "detail": str(err)}, None
        if name == "offer_payment":
            if offer is not None:
                return {
                    "error": "offer_exists",
                    "detail": "One offer per message: the customer has it already.",
                }, None
            if any(view is None for view in self._placed.values()):
                return {
                    "error": "offer_pending",
                    "detail": "An offer is still being placed; ask the customer to wait.",
                }, None
            return await self._offer(args, msg)
        method: Callable = {
            "search_products": AssistantActivities.search_products,
            "check_product_availability": AssistantActivities.check_product_availability,
            "get_user_orders": AssistantActivities.get_user_orders,
            "get_balance": AssistantActivities.get_balance,
        }[name]
        try:
            result = await workflow.execute_activity_method(
                method,
                # The customer is the one who wrote, never whoever the model names.
                ToolRequest(telegram_id=msg.user_id, args=args),
                start_to_close_timeout=timedelta(seconds=20),
                schedule_to_close_timeout=TOOL_PATIENCE,
                retry_policy=TOOL_RETRY,
            )
        except ActivityError:
            return {"error": "unavailable", "detail": "The shop could not answer just now."}, None
        return result, None

    async def _offer(
        self, args: dict[str, Any], msg: ChatMessage
    ) -> tuple[dict[str, Any], PurchaseView | None]:
        """Places the order (stock held) through a purchase workflow of its own."""
        order_id = str(workflow.uuid4())
        self._placed[order_id] = None
        order = self._terms.purchase.order(
            order_id=order_id,
            telegram_id=msg.user_id,
            product_id=args["product_id"],
            quantity=args["quantity"],
            payment_method=CHOICE,
            notify_workflow_id=workflow.info().workflow_id,
        )
        await workflow.start_child_workflow(
            PurchaseWorkflow.run,
            order,
            id=purchase_workflow_id(order_id),
            # The order outlives this run of the chat (continue-as-new) and the chat itself.
            parent_close_policy=ParentClosePolicy.ABANDON,
            search_attributes=sa.order_attributes("placing", ORDER_KIND),
        )
        try:
            await workflow.wait_condition(
                lambda: self._placed[order_id] is not None, timeout=OFFER_PATIENCE
            )
        except TimeoutError:
            return {"error": "unavailable", "detail": "The order could not be placed yet."}, None
        view = self._placed[order_id]
        assert view is not None
        if view.error_code is not None:
            return {"error": view.error_code, "detail": view.error or ""}, None
        self._stats.offers += 1
        return {
            "offered": True,
            "product": view.product_name,
            "quantity": view.quantity,
            "order_type": view.order_type,
            "amount": view.amount,
            "currency": view.currency,
            "amount_stars": view.amount_stars,
            "reserved_until": view.reserved_until,
            "fulfillment_deadline": view.fulfillment_deadline,
            "note": "The shop shows the customer this offer with its payment buttons.",
        }, view

    async def _send_offer(self, view: PurchaseView, lang: str, preferred: str) -> None:
        """The payable offer: our words and the order's own figures, never the model's."""
        w = WORDS[lang]
        money = format_money(view.amount, view.currency)
        lines = [
            w["offer_head"].format(
                name=view.product_name, quantity=view.quantity, money=money,
                stars=view.amount_stars,
            )
        ]  # fmt: skip
        if view.order_type == "prepaid":
            hours = _hours_between(view.created_at, view.fulfillment_deadline)
            lines.append(w["offer_prepaid"].format(hours=hours))
        elif view.reserved_until:
            until = (
                datetime.fromisoformat(view.reserved_until)
                .astimezone(UTC)
                .strftime("%Y-%m-%d %H:%M UTC")
            )
            lines.append(w["offer_instant"].format(until=until))
        buttons = {
            "stars": Button(
                w["pay_stars"].format(stars=view.amount_stars),
                callback_data=pay_callback(view.order_id, "stars"),
            ),
            "stripe": Button(
                w["pay_card"].format(money=money),
                callback_data=pay_callback(view.order_id, "stripe"),
            ),
            "balance": Button(
                w["pay_balance"].format(money=money),
                callback_data=pay_callback(view.order_id, "balance"),
            ),
        }
        order = [preferred, *(m for m in buttons if m != preferred)]
        await self._send("\n".join(lines), [buttons[m] for m in order if m in buttons])

    async def _hand_off(self, msg: ChatMessage, lang: str, asked: bool) -> None:
        self._enabled = False
        await self._tell_operators(
            f"Chat {self._in.chat_id} ({msg.first_name or msg.user_id}) "
            + ("asks for an operator" if asked else "was handed over by the assistant")
            + f": {msg.text.strip()}\nAnswer with POST /api/admin/chats/{self._in.chat_id}/reply; "
            f"turn the assistant back on with POST /api/admin/chats/{self._in.chat_id}/assistant."
        )
        if asked:
            self._add_turn(Turn("user", msg.text.strip()))
            await self._send(WORDS[lang]["operator_on"], [])

    async def _tell_operators(self, text: str) -> None:
        chat = self._terms.operator_chat_id
        if chat is None:
            workflow.logger.info("no OPERATOR_CHAT_ID: %s", text)
            return
        await self._send(text, [], chat_id=chat)

    async def _send(self, text: str, buttons: list[Button], chat_id: int | None = None) -> str:
        try:
            return await workflow.execute_activity_method(
                TelegramActivities.send_message,
                MessageRequest(chat_id or self._in.chat_id, text, buttons),
                start_to_close_timeout=timedelta(seconds=20),
                schedule_to_close_timeout=SEND_PATIENCE,
                retry_policy=TELEGRAM_RETRY,
            )
        except ActivityError as err:
            workflow.logger.warning("chat %s: message lost: %s", self._in.chat_id, err.cause)
            return "failed"

    def _shop_button(self, lang: str) -> Button:
        return Button(WORDS[lang]["shop"], web_app_url=self._terms.app_url)

    def _add_turn(self, turn: Turn) -> None:
        self._transcript.append(turn)
        del self._transcript[: -self._terms.history_turns]

    def _remember(self, update_id: int) -> None:
        self._seen.append(update_id)
        self._seen_set.add(update_id)
        if len(self._seen) > SEEN_KEPT:
            for old in self._seen[:-SEEN_KEPT]:
                self._seen_set.discard(old)
            del self._seen[:-SEEN_KEPT]


def _step_role(turn: Turn) -> str:
    return "user" if turn.role == "user" else "model"


def _hours_between(start: str, end: str | None) -> int:
    if end is None:
        return 0
    seconds = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return max(1, round(seconds / 3600))
