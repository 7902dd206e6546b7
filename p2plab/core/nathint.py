"""What a worker tells its peer about its own NAT's port mapping (:class:`NatHint`), from what
STUN showed on its sockets (pure; issue 16).

Three observations, made by the driver (the asyncio worker and the simulator alike):

* ``mappings``: the public address of the *punching* socket as seen by STUN at two or more
  destinations (another server, or the RFC 5780 OTHER-ADDRESS of the first), in the order the
  Bindings were sent.  Plain Bindings are solicited: they cannot disturb the socket's mapping.
  The same port everywhere is endpoint-independent mapping ("easy"); anything else maps per
  destination ("hard"), and with three of them :func:`~p2plab.core.portpredict.predict_ports`
  says whether the NAT allocates in order.
* ``clash_reference`` / ``clash_mapping``: the "leaky" test, on a socket of its own because it
  spoils that socket's mapping.  The socket's mapping towards the primary server, then a Binding
  with CHANGE-REQUEST (address and port) whose answer arrives unsolicited from the alternate
  address, then a Binding to that alternate address from the same socket.  A NAT without an
  input firewall keeps a conntrack entry for the unsolicited answer, and the socket's own packet
  to that sender clashes with it and leaves by a new port (natlab.md): that NAT maps
  endpoint-independently for STUN but punches as hard, which is what ``remaps_on_clash`` says.
"""

from __future__ import annotations

from collections.abc import Sequence

from p2plab.core.portpredict import predict_ports
from p2plab.core.signaling import MAX_PREDICTED_PORTS, NatHint

__all__ = ["hint_from_mappings", "hint_summary"]

Address = tuple[str, int]


def hint_from_mappings(
    mappings: Sequence[Address],
    *,
    clash_reference: Address | None = None,
    clash_mapping: Address | None = None,
    port_range: tuple[int, int] = (1024, 65535),
) -> NatHint:
    """The :class:`NatHint` that ``mappings`` (and the leaky test, if run) show.

    Fewer than two mappings: ``unknown`` (one Binding says nothing about the mapping).  Mappings
    on several public IPs (a NAT pool) also count as per-destination mapping.
    """
    if len(mappings) < 2:
        return NatHint()
    ports = [int(port) for _, port in mappings]
    if len(set(mappings)) == 1:
        remaps = (
            clash_reference is not None
            and clash_mapping is not None
            and clash_mapping != clash_reference
        )
        return NatHint(mapping="endpoint-independent", remaps_on_clash=remaps)
    prediction = predict_ports(ports, count=MAX_PREDICTED_PORTS, port_range=port_range)
    if len({ip for ip, _ in mappings}) > 1 or not prediction.sequential:
        return NatHint(mapping="endpoint-dependent")
    return NatHint(
        mapping="endpoint-dependent",
        sequential=True,
        predicted_ports=list(prediction.predicted),
    )


def hint_summary(hint: NatHint | None) -> str:
    """``easy``, ``hard`` or ``unknown``: the word ``probe --json`` and ``status`` show."""
    if hint is None or hint.mapping == "unknown":
        return "unknown"
    if hint.mapping == "endpoint-dependent" or hint.remaps_on_clash:
        return "hard"
    return "easy"
