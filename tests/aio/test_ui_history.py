"""The worker's UI history (``p2plab.aio.hub.UiHistory``): what a page that connects is given."""

from __future__ import annotations

from typing import Any

from p2plab.aio.hub import CHAT_HISTORY, RESULT_HISTORY, EventHub, UiHistory


def chat(i: int, direction: str = "out") -> dict[str, Any]:
    return {"type": "chat", "direction": direction, "from": "w", "id": f"{i:016x}", "text": str(i)}


def result(run: int, role: str) -> dict[str, Any]:
    return {"type": "benchmark_result", "run_id": str(run), "role": role, "mbps": 1.0}


def test_history_keeps_the_last_chat_messages_and_result_rows_in_order() -> None:
    h = UiHistory()
    for i in range(CHAT_HISTORY + 25):
        h.remember(chat(i))
    for run in range(RESULT_HISTORY):
        h.remember(result(run, "sender"))
        h.remember(result(run, "receiver"))
    msgs = h.messages()
    chats = [m for m in msgs if m["type"] == "chat"]
    rows = [m for m in msgs if m["type"] == "benchmark_result"]
    assert [m["text"] for m in chats] == [str(i) for i in range(25, CHAT_HISTORY + 25)]
    assert len(rows) == RESULT_HISTORY
    # the newest rows are kept, oldest first
    assert (rows[-1]["run_id"], rows[-1]["role"]) == (str(RESULT_HISTORY - 1), "receiver")
    assert (rows[0]["run_id"], rows[0]["role"]) == (str(RESULT_HISTORY // 2), "sender")
    assert msgs == chats + rows


def test_delivery_and_failure_are_replayed_with_the_message() -> None:
    h = UiHistory(chat_limit=3, result_limit=2)
    h.remember(chat(1))
    h.remember(chat(2))
    h.remember(chat(3, "in"))
    h.remember({"type": "chat_delivered", "id": f"{1:016x}"})
    h.remember({"type": "chat_failed", "id": f"{2:016x}", "reason": "timeout"})
    h.remember({"type": "status", "state": "connected"})  # not history
    h.remember({"type": "benchmark_progress", "run_id": "1"})  # not history
    h.remember({"type": "chat", "direction": "out", "text": "no id"})  # cannot be deduplicated
    msgs = h.messages()
    assert [m["type"] for m in msgs] == ["chat", "chat", "chat_failed", "chat"]
    assert msgs[0]["delivered"] is True and "delivered" not in msgs[1]
    assert msgs[2] == {"type": "chat_failed", "id": f"{2:016x}", "reason": "timeout"}
    # a message pushed out of the bound takes its failure with it
    h.remember(chat(4))
    h.remember(chat(5))
    assert [m["id"] for m in h.messages()] == [f"{3:016x}", f"{4:016x}", f"{5:016x}"]
    # the replay is a copy: a page cannot change the history
    h.messages()[0]["text"] = "changed"
    assert h.messages()[0]["text"] == "3"


def test_hub_remembers_what_it_publishes() -> None:
    hub = EventHub()
    hub.publish(chat(7))
    hub.publish(result(1, "sender"))
    hub.publish({"type": "status"})
    assert [m["type"] for m in hub.ui_history()] == ["chat", "benchmark_result"]


def test_ui_ws_sends_status_then_the_history_then_serves_as_before() -> None:
    from fastapi.testclient import TestClient

    from p2plab.aio.ui_auth import UiGuard
    from p2plab.aio.ui_server import create_worker_app

    class Worker:
        worker_id = "w"

        def __init__(self) -> None:
            self.hub = EventHub()

        def status(self) -> dict[str, Any]:
            return {"type": "status", "state": "connected"}

        def ui_subscribe(self) -> Any:
            return self.hub.ui_subscribe()

        def ui_unsubscribe(self, q: Any) -> None:
            self.hub.ui_unsubscribe(q)

        def ui_history(self) -> list[dict[str, Any]]:
            return self.hub.ui_history()

    worker = Worker()
    worker.hub.publish(chat(1))
    worker.hub.publish({"type": "chat_delivered", "id": f"{1:016x}"})
    worker.hub.publish(result(9, "sender"))
    guard = UiGuard("history-test-token-0123", "127.0.0.1", 8080, ("testserver",))
    app = create_worker_app(worker, guard)  # type: ignore[arg-type]
    with TestClient(app, headers={"Authorization": "Bearer history-test-token-0123"}) as client:
        with client.websocket_connect("/ui_ws") as ws:
            assert ws.receive_json()["type"] == "status"
            first = ws.receive_json()
            assert first["id"] == f"{1:016x}" and first["delivered"] is True
            assert ws.receive_json() == {"type": "benchmark_result", **result(9, "sender")}
            ws.send_json({"type": "status"})  # the connection goes on as before
            assert ws.receive_json()["type"] == "status"
