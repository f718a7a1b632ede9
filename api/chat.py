"""The sales assistant's chats as the API sees them: messages go to a chat's workflow by
signal-with-start, and operators reach the same workflow by update-with-start."""

from __future__ import annotations

import asyncio

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError
from api.orders import QUERY_TIMEOUT, unavailable
from api.shop import app_url, purchase_terms
from workers.settings import Settings
from workflows.chat import (
    ChatInput,
    ChatMessage,
    ChatTerms,
    ChatView,
    ChatWorkflow,
    OperatorReply,
    workflow_id,
)

# How long an operator's request waits for the chat's answer.
OPERATOR_WAIT_SECONDS = 30.0


def chat_terms(settings: Settings) -> ChatTerms:
    """What a chat keeps of the settings for its whole life."""
    return ChatTerms(
        max_tool_rounds=settings.assistant_max_tool_rounds,
        history_turns=settings.assistant_history_turns,
        max_history_events=settings.chat_max_history_events,
        operator_chat_id=settings.operator_chat_id,
        app_url=app_url(settings),
        purchase=purchase_terms(settings),
        model_patience_seconds=settings.assistant_model_patience_seconds,
    )


def _start(settings: Settings, chat_id: int) -> dict:
    return {
        "id": workflow_id(chat_id),
        "task_queue": settings.task_queue,
        # A chat that ended (idle for a week) starts again with the next message.
        "id_reuse_policy": WorkflowIDReusePolicy.ALLOW_DUPLICATE,
    }


async def send_message(
    client: Client, settings: Settings, chat_id: int, message: ChatMessage
) -> None:
    """Hands a customer's message to the chat's workflow, starting it if need be. The
    workflow drops an update id it has seen, so a redelivered update is harmless here."""
    try:
        await client.start_workflow(
            ChatWorkflow.run,
            ChatInput(chat_id=chat_id, terms=chat_terms(settings)),
            start_signal="message",
            start_signal_args=[message],
            **_start(settings, chat_id),
        )
    except RPCError as err:
        raise unavailable(err) from err  # a 5xx: Telegram delivers the update again


async def operator_reply(
    client: Client, settings: Settings, chat_id: int, reply: OperatorReply
) -> str:
    return await _update(client, settings, chat_id, ChatWorkflow.operator_reply, reply)


async def set_assistant(
    client: Client, settings: Settings, chat_id: int, enabled: bool
) -> ChatView:
    return await _update(client, settings, chat_id, ChatWorkflow.set_assistant, enabled)


async def _update(client: Client, settings: Settings, chat_id: int, update, arg):
    start = WithStartWorkflowOperation(
        ChatWorkflow.run,
        ChatInput(chat_id=chat_id, terms=chat_terms(settings)),
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        **_start(settings, chat_id),
    )
    try:
        return await asyncio.wait_for(
            client.execute_update_with_start_workflow(update, arg, start_workflow_operation=start),
            OPERATOR_WAIT_SECONDS,
        )
    except WorkflowUpdateFailedError as err:
        raise ApiError(422, "invalid_request", str(err.cause or err)) from err
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as err:
        raise ApiError(503, "chat_unavailable", "the chat is slow to answer; retry") from err
    except RPCError as err:
        raise unavailable(err) from err


async def read_chat(client: Client, chat_id: int) -> ChatView:
    handle: WorkflowHandle = client.get_workflow_handle_for(ChatWorkflow.run, workflow_id(chat_id))
    try:
        return await handle.query(ChatWorkflow.view, rpc_timeout=QUERY_TIMEOUT)
    except RPCError as err:
        if err.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            raise ApiError(404, "chat_not_found", f"no chat {chat_id}") from err
        raise unavailable(err) from err
