"""services.toml: the repository's own registry agrees with the code, and bad entries are refused."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from crm_chassis import registry
from crm_chassis.registry import RegistryError, load_registry, parse_registry

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_repository_registry_lists_every_service_with_its_spec():
    reg = load_registry()
    assert reg.path == ROOT / "services.toml"
    assert reg.names() == ["customer-svc", "sales-svc", "support-svc", "campaign-svc", "reporting-svc"]
    for s in reg.services:
        assert (ROOT / s.folder / "src" / s.package / "__main__.py").is_file(), s
        spec = __import__(f"{s.package}.__main__", fromlist=["SPEC"]).SPEC
        assert (spec.name, spec.default_port) == (s.name, s.port)
        assert spec.producer_domain == (s.domain if s.publishes else None)
    customer = reg.service("customer-svc")
    assert customer.exchange == "crm.customer.events"
    assert customer.addr_env == "CUSTOMER_SVC_ADDR"
    assert reg.gateway.port == 8080
    assert reg.gateway_targets() == {
        "customer": ("CUSTOMER_SVC_ADDR", "localhost:50051"),
        "sales": ("SALES_SVC_ADDR", "localhost:50052"),
        "support": ("SUPPORT_SVC_ADDR", "localhost:50053"),
        "campaign": ("CAMPAIGN_SVC_ADDR", "localhost:50054"),
        "reporting": ("REPORTING_SVC_ADDR", "localhost:50055"),
    }
    assert reg.next_free_port() == 50056


def test_crm_registry_names_the_file(tmp_path, monkeypatch):
    f = tmp_path / "elsewhere.toml"
    f.write_text('[services.a-svc]\npackage = "a_svc"\nport = 6000\ndomain = "a"\n')
    monkeypatch.setenv("CRM_REGISTRY", str(f))
    reg = load_registry()
    assert reg.path == f.resolve()
    assert reg.names() == ["a-svc"] and reg.gateway is None and reg.gateway_targets() == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[services.a-svc]\nport = 6000\ndomain = "a"\n', "[services.a-svc]: `package` is missing"),
        ('[services.a-svc]\npackage = "a_svc"\nport = "6000"\ndomain = "a"\n', "`port` must be int"),
        ('[services.a-svc]\npackage = "a_svc"\nport = true\ndomain = "a"\n', "`port` must be int"),
        ('[services.A_svc]\npackage = "a_svc"\nport = 6000\ndomain = "a"\n', "[services.A_svc]: the name"),
        ('[services.a-svc]\npackage = "a-svc"\nport = 6000\ndomain = "a"\n', "not a Python identifier"),
        ('[services.a-svc]\npackage = "a_svc"\nport = 80\ndomain = "a"\n', "outside 1024..65535"),
        ('[services.a-svc]\npackage = "a_svc"\nport = 6000\ndomain = "a"\nprot = 1\n', "unknown key(s) prot"),
        (
            '[services.a-svc]\npackage = "a_svc"\nport = 6000\ndomain = "a"\n'
            '[services.b-svc]\npackage = "b_svc"\nport = 6000\ndomain = "b"\n',
            "b-svc and a-svc have the same port 6000",
        ),
        (
            '[services.a-svc]\npackage = "a_svc"\nport = 6000\ndomain = "a"\n'
            '[gateway]\npackage = "gw"\nport = 8080\ncalls = ["b-svc"]\n',
            "`calls` names 'b-svc'",
        ),
        ("[services\n", "services.toml"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry_and_field(text, message):
    with pytest.raises(RegistryError) as err:
        parse_registry(text, pathlib.Path("/x/services.toml"))
    assert message in str(err.value)


def test_missing_file_is_a_registry_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CRM_REGISTRY", str(tmp_path / "none.toml"))
    with pytest.raises(RegistryError, match="cannot read"):
        load_registry()


def test_the_module_needs_only_the_standard_library():
    # The Makefile runs tools/registry.py with a bare python3 before the virtualenv exists.
    out = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "tools" / "registry.py"), "packages"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == ["chassis", *load_registry().folders()]
    assert registry.FILE_NAME == "services.toml"
