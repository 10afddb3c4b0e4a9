"""``python -m emulators <provider> --port N [--config JSON|@FILE] [--set key=value|key=@FILE ...]``."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module
from pathlib import Path

import uvicorn

from emulators import EMULATORS, REFEREE_SERVER
from emulators.wire import WireStampedH11


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m emulators", description=__doc__)
    parser.add_argument("provider", choices=EMULATORS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--config", default="{}", help="JSON object of settings (see the emulator's Config), or @FILE holding one (keys stay out of ps)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="one setting; VALUE is JSON or text")
    args = parser.parse_args(argv)

    # The emulator is the referee of every limit: it stamps arrivals and counts tasks in its
    # event loop, while threads parse documents. A short GIL switch interval keeps those
    # threads from delaying the loop (and so its stamps and counts) by 5 ms at a time.
    sys.setswitchinterval(0.001)
    module = import_module(f"emulators.{args.provider}")
    text = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
    settings = json.loads(text)
    for item in args.set:
        key, _, value = item.partition("=")
        if value.startswith("@") and Path(value[1:]).is_file():  # a key from a file (a compose secret)
            settings[key] = Path(value[1:]).read_text()
            continue
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    app = module.create_app(module.Config.model_validate(settings))
    # Arrivals are stamped as their first bytes are read, not when their route runs (emulators.wire).
    server = {**REFEREE_SERVER, "http": WireStampedH11}
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, **server)


if __name__ == "__main__":
    main()
