"""Saved histories of real orders replay against today's workflow code.

A change that makes VideoOrderWorkflow or PurchaseWorkflow (files named `purchase_*`) issue
different commands for the same events would
break every order in flight when deployed; replay catches it before then. Regenerate a
history only for a deliberate, versioned change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from workflows.purchase import PurchaseWorkflow
from workflows.video_order import VideoOrderWorkflow

HISTORIES = {
    p.stem: p.read_text() for p in sorted((Path(__file__).parent / "histories").glob("*.json"))
}


def test_there_are_histories_to_replay() -> None:
    purchases = [name for name in HISTORIES if name.startswith("purchase_")]
    assert len(HISTORIES) - len(purchases) >= 3 and len(purchases) >= 3


@pytest.mark.parametrize("name", sorted(HISTORIES))
async def test_history_replays(name: str) -> None:
    kind = "purchase" if name.startswith("purchase_") else "video-order"
    history = WorkflowHistory.from_json(f"{kind}:{name}", HISTORIES[name])
    replayer = Replayer(workflows=[VideoOrderWorkflow, PurchaseWorkflow])
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
