"""Notebook helpers: a local lab in the notebook's own event loop, an ipywidgets chat panel, plots.

Imported lazily, so ``import p2plab.notebook`` costs nothing until a name is used::

    from p2plab.notebook import start_local_lab, ChatPanel, plot_throughput, plot_matrix

    lab = await start_local_lab()        # rendezvous + STUN + two connected workers, on loopback
    ChatPanel(lab.a)                     # chat and benchmark controls for worker A
    await lab.stop()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ChatPanel": "p2plab.notebook.panels",
    "LocalLab": "p2plab.notebook.local",
    "local_lab": "p2plab.notebook.local",
    "start_local_lab": "p2plab.notebook.local",
    "plot_loss": "p2plab.notebook.plotting",
    "plot_birthday_curve": "p2plab.notebook.plotting",
    "plot_matrix": "p2plab.notebook.plotting",
    "plot_throughput": "p2plab.notebook.plotting",
    "plot_population": "p2plab.notebook.plotting",
    "matrix_grid": "p2plab.notebook.plotting",
    "outcome_table": "p2plab.notebook.plotting",
    "disagreements": "p2plab.notebook.plotting",
    "Disagreements": "p2plab.notebook.plotting",
}

__all__ = [
    "ChatPanel",
    "Disagreements",
    "LocalLab",
    "disagreements",
    "local_lab",
    "matrix_grid",
    "outcome_table",
    "plot_birthday_curve",
    "plot_loss",
    "plot_matrix",
    "plot_population",
    "plot_throughput",
    "start_local_lab",
]

if TYPE_CHECKING:
    from p2plab.notebook.local import LocalLab, local_lab, start_local_lab
    from p2plab.notebook.panels import ChatPanel
    from p2plab.notebook.plotting import (
        Disagreements,
        disagreements,
        matrix_grid,
        outcome_table,
        plot_birthday_curve,
        plot_loss,
        plot_matrix,
        plot_population,
        plot_throughput,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2plab.notebook' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
