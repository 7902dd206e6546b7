"""What a worker remembers about the peers it has paired with: their public keys, by id.

Trust on first use, as SSH's ``known_hosts``: the first key a peer id comes with is remembered;
when the same id comes back with another key, :meth:`KnownPeers.check` says so and the link
engine reports it loudly (a :class:`~p2plab.core.events.PeerKeyChanged` event, the status
``peer_key_warning``, a log warning).  It pairs anyway unless the worker's peer key is pinned
(``--peer-key``): a peer may have made a new key, and the user decides by comparing the
authentication string.  The new key then replaces the old one.

Sans-I/O: :meth:`KnownPeers.dumps` / :meth:`KnownPeers.loads` give and take the JSON text; the
asyncio worker reads and writes the file (``WorkerConfig.known_peers_file``).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Final

from p2plab.core.crypto import KEY_SIZE

__all__ = ["MAX_KNOWN_PEERS", "KnownPeers"]

#: Peers remembered at most; the oldest is forgotten first (a rendezvous that offers many ids
#: must not grow a worker's memory or file without bound).
MAX_KNOWN_PEERS: Final = 1000


class KnownPeers:
    """Peer id -> the public key last seen with it (insertion order: oldest first)."""

    def __init__(self, entries: dict[str, bytes] | None = None) -> None:
        self._keys: dict[str, bytes] = dict(entries or {})

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, peer_id: str) -> bytes | None:
        """The key remembered for ``peer_id``, or None."""
        return self._keys.get(peer_id)

    def check(self, peer_id: str, key: bytes) -> bytes | None:
        """Remember ``key`` for ``peer_id``; returns the OTHER key remembered before, if any."""
        old = self._keys.pop(peer_id, None)
        self._keys[peer_id] = bytes(key)
        while len(self._keys) > MAX_KNOWN_PEERS:
            del self._keys[next(iter(self._keys))]
        return old if old is not None and old != key else None

    def dumps(self) -> str:
        """The JSON text of the memory (``{"peer id": "base64 key", ...}``)."""
        return json.dumps(
            {pid: base64.b64encode(k).decode("ascii") for pid, k in self._keys.items()}, indent=1
        )

    @classmethod
    def loads(cls, text: str) -> KnownPeers:
        """The memory from :meth:`dumps` text; ValueError for anything else."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("known peers file must hold a JSON object")
        entries: dict[str, bytes] = {}
        for pid, b64 in obj.items():
            try:
                key = base64.b64decode(str(b64), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"known peer {pid!r}: key is not base64") from None
            if len(key) != KEY_SIZE:
                raise ValueError(f"known peer {pid!r}: key is not {KEY_SIZE} bytes")
            entries[str(pid)] = key
        return cls(entries)
