"""Faithful HTTP emulators of the providers' APIs, limits and failure modes included.

``python -m emulators <provider> --port N`` serves one; each module exposes ``Config``
(its settings, a pydantic model) and ``create_app(config)`` (a Starlette app).
"""

EMULATORS = ("baidu", "tuputech", "idp")

# The referees serve with uvicorn's pure-Python event loop and HTTP parser whatever else is
# installed (docpipe's receiver takes uvloop and httptools when present): a benchmark that
# speeds up must owe it to the client, and the emulators' pace stays the one every earlier
# figure was measured against.
REFEREE_SERVER: dict[str, str] = {"loop": "asyncio", "http": "h11"}
