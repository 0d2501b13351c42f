"""customer-svc's own settings (the chassis' Settings hold what every service shares)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from crm_chassis.config import ConfigError


@dataclass(frozen=True)
class CustomerSettings:
    # ISO 3166-1 alpha-2 region of phone numbers written without a country code.
    phone_region: str


def load_customer_settings() -> CustomerSettings:
    """Read and check customer-svc's settings from the environment; ConfigError naming each bad one."""
    region = os.environ.get("DEFAULT_PHONE_REGION", "IR").upper()
    if len(region) != 2 or not region.isalpha():
        raise ConfigError([f"DEFAULT_PHONE_REGION={region!r} must be an ISO 3166-1 alpha-2 code such as IR"])
    return CustomerSettings(phone_region=region)
