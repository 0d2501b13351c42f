"""Generate the Python stubs for every contract in proto/ into proto/gen (one package, `crm`).

Run by `make proto`; the output is not committed. Every service and the gateway import the
same generated modules (crm.customer.v1.customer_service_pb2, ...).
"""

from __future__ import annotations

import pathlib
import shutil
import sys

import grpc_tools
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
OUT = PROTO / "gen"


def main() -> int:
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "crm").rglob("*.proto"))
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *files,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return rc
    # Regular packages (not namespace packages) so editable installs and images behave alike.
    for d in [OUT / "crm", *(p for p in (OUT / "crm").rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    print(f"generated {len(files)} proto files into {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
