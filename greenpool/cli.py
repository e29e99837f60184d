"""The ``greenpool`` command: ``greenpool budget ...`` and ``greenpool demo ...``."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``greenpool`` command."""
    from greenpool import budget, demo

    parser = argparse.ArgumentParser(
        prog="greenpool", description="Tools for greenpool, the gevent PostgreSQL pool."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    budget_parser = commands.add_parser(
        "budget",
        help="will workers x max_size x instances fit the server's max_connections?",
        description=budget.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    budget.add_arguments(budget_parser)
    demo_parser = commands.add_parser(
        "demo",
        help="serve the example app with gunicorn -k gevent and load it with locust",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(demo_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``greenpool`` command; returns its exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "budget":
        from greenpool import budget

        return budget.run(args, dict(os.environ))
    from greenpool import demo

    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())
