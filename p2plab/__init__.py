"""p2plab: NAT traversal lab.  Public API is re-exported here (see ``__all__``)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
