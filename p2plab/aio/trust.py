"""The worker's memory of peer keys on disk (``WorkerConfig.known_peers_file``).

The memory itself is :class:`p2plab.core.known_peers.KnownPeers` (sans-I/O); this module only
reads and writes its JSON file.  A file that cannot be read is a user's mistake: one line
(ConfigError), never a worker that silently forgets whom it trusted.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from p2plab.core.known_peers import KnownPeers
from p2plab.errors import ConfigError

__all__ = ["load_known_peers", "save_known_peers"]

log = logging.getLogger(__name__)


def load_known_peers(path: str | None) -> KnownPeers:
    """The memory in ``path`` (empty when None or when the file does not exist yet)."""
    if path is None or not Path(path).exists():
        return KnownPeers()
    try:
        return KnownPeers.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the known peers file {path}: {exc}") from None


def save_known_peers(path: str | None, peers: KnownPeers) -> None:
    """Write the memory to ``path`` atomically (nothing when None); failures are logged."""
    if path is None:
        return
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(peers.dumps())
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("cannot save the known peers file %s: %s", path, exc)
