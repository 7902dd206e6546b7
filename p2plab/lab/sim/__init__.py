"""In-process NAT simulator: the real sans-I/O core over a simulated network, on a virtual clock.

No root, no sockets, no real time: :class:`Simulation` builds hosts, NAT boxes (RFC 4787 mapping,
filtering, port allocation, mapping timeout, hairpinning; see :mod:`p2plab.lab.simnet`), a STUN
server with two addresses and a rendezvous, then drives the very code the workers run: whole
workers (:class:`SimWorker`: the core :class:`~p2plab.core.link.LinkEngine` and its sessions, so
the relay fallback and re-punching happen because the engine does them),
:class:`~p2plab.core.session.PeerSession` for bare punching,
:class:`~p2plab.core.stun.StunTransaction` and :class:`~p2plab.core.discovery.Rfc5780Discovery`
for STUN discovery and RFC 5780 classification, and
:class:`~p2plab.core.stun_server.StunResponder` as the STUN server.  One seed makes a run
reproducible.

::

    sim = Simulation(seed=1)
    a = sim.add_host(behind=sim.add_nat("port-restricted"))
    b = sim.add_host(behind=sim.add_nat("symmetric"))
    result = sim.punch(a, b)            # PunchResult: outcome "direct" or "failed", connect_time_s
    result.a.send_chat("hello")
    sim.run_for(300)                    # five virtual minutes, a few milliseconds of real time
    sim.probe(a).mapping                # MappingBehavior.ENDPOINT_INDEPENDENT

    link = sim.pair(a, b)               # two whole workers, paired by the simulated rendezvous
    link.outcome, link.fallback         # ("direct", "") or ("failed", "relayed")
    link.a.send_chat("hi"); link.a.states   # [..., "punching", "connected"]

:func:`sim_matrix` pairs two workers for every pair of profiles (plus two hosts behind one NAT)
and returns rows shaped like the kernel lab's matrix, its ``fallback``, ``method`` and ``family``
columns included.  Sites take the kernel lab's specs (:meth:`Simulation.add_site`):
``symmetric+pmp`` (the router answers NAT-PMP and PCP, ``+upnp`` UPnP IGD, ``+all`` all three),
``symmetric/v6-apdf`` (dual-stack: IPv6 behind a stateful firewall), ``v6-eif`` (IPv6 only)::

    sim = Simulation(seed=1)
    link = sim.pair(sim.add_site("symmetric+pmp", "a"), sim.add_site("symmetric", "b"))
    link.method, link.family            # ("port-mapping", "ipv4") once the engine ranks it

The package, one concern per module (imports run one way, top to bottom):

* :mod:`~p2plab.lab.sim.stun_server`: the STUN server (two IPs x two ports, per family);
* :mod:`~p2plab.lab.sim.ipv6`: IPv6 firewalls (filtering without mapping) and the network that
  routes both families;
* :mod:`~p2plab.lab.sim.portmap_model`: the router's port mapping (NAT-PMP/PCP on the wire, UPnP
  as a call, leases) and the NAT that forwards leased ports;
* :mod:`~p2plab.lab.sim.portmap_client`: a worker's port-mapping client (probe, choose, renew);
* :mod:`~p2plab.lab.sim.turn_model`: a sans-I/O TURN server (coturn's REST credentials);
* :mod:`~p2plab.lab.sim.turn_server`: that model on a simulated host
  (:meth:`Simulation.add_turn_server`);
* :mod:`~p2plab.lab.sim.stun_client`: Binding transactions on one simulated socket;
* :mod:`~p2plab.lab.sim.peer`: :class:`SimPeer`, the driver of one socket and its core session;
* :mod:`~p2plab.lab.sim.rendezvous`: :class:`SimRendezvous`, the real pairing rules over JSON;
* :mod:`~p2plab.lab.sim.nat_test`: the NAT test a worker runs after discovery (its ``NatHint``);
* :mod:`~p2plab.lab.sim.worker`: :class:`SimWorker`, the driver of one core link engine (and of
  its socket pool for birthday punching);
* :mod:`~p2plab.lab.sim.probe`: RFC 5780 discovery and the RFC 3489 classic sequence;
* :mod:`~p2plab.lab.sim.report`: :class:`PunchResult`, :class:`LinkResult`;
* :mod:`~p2plab.lab.sim.world`: :class:`Simulation` (topology, clock, profiles, probe, punch,
  worker, pair);
* :mod:`~p2plab.lab.sim.matrix`: :func:`sim_matrix`, :func:`matrix_dataframe`;
* :mod:`~p2plab.lab.sim.birthday_curve`: birthday punching measured against its formula.
"""

from __future__ import annotations

from p2plab.lab.sim.ipv6 import V6_FIREWALLS, FirewallBehavior
from p2plab.lab.sim.matrix import EXPECTED_SITES, matrix_dataframe, sim_matrix
from p2plab.lab.sim.peer import SimPeer
from p2plab.lab.sim.portmap_model import PortMapConfig
from p2plab.lab.sim.rendezvous import SimRendezvous
from p2plab.lab.sim.report import LinkResult, PunchResult
from p2plab.lab.sim.worker import SimWorker
from p2plab.lab.sim.world import (
    EXPECTED_METHODS,
    EXPECTED_OUTCOMES,
    PROFILES,
    SIM_PROFILES,
    STUN_IPS,
    STUN_PORTS,
    Simulation,
    profile_behavior,
)
from p2plab.lab.simnet import LinkConfig, NatBehavior

__all__ = [
    "EXPECTED_METHODS",
    "EXPECTED_OUTCOMES",
    "EXPECTED_SITES",
    "PROFILES",
    "SIM_PROFILES",
    "STUN_IPS",
    "STUN_PORTS",
    "V6_FIREWALLS",
    "FirewallBehavior",
    "LinkConfig",
    "LinkResult",
    "NatBehavior",
    "PortMapConfig",
    "PunchResult",
    "SimPeer",
    "SimRendezvous",
    "SimWorker",
    "Simulation",
    "matrix_dataframe",
    "profile_behavior",
    "sim_matrix",
]
