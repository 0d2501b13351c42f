"""customer-svc's own settings (the chassis' Settings hold what every service shares)."""

from __future__ import annotations

from dataclasses import dataclass

from crm_chassis.config import phone_region


@dataclass(frozen=True)
class CustomerSettings:
    # ISO 3166-1 alpha-2 region of phone numbers written without a country code.
    phone_region: str


def load_customer_settings() -> CustomerSettings:
    """Read and check customer-svc's settings from the environment; ConfigError naming each bad one."""
    return CustomerSettings(phone_region=phone_region())
