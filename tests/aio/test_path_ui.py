"""Path switches reach the page (issue 17): a PathChanged event becomes a ``path_changed`` UI
message with both names, a re-nomination on the same path does not, and the page handles it."""

from __future__ import annotations

from pathlib import Path

from p2plab.aio.hub import ui_message
from p2plab.core import events as ev


def test_a_switch_of_path_is_a_ui_message_with_both_names() -> None:
    up = ev.PathChanged(
        ("198.51.100.2", 4000), ("turn-udp|203.0.113.9", 5000), "direct", "turn-udp"
    )
    msg = ui_message(up)
    assert msg is not None
    assert (msg["type"], msg["path"], msg["previous"]) == ("path_changed", "direct", "turn-udp")
    assert isinstance(msg["ts"], float)
    rebind = ev.PathChanged(("198.51.100.2", 4001), ("198.51.100.2", 4000), "direct", "direct")
    assert ui_message(rebind) is None  # a NAT rebinding is not a change of path


def test_the_page_shows_path_changes_and_the_new_names() -> None:
    page = (Path(__file__).parents[2] / "web" / "index.html").read_text()
    assert 'case "path_changed": return onPathChanged(m);' in page
    for name in ("turn-udp", "turn-tcp", '"relay"'):
        assert name in page
    # Wherever the page tests for the old path name it tests for the new one first.
    assert page.count('path === "relayed"') == page.count('path === "relay" ||')
