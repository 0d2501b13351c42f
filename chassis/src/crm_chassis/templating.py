"""The sandbox the suite's user-written templates run in (support-svc's canned answers,
campaign-svc's message templates): Jinja2's `SandboxedEnvironment` (no Python internals) that
also refuses every function and method call (filters do the work), bounds `*` and `**` and
refuses `str % x`, so a template's work is bounded by its size.

    class Sandbox(templating.Sandbox):
        what = "a canned answer"          # named in the refusals
"""

from __future__ import annotations

from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

MAX_SEQUENCE = 10_000  # the longest string or list a `*` may make


class Sandbox(SandboxedEnvironment):
    what = "a template"
    intercepted_binops = frozenset({"*", "**", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - Jinja's signature
        raise SecurityError(f"calls are not allowed in {__self.what} (use filters)")

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if (
                not isinstance(right, int | float)
                or abs(right) > 100
                or (isinstance(left, int | float) and abs(left) > 10**6)
            ):
                raise SecurityError(f"a power that large is not allowed in {self.what}")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_SEQUENCE:
                    raise SecurityError(f"a repetition longer than {MAX_SEQUENCE:,} is not allowed")
        elif operator == "%" and isinstance(left, str):
            raise SecurityError(f"formatting with % is not allowed in {self.what} (use placeholders)")
        return super().call_binop(context, operator, left, right)
