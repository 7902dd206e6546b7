"""The curated public API: every name in p2plab.__all__ resolves, and the list is complete."""

from __future__ import annotations

import importlib

import p2plab

EXPECTED = {
    "Benchmark",
    "BenchResult",
    "HolePuncher",
    "NatReport",
    "SessionConfig",
    "StunProbe",
    "Worker",
    "WorkerConfig",
    "__version__",
}


def test_all_matches_the_documented_api() -> None:
    assert set(p2plab.__all__) == EXPECTED


def test_every_export_resolves_to_its_module_object() -> None:
    for name in p2plab.__all__:
        if name == "__version__":
            continue
        obj = getattr(p2plab, name)
        module = importlib.import_module(p2plab._EXPORTS[name])
        assert obj is getattr(module, name)
        assert name in getattr(module, "__all__", [name]), f"{name} missing from its __all__"


def test_unknown_attribute_raises() -> None:
    try:
        p2plab.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
