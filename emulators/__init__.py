"""Faithful HTTP emulators of the providers' APIs, limits and failure modes included.

``python -m emulators <provider> --port N`` serves one; each module exposes ``Config``
(its settings, a pydantic model) and ``create_app(config)`` (a Starlette app).
"""

EMULATORS = ("baidu", "tuputech", "idp")
