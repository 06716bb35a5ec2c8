"""The livemig command line: arguments in, the API called, results printed."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="livemig",
        description="Live-migrate running containers and process trees to another host with CRIU.")
    ap.add_argument("--version", action="version", version=f"livemig {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    ap.parse_args(sys.argv[1:] if argv is None else argv)
    ap.print_help()
    return 0
