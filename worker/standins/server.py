"""`segment-worker standins`: the stand-in destinations as a foreground HTTP server.

Each stand-in accepts the key its real API would be given (the registry names the variable:
AMPLITUDE_API_KEY, AMBERFLO_API_KEY, RETENO_ACCESS_KEY, BREVO_API_KEY); unset, it accepts
`standin-<destination>-key`, which is what `demo` configures on both sides.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from worker.destinations import registry
from worker.standins.app import make_app


def default_key(destination: str) -> str:
    return f"standin-{destination}-key"


def standin_env(base_url: str) -> dict[str, str]:
    """What a sink needs to talk to stand-ins at `base_url`: every destination's base URLs and key."""
    env: dict[str, str] = {}
    for entry in registry.entries():
        for field in entry.config.model_fields:
            if field == "base_url" or field.endswith("_base_url"):
                env[entry.config.variable(field)] = base_url
        env[entry.key_variable] = default_key(entry.name)
    return env


def credentials_from(sources: Mapping[str, str]) -> dict[str, str]:
    return {entry.name: sources.get(entry.key_variable) or default_key(entry.name) for entry in registry.entries()}


def serve_forever(sources: Mapping[str, str], host: str, port: int) -> None:
    names = ", ".join(registry.names())
    print(f"stand-in destinations on http://{host}:{port} ({names})", flush=True)
    web.run_app(make_app(credentials_from(sources)), host=host, port=port, print=None, access_log=None)
