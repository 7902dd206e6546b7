"""NAT laboratories: the kernel lab (network namespaces, root) and, in ``sim``, an in-process one.

``Lab.create(profile_a, profile_b, ...)`` builds real Linux NATs in network namespaces (see
:mod:`p2plab.lab.netns`); :mod:`p2plab.lab.profiles` holds the iptables recipes.
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
