"""Which destinations an event goes to: Segment's `integrations` object over the DESTINATIONS setting.

`integrations.All` (default true) switches every destination; a destination's own key wins over
`All`. A value of `false` disables; `true` or an options object enables. Keys match Segment's
display names case-insensitively ("Amplitude", "amplitude").
"""

from __future__ import annotations

from typing import Any


def destinations_for(integrations: dict[str, Any], enabled: list[str]) -> list[str]:
    if not integrations:
        return enabled
    everything = integrations.get("All", integrations.get("all", True)) is not False
    by_name = {str(key).lower(): value for key, value in integrations.items()}
    chosen = []
    for destination in enabled:
        setting = by_name.get(destination)
        if everything if setting is None else setting is not False:
            chosen.append(destination)
    return chosen
