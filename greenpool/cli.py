"""The ``greenpool`` command: ``greenpool budget ...`` and ``greenpool demo ...``.

Both read the database from ``DATABASE_URL``; ``--conninfo`` overrides it, but a
password on a command line is visible to every user of the machine (``ps``), so the
commands warn when ``--conninfo`` carries one.
"""

from __future__ import annotations

import argparse
import os
import sys


def warn_if_password(
    prog: str, conninfo: str | None, option: str = "--conninfo", env: str = "DATABASE_URL"
) -> bool:
    """Warn on stderr when a conninfo given on the command line holds a password.

    Every user of the machine can read command lines (``ps``, ``/proc/PID/cmdline``).
    Returns whether it warned; the password itself is never printed.
    """
    if not conninfo:
        return False
    from greenpool.conninfo import secrets_of, split_conninfo

    try:
        params = split_conninfo(conninfo).params
    except ValueError:
        return False  # reported, without the secret, where the conninfo is used
    if not secrets_of(conninfo, params, {}):
        return False
    print(
        f"{prog}: warning: {option} holds a password, which every user of this machine "
        f"can read in the process list (ps); set {env} instead, or keep the password "
        "in a passfile (~/.pgpass)",
        file=sys.stderr,
    )
    return True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``greenpool`` command."""
    from greenpool import budget, demo

    parser = argparse.ArgumentParser(
        prog="greenpool",
        description="Tools for greenpool, the gevent PostgreSQL pool. The database comes "
        "from DATABASE_URL (preferred: a --conninfo password shows in ps) or --conninfo.",
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
