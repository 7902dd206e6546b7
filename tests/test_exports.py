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
    # public events (Worker.subscribe) and the error of Worker.chat
    "BenchmarkFinished",
    "BenchmarkProgress",
    "ChatDelivered",
    "ChatFailed",
    "ChatFailedError",
    "ChatReceived",
    "PathChanged",
    "PeerConnected",
    "PeerLost",
    "StateChanged",
    # the notebook-first entry point
    "LocalLab",
    "local_lab",
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


PUBLIC_EVENTS = (
    "StateChanged",
    "PeerConnected",
    "PeerLost",
    "PathChanged",
    "ChatReceived",
    "ChatDelivered",
    "ChatFailed",
    "BenchmarkProgress",
    "BenchmarkFinished",
)


def test_public_events_document_every_field() -> None:
    """One docstring per field: each field's name is followed by a string literal in the source."""
    import ast
    import dataclasses
    import inspect
    import itertools

    from p2plab.core import events

    tree = ast.parse(inspect.getsource(events))
    documented: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names = documented.setdefault(node.name, set())
            for a, b in itertools.pairwise(node.body):
                if (
                    isinstance(a, ast.AnnAssign)
                    and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr)
                    and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)
                ):
                    names.add(a.target.id)
    for name in PUBLIC_EVENTS:
        cls = getattr(p2plab, name)
        assert cls.__doc__, name
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields and fields <= documented[name], (name, fields - documented[name])
        assert cls.__dataclass_params__.frozen, name
