"""Faithful local stand-ins for the SaaS APIs we cannot reach from tests or `demo`.

One aiohttp app serves all four (their paths do not collide), so every base URL can point at it.
Each stand-in checks the auth its API uses, enforces its limits, dedupes by the API's own key and
answers with the documented error bodies; `faults` lets a test make it fail on purpose.
"""
