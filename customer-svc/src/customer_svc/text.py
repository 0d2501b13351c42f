"""Search and match keys: crm_chassis.persian's normalisation (Persian letters and digits
unified, no diacritics or zero-width characters), kept under this name for the modules and
tools that import it from here."""

from crm_chassis.persian import digits_only, normalize

__all__ = ["digits_only", "normalize"]
