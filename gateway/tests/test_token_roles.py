"""`python -m crm_gateway token` knows the roles of the roles file in force (ROLES_FILE)."""

from __future__ import annotations

import os
import subprocess
import sys

from crm_chassis.auth import TokenVerifier
from crm_chassis.config import DEFAULT_JWT_SECRET


def token(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crm_gateway", "token", "--sub", "ann", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


def test_the_token_command_uses_the_roles_file(tmp_path):
    roles = tmp_path / "roles.toml"
    roles.write_text('[roles]\nauditor = ["audit.read", "reports.read"]\n')
    made = token("--roles", "auditor", ROLES_FILE=str(roles))
    assert made.returncode == 0, made.stderr
    assert TokenVerifier(DEFAULT_JWT_SECRET).verify(made.stdout.strip()).roles == ("auditor",)
    refused = token("--roles", "analyst", ROLES_FILE=str(roles))
    assert refused.returncode == 2 and "unknown roles ['analyst']" in refused.stderr
    roles.write_text('[roles]\nauditor = ["audit.raed"]\n')
    bad = token("--roles", "auditor", ROLES_FILE=str(roles))
    assert bad.returncode != 0 and "'audit.raed', which no contract declares" in bad.stderr
