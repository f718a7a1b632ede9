"""Saved histories of real orders replay against today's workflow code.

A change that makes VideoOrderWorkflow, PurchaseWorkflow (files named `purchase_*`) or
ChatWorkflow (`chat_*`) issue different commands for the same events would
break every order in flight when deployed; replay catches it before then. Regenerate a
history only for a deliberate, versioned change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.chat import ChatWorkflow
from workflows.purchase import PurchaseWorkflow
from workflows.video_order import VideoOrderWorkflow

HISTORIES = {
    p.stem: p.read_text() for p in sorted((Path(__file__).parent / "histories").glob("*.json"))
}


KINDS = {"purchase_": "purchase", "chat_": "chat"}


def _kind(name: str) -> str:
    return next((kind for prefix, kind in KINDS.items() if name.startswith(prefix)), "video-order")


def test_there_are_histories_to_replay() -> None:
    kinds = [_kind(name) for name in HISTORIES]
    assert kinds.count("video-order") >= 3 and kinds.count("purchase") >= 3
    assert kinds.count("chat") >= 2


@pytest.mark.parametrize("name", sorted(HISTORIES))
async def test_history_replays(name: str) -> None:
    history = WorkflowHistory.from_json(f"{_kind(name)}:{name}", HISTORIES[name])
    replayer = Replayer(workflows=[VideoOrderWorkflow, PurchaseWorkflow, ChatWorkflow])
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
