"""NAT laboratories: the kernel lab (network namespaces, root) and, in ``sim``, an in-process one.

``Lab.create(profile_a, profile_b, ...)`` builds real Linux NATs in network namespaces (see
:mod:`p2plab.lab.netns`); :mod:`p2plab.lab.profiles` holds the iptables recipes.  A profile may
be a site spec (:mod:`p2plab.lab.site`: ``symmetric/v6-apdf``); :mod:`p2plab.lab.ipv6` holds the
IPv6 addressing plan and the nftables firewalls of the ``v6-*`` profiles (issue 19).
"""

from __future__ import annotations

from p2plab.lab.netns import Lab, LabConfig, check_environment, clean_leftovers
from p2plab.lab.profiles import EXPECTED_CLASSIC, EXPECTED_RFC5780, PROFILES

__all__ = [
    "EXPECTED_CLASSIC",
    "EXPECTED_RFC5780",
    "PROFILES",
    "Lab",
    "LabConfig",
    "check_environment",
    "clean_leftovers",
]
