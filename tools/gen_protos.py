"""Generate the Python stubs for every contract in proto/ into proto/gen (one package, `crm`).

Run by `make proto`; the output is not committed. Every service and the gateway import the
same generated modules (crm.customer.v1.customer_service_pb2, ...).

Only crm/** is generated: google/api/*.proto in proto/ are vendored for buf and protoc to
resolve, and import as google.api.*_pb2 from googleapis-common-protos (a second copy here would
shadow them). Beside the stubs goes crm/descriptors.binpb, the same files as a
FileDescriptorSet with their comments (the generated modules drop them): the gateway writes its
OpenAPI summaries from the RPCs' comments.
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
DESCRIPTOR_SET = "descriptors.binpb"


def main() -> int:
    files = sorted(str(p.relative_to(PROTO)) for p in (PROTO / "crm").rglob("*.proto"))
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "crm").mkdir(parents=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--descriptor_set_out={OUT / 'crm' / DESCRIPTOR_SET}",
        "--include_source_info",
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
