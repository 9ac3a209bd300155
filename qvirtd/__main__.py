"""`qvirtd` / `python -m qvirtd`: parse flags, build the settings, run the daemon on uvloop."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from . import __version__
from .config import ConfigError, resolve
from .daemon import Daemon
from .logs import logging_off_the_loop
from .rootlock import StartRefused, take_root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qvirtd", description="QEMU/KVM management daemon")
    parser.add_argument("--root", type=Path, help="run an isolated instance under DIR")
    parser.add_argument("--config", type=Path, help="TOML settings file")
    parser.add_argument("--version", action="version", version=f"qvirtd {__version__}")
    args = parser.parse_args(argv)
    try:
        layout, settings = resolve(args.root, args.config)
    except ConfigError as exc:
        print(f"qvirtd: {exc}", file=sys.stderr)
        return 2
    try:
        # Before anything is read from the state or run directory; held until we exit.
        root_lock = take_root(layout)
    except StartRefused as exc:
        print(f"qvirtd: {exc}", file=sys.stderr)
        return 1
    refused: ConfigError | None = None
    with root_lock, logging_off_the_loop(getattr(logging, settings.log_level.upper())):
        try:
            return int(uvloop.run(Daemon(settings, layout).run()))
        except ConfigError as exc:  # the socket could not be made (bind_socket)
            refused = exc
    # After the log thread has written every line: the reason is the last thing said.
    print(f"qvirtd: {refused}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
