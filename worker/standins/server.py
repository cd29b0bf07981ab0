"""`segment-worker standins`: the stand-in destinations as a foreground HTTP server.

Each stand-in accepts the key its real API would be given (AMPLITUDE_API_KEY, AMBERFLO_API_KEY,
RETENO_ACCESS_KEY, BREVO_API_KEY); unset, it accepts `standin-<destination>-key`, which is what
`demo` configures on both sides.
"""

from __future__ import annotations

import os

from aiohttp import web

from worker.standins.app import STANDINS, make_app

KEY_VARIABLES = {
    "amplitude": "AMPLITUDE_API_KEY",
    "amberflo": "AMBERFLO_API_KEY",
    "reteno": "RETENO_ACCESS_KEY",
    "brevo": "BREVO_API_KEY",
}


def default_key(destination: str) -> str:
    return f"standin-{destination}-key"


def credentials_from_env() -> dict[str, str]:
    return {name: os.environ.get(KEY_VARIABLES[name]) or default_key(name) for name in STANDINS}


def serve_forever(host: str, port: int) -> None:
    print(f"stand-in destinations on http://{host}:{port} (amplitude, amberflo, reteno, brevo)", flush=True)
    web.run_app(make_app(credentials_from_env()), host=host, port=port, print=None, access_log=None)
