"""moto's S3, called as a WSGI app inside the process that serves it.

Why not ``python -m moto.server`` behind the front, as before: every request then crossed a
second HTTP hop (an httpx client in the front, werkzeug's development server in moto, which
also looks up its backend on disk and logs each request). Measured per request, the front
spent about 2.9 ms of CPU and moto about 3 ms; moto's S3 app itself needs about 1 ms. On a
2-core box those milliseconds are taken from the workers under test, and real S3 takes none
of the client's CPU. Called in-process, moto sees the same request: the method, the headers,
the body and the undecoded request target (``RAW_URI``, from which moto reads S3 keys), as
werkzeug's server would have handed them over.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.moto_server.werkzeug_app import create_backend_app

# Hop-by-hop headers belong to one connection, never to the message handed on (either way).
# Expect is here because uvicorn has already answered "100 Continue" to the client.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "expect"}
)
# The body arrives here whole: its length is the one moto is told, not the client's framing.
_NOT_FORWARDED = HOP_BY_HOP | {"content-length"}


# Where moto's request reads the original spelling of headers whose names hold "_"
# (``moto.core.request.PRESERVED_HEADER_NAMES_ENVIRON_KEY``).
_PRESERVED_NAMES = "moto.preserved_header_names"


# moto's own control pages (its dashboard, its reset): not S3, and not signed.
CONTROL_PREFIX = b"/moto-api/"


def target_path(scope: dict[str, Any]) -> bytes:
    """The request's path as the client sent it, still percent-encoded (S3 keys are read from it)."""
    return scope.get("raw_path") or scope["path"].encode()


def is_control(raw_path: bytes) -> bool:
    return raw_path.startswith(CONTROL_PREFIX)


@dataclass(frozen=True)
class WsgiAnswer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def wsgi_environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """The PEP 3333 environ for an ASGI HTTP ``scope`` whose body has been read whole."""
    raw_path = target_path(scope)
    query: bytes = scope.get("query_string", b"")
    target = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
    host, port = scope.get("server") or ("127.0.0.1", 80)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "RAW_URI": target,
        "REQUEST_URI": target,
        "SERVER_NAME": host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),  # shares the bytes until written to: no copy
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if client := scope.get("client"):
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    headers = [(raw_name.decode("latin-1"), raw_value.decode("latin-1")) for raw_name, raw_value in scope["headers"]]
    dashed = {_environ_key(name) for name, _ in headers if "_" not in name}
    spelled: dict[str, str] = {}
    for name, value in headers:
        if name in _NOT_FORWARDED:  # ASGI names are lower-case
            continue
        key = _environ_key(name)
        if "_" in name:
            # As moto's own server does: a name with "_" could pass for its dashed twin, so it is
            # dropped, except S3 metadata (x-amz-meta-my_key), which keeps its spelling.
            if not name.lower().startswith("x-amz-meta-") or key in dashed:
                continue
            spelled.setdefault(key, name)
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    environ[_PRESERVED_NAMES] = spelled
    return environ


def _environ_key(name: str) -> str:
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}"


def call_wsgi(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> WsgiAnswer:
    """Run a WSGI app to the end of its answer (moto's answers are whole bytes anyway)."""
    started: dict[str, Any] = {}
    chunks: list[bytes] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        started["status"], started["headers"] = int(status.split(" ", 1)[0]), headers
        return chunks.append

    answer = app(environ, start_response)
    try:
        chunks.extend(answer)
    finally:
        getattr(answer, "close", lambda: None)()
    return WsgiAnswer(started["status"], started["headers"], b"".join(chunks))


class MotoS3:
    """moto's S3 backend app and its ``/moto-api/`` control app, made once, shared by threads
    (werkzeug's threaded server shared them the same way)."""

    def __init__(self) -> None:
        self._apps: dict[str, Any] = {}
        self._making = threading.Lock()

    def _app(self, service: str) -> Any:
        if (app := self._apps.get(service)) is not None:
            return app
        with self._making:
            if service not in self._apps:
                self._apps[service] = create_backend_app(service)  # type: ignore[arg-type]
            return self._apps[service]

    def __call__(self, scope: dict[str, Any], body: bytes) -> WsgiAnswer:
        return call_wsgi(self._app("moto_api" if is_control(target_path(scope)) else "s3"), wsgi_environ(scope, body))
