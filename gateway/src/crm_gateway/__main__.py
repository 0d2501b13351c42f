"""`python -m crm_gateway token --sub NAME --roles ROLE[,ROLE...]` prints a development token
signed with the local key (JWT_SECRET); `python -m crm_gateway serve` runs gunicorn."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from crm_chassis.auth import TokenVerifier, configure_roles, load_roles
from crm_chassis.config import load_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crm_gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("token", help="print a development JWT")
    tok.add_argument("--sub", required=True, help="subject (user name)")
    tok.add_argument(
        "--roles",
        required=True,
        help=f"comma-separated roles of the roles file (ROLES_FILE; default: {', '.join(sorted(load_roles().roles))})",
    )
    tok.add_argument("--ttl", type=int, default=8 * 3600, help="lifetime in seconds (default 8 hours)")
    sub.add_parser("serve", help="run the gateway under gunicorn")
    args = parser.parse_args(argv)
    if args.command == "token":
        settings = load_settings("gateway", 8080)
        configure_roles(settings)
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        try:
            print(TokenVerifier.from_settings(settings).mint(args.sub, roles, args.ttl))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    conf = pathlib.Path(__file__).resolve().parents[2] / "gunicorn.conf.py"
    if not conf.exists():
        conf = pathlib.Path(os.environ.get("GUNICORN_CONF", "/app/gunicorn.conf.py"))
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "-c", str(conf), "crm_gateway:create_app()"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
