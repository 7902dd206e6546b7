"""The names of a :class:`~p2plab.core.session.PeerSession`'s counters (``session.stats``).

One table, so that the session, its intake (:mod:`p2plab.core.session_intake`), its reliable
stream (:mod:`p2plab.core.reliable`) and the worker's ``status`` all count under the same names,
and a new counter appears (at 0) in every status from the start.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SESSION_COUNTERS", "new_session_stats"]

SESSION_COUNTERS: Final = (
    "datagrams_in",
    "bytes_in",
    "datagrams_out",
    "bytes_out",
    "dropped_malformed",
    "dropped_unknown_type",
    "dropped_wrong_peer",
    "dropped_not_connected",
    "dropped_after_close",
    "dropped_out_of_window",
    "bench_ignored",
    "probes_sent",
    "probes_received",
    "probe_acks_received",
    "probe_acks_unmatched",
    "prflx_learned",
    "keepalives_sent",
    "keepalives_received",
    "keepalive_acks_received",
    "chats_sent",
    "chats_received",
    "controls_sent",
    "controls_received",
    "controls_malformed",
    "acks_sent",
    "acks_received",
    "retransmits",
    "duplicates",
    "delivered",
    "failed",
    "path_changes",
    "dropped_unauthenticated",
    "dropped_replayed",
    "unexpected_source",
    "peer_restarts",
    "candidates_dropped",
    "probe_budget_exhausted",
    "amplification_limited",
    "new_sessions_limited",
)
"""Every counter of a session, in the order ``status`` lists them."""


def new_session_stats() -> dict[str, int]:
    """A fresh counter table: every name of :data:`SESSION_COUNTERS` at 0."""
    return dict.fromkeys(SESSION_COUNTERS, 0)
