"""Does a pooled connection ever die under a request? Keep-alive at its edge, on the real servers.

``python -m bench.keepalive [--clients 200] [--rounds 6]``

A client keeps an idle connection for its next request for ``keepalive_expiry`` seconds; the
server closes it after its own keep-alive time. When the two are equal, a request sent just
as the server closes the connection is lost with a ``ReadError``: a submit that fails so is
``submit_outcome_unknown``, and a tuputech download that fails so fails its task (code 14).
Each row sends ``--clients`` connections' worth of requests, each sent again after an idle
time just under the client's expiry (the worst case: the connection is reused at its oldest),
and counts the requests that failed:

- baseline: httpx's default (5 s) against an emulator (uvicorn's default keep-alive, 5 s);
- docpipe's provider client (``runtime.PROVIDER_KEEPALIVE_S``) against the same emulator;
- a provider's download client at httpx's default against docpipe's callback receiver.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from pipeline.devstack import LocalStack
from pipeline.runtime import PROVIDER_KEEPALIVE_S

HTTPX_DEFAULT_EXPIRY = 5.0
EDGE_S = 0.02  # requests go again up to this long before the client would expire the connection


async def at_the_edge(url: str, expiry: float, clients: int, rounds: int) -> dict[str, Any]:
    """``clients`` connections, each reused ``rounds`` times after idling just under ``expiry``."""
    failures: dict[str, int] = {}

    async def one() -> None:
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=1, keepalive_expiry=expiry)) as client:
            for n in range(rounds):
                try:
                    (await client.get(url)).raise_for_status()
                except httpx.HTTPError as exc:
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                if n < rounds - 1:
                    await asyncio.sleep(expiry - random.uniform(0, EDGE_S))

    await asyncio.gather(*(one() for _ in range(clients)))
    return {"requests": clients * rounds, "failed": sum(failures.values()), "errors": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="docpipe-bench-") as tmp, LocalStack(Path(tmp) / "stack") as stack:
        stack.start_base(["baidu"], callbacks=True)
        emulator = f"{stack.emulator_url('baidu')}/_emulator/config"
        receiver = f"http://127.0.0.1:{stack.ports['callbacks']}/health"
        cases = [
            ("baseline: httpx default -> emulator", emulator, HTTPX_DEFAULT_EXPIRY),
            ("docpipe provider client -> emulator", emulator, PROVIDER_KEEPALIVE_S),
            ("provider (httpx default) -> receiver", receiver, HTTPX_DEFAULT_EXPIRY),
        ]
        for name, url, expiry in cases:
            row = {"case": name, "client_expiry_s": expiry, **asyncio.run(at_the_edge(url, expiry, args.clients, args.rounds))}
            rows.append(row)
            print(f"{name:>38}: {row['failed']} of {row['requests']} requests failed {row['errors'] or ''}", flush=True)
    print(json.dumps({"benchmark": "keep-alive edge", "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
