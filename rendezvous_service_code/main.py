"""The rendezvous service's entry points; importing this module builds and reads nothing.

- ``p2plab rendezvous`` (the CLI and the image) reads :class:`Settings` from its flags and the
  environment and calls :func:`serve`.
- ``uvicorn --factory rendezvous_service_code.main:app_from_env`` serves an app configured
  from the environment (the variables :mod:`.settings` lists).
- ``python -m rendezvous_service_code.main`` is a bare runner for tests and benchmarks.
- :func:`create_app` (:mod:`.app`) and :class:`RendezvousServer` (:mod:`.server`) are the
  in-process forms.

There is no module-level ``app``: an app is built only when one of these asks for it, so a bad
environment value fails there, with one line, and never at import.
"""

from __future__ import annotations

from fastapi import FastAPI

from p2plab.errors import ConfigError

from .app import CLOSE_ID_IN_USE, CLOSE_POLICY, CLOSE_RESTART, CLOSE_TRY_AGAIN, create_app
from .server import RendezvousServer, ServeAddresses, main, serve
from .settings import Settings, parse_room_tokens

__all__ = [
    "CLOSE_ID_IN_USE",
    "CLOSE_POLICY",
    "CLOSE_RESTART",
    "CLOSE_TRY_AGAIN",
    "RendezvousServer",
    "ServeAddresses",
    "Settings",
    "app_from_env",
    "create_app",
    "main",
    "parse_room_tokens",
    "serve",
]


def app_from_env() -> FastAPI:
    """An app configured from the environment: uvicorn's ``--factory`` target."""
    try:
        settings = Settings.load()
    except ConfigError as exc:  # one clear line in uvicorn's log
        raise ConfigError(f"invalid rendezvous settings in the environment: {exc}") from None
    return create_app(settings)


if __name__ == "__main__":
    raise SystemExit(main())
