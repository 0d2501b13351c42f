"""tools/new_service.py: a service generated into a copy of the repository starts and serves."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crm_chassis.registry import load_registry
from tests.support.harness import ROOT

pytestmark = pytest.mark.slow

NAME, PACKAGE, OWN = "loyalty-svc", "loyalty_svc", "crm.loyalty.v1.LoyaltyService"
BIN = pathlib.Path(sys.executable).parent


def copy_repo(dest: pathlib.Path) -> None:
    """The working tree's tracked and untracked (not ignored) files: what a clone plus edits holds."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, (f.decode() for f in files)):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pythonpath(repo: pathlib.Path) -> str:
    """The generated package and the copy's stubs first, then whatever this run already has."""
    parts = [str(repo / NAME / "src"), str(repo / "proto" / "gen"), os.environ.get("PYTHONPATH", "")]
    return os.pathsep.join(p for p in parts if p)


def run(cmd: list[str], cwd: pathlib.Path, **kw) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    copy_repo(repo)
    before = load_registry(repo / "services.toml")
    out = run([sys.executable, "tools/new_service.py", NAME, "--summary", "points and rewards."], repo)
    assert f"created {NAME}" in out
    run([sys.executable, "tools/gen_protos.py"], repo)  # what `make proto` runs
    return repo, before


def test_the_registry_entry_takes_the_next_free_port_and_the_files_exist(generated):
    repo, before = generated
    reg = load_registry(repo / "services.toml")
    entry = reg.service(NAME)
    assert (entry.package, entry.domain, entry.port) == (PACKAGE, "loyalty", before.next_free_port())
    assert reg.names() == [*before.names(), NAME] and reg.gateway == before.gateway
    for rel in (
        f"{NAME}/src/{PACKAGE}/__main__.py",
        f"{NAME}/src/{PACKAGE}/migrations/versions/0001_initial.py",
        f"{NAME}/tests/test_service.py",
        "proto/crm/loyalty/v1/loyalty_service.proto",
        f"k8s/base/{NAME}/kustomization.yaml",
        "proto/gen/crm/loyalty/v1/loyalty_service_pb2_grpc.py",
    ):
        assert (repo / rel).is_file(), rel
    # The Makefile installs it: PACKAGES comes from the registry.
    assert NAME in run(["python3", "tools/registry.py", "packages"], repo).split()
    # A second run refuses to overwrite it.
    again = subprocess.run([sys.executable, "tools/new_service.py", NAME], cwd=repo, capture_output=True, text=True)
    assert again.returncode == 2 and f"{NAME} is already in services.toml" in again.stderr


def test_the_generated_service_starts_and_answers_health_and_reflection(generated, databases, broker):
    repo, _ = generated
    port = free_port()
    env = dict(
        os.environ,
        # Its package and the copy's stubs first; everything else from the current virtualenv.
        PYTHONPATH=pythonpath(repo),
        SERVICE_NAME=NAME,
        GRPC_PORT=str(port),
        DATABASE_URL=databases.fresh("loyalty"),
        AMQP_URL=broker.url,
        LOG_LEVEL="WARNING",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", PACKAGE, "serve"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while True:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(service=OWN), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
                time.sleep(0.2)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1  # SERVING
            answer = next(
                reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
                )
            )
            assert OWN in {s.name for s in answer.list_services_response.service}
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        out = proc.stdout.read().decode(errors="replace")
        assert "Traceback" not in out, out


def test_the_generated_code_passes_lint_and_its_own_test(generated, databases, broker):
    repo, _ = generated
    run([str(BIN / "ruff"), "check", NAME], repo)
    run([str(BIN / "ruff"), "format", "--check", NAME], repo)
    env = dict(
        os.environ,
        PYTHONPATH=pythonpath(repo),
        TEST_DATABASE_URL=databases.base,
        TEST_AMQP_URL=broker.url,
    )
    # No path given: pytest.ini's testpaths must find the new tests/ by itself.
    out = run([sys.executable, "-m", "pytest", "-v", "-k", "test_it_serves_health_and_reflection"], repo, env=env)
    assert f"{NAME}/tests/test_service.py::test_it_serves_health_and_reflection PASSED" in out, out


def test_the_generated_proto_passes_buf_lint(generated):
    repo, _ = generated
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.skip("buf is not installed (make lint installs it)")
    run([str(buf), "lint"], repo / "proto")


def test_the_generated_k8s_base_renders_with_its_name_and_port(generated):
    repo, _ = generated
    kubectl = ROOT / ".venv-k8s" / "bin" / "kubectl"
    if not kubectl.exists():
        pytest.skip("the k8s tools are not installed (make k8s-check installs them)")
    rendered = run([str(kubectl), "kustomize", f"k8s/base/{NAME}"], repo)
    # PyYAML lives in the k8s tools' virtualenv, not in this one.
    to_json = "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"
    docs = json.loads(run([str(kubectl.parent / "python"), "-c", to_json], repo, input=rendered))
    port = load_registry(repo / "services.toml").service(NAME).port
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) >= {"Deployment", "Service", "ServiceAccount", "ConfigMap", "HorizontalPodAutoscaler"}
    assert all(d["metadata"]["name"].startswith(NAME) for d in docs)
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == NAME and container["ports"][0]["containerPort"] == port
    assert kinds["Service"]["spec"]["ports"][0]["port"] == port
    assert kinds["ConfigMap"]["data"]["GRPC_PORT"] == str(port)
    # make k8s-check's consistency step: registry, ServiceSpec, base and Dockerfile agree.
    out = run([str(kubectl.parent / "python"), "tools/k8s_check.py", "--only", "consistency"], repo)
    assert "ok   base/loyalty-svc: 1 workload agree with the code" in out and "k8s-check: 2 passed, 0 failed" in out, (
        out
    )
