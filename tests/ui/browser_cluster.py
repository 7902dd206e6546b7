"""Real rendezvous and worker processes for the browser tests (``tests/ui/test_browser.py``)."""

from __future__ import annotations

import uuid

from tests.procs import Proc, start_rendezvous, start_worker, status, ui_page_url, wait_until

__all__ = ["Cluster"]


class Cluster:
    """A rendezvous (with STUN) and two workers A and B connected to each other."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.a_id = str(uuid.uuid4())
        self.b_id = str(uuid.uuid4())
        rv, self.rv_port, self.stun_port = start_rendezvous()
        self.procs.append(rv)
        self.a, self.a_http = start_worker(
            self.rv_port, self.stun_port, "ui-worker-a", ["--id", self.a_id]
        )
        self.procs.append(self.a)
        self.b, self.b_http = start_worker(
            self.rv_port, self.stun_port, "ui-worker-b", ["--id", self.b_id]
        )
        self.procs.append(self.b)
        for port, peer, proc in (
            (self.a_http, self.b_id, self.a),
            (self.b_http, self.a_id, self.b),
        ):
            wait_until(
                lambda port=port, peer=peer: (
                    status(port)["state"] == "connected"
                    and (status(port)["peer"] or {}).get("worker_id") == peer
                ),
                20,
                f"{proc.name} connected",
                proc,
            )

    def url(self, http_port: int) -> str:
        """The worker's page with its token, as the worker prints it."""
        return ui_page_url(http_port)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
