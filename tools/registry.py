"""The service registry (services.toml) from the command line, for the Makefile and the Dockerfile.

Runs on a bare python3 (3.11+, standard library only): it loads crm_chassis/registry.py by path,
without importing the crm_chassis package (whose other modules need the virtualenv).

  python3 tools/registry.py packages        installable folders: chassis, the services, gateway
  python3 tools/registry.py services        the services' names
  python3 tools/registry.py get NAME FIELD  one field (package, port, domain, folder, ...)
  python3 tools/registry.py entrypoint NAME the image's entrypoint script for NAME (Dockerfile)
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
_MODULE = ROOT / "chassis" / "src" / "crm_chassis" / "registry.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("crm_registry", _MODULE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


registry = _load_module()


def load(path: pathlib.Path | None = None):
    return registry.load_registry(path or ROOT / registry.FILE_NAME)


def entrypoint(reg, name: str) -> str:
    """A POSIX sh script that execs the process (PID 1 stays the Python process)."""
    if reg.gateway and name == reg.gateway.name:
        # gunicorn reads its config from /app (copied into the image by the Dockerfile).
        return (
            f'#!/bin/sh\nexec python -m gunicorn -c /app/gunicorn.conf.py "{reg.gateway.package}:create_app()" "$@"\n'
        )
    s = reg.service(name)
    # `serve` when the container gets no arguments (Kubernetes passes serve or migrate).
    return f'#!/bin/sh\n[ "$#" -gt 0 ] || set -- serve\nexec python -m {s.package} "$@"\n'


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    reg = load()
    cmd, args = argv[0], argv[1:]
    if cmd == "packages":
        print(" ".join(["chassis", *reg.folders()]))
    elif cmd == "services":
        print(" ".join(reg.names()))
    elif cmd == "get" and len(args) == 2:
        entry = reg.gateway if reg.gateway and args[0] == reg.gateway.name else reg.service(args[0])
        print(getattr(entry, args[1]))
    elif cmd == "entrypoint" and len(args) == 1:
        sys.stdout.write(entrypoint(reg, args[0]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except (registry.RegistryError, KeyError) as exc:
        print(f"tools/registry.py: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
