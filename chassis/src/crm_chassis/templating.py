"""The sandbox the suite's user-written templates run in (support-svc's canned answers,
campaign-svc's message templates): Jinja2's `SandboxedEnvironment` (no Python internals) that
also refuses every function and method call (filters do the work), bounds `*` and `**` and
refuses `str % x`, bounds every built-in filter's widths, counts and output (MAX_SEQUENCE,
MAX_OUTPUT), and `render` stops a render whose output passes MAX_OUTPUT or whose loops take more
than MAX_LOOP_STEPS items in all (every `{% for %}` reads its sequence through a counting filter
the code generator puts in: nested loops over long strings, which output nothing, would
otherwise hold a worker for hours).

    class Sandbox(templating.Sandbox):
        what = "a canned answer"          # named in the refusals
"""

from __future__ import annotations

import contextvars
import functools
import re

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import FilterArgumentError, SecurityError
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import _PassArg

MAX_SEQUENCE = 10_000  # the longest string or list a `*` may make; the largest width or count a filter takes
MAX_OUTPUT = 1_000_000  # the longest string or list a filter may give, or a render (`render`) make
MAX_LOOP_STEPS = 200_000  # the items every loop of one `render` may take in all
LOOP_FILTER = "_crm_loop"  # what each for-loop's sequence goes through (counted): keep it in a filter whitelist
_steps: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("crm_template_steps", default=None)
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\*|[0-9]{4,})|%[-+ #0]*[0-9]*\.(\*|[0-9]{4,})")


def _grown(name: str, value, rest: list) -> int:
    """The length the output of a filter that inserts an argument throughout its value (join's
    separator, replace's text, indent's width, wordwrap's break) would have; 0 for the others."""
    text = value if isinstance(value, str) else ""

    def arg(i: int, default):
        return rest[i] if len(rest) > i else default

    if name == "join" and isinstance(value, list | tuple):
        sep = arg(0, "")
        return sum(len(str(x)) for x in value) + len(str(sep)) * max(0, len(value) - 1)
    if name == "replace" and isinstance(value, str):
        old, new = str(arg(0, "")), str(arg(1, ""))
        count = arg(2, None)
        n = (len(text) + 1) if not old else text.count(old)
        if isinstance(count, int) and count >= 0:
            n = min(n, count)
        return len(text) + n * max(0, len(new) - len(old))
    if name == "indent" and isinstance(value, str):
        width = arg(0, 4)
        per = len(width) if isinstance(width, str) else int(width) if isinstance(width, int) else 0
        return len(text) + (text.count("\n") + 1) * per
    if name == "wordwrap" and isinstance(value, str):
        width, wrap = arg(0, 79), arg(2, "\n")
        breaks = len(text) // max(1, width if isinstance(width, int) else 79) + 1
        return len(text) + breaks * len(str(wrap or "\n"))
    return 0


def render(template, values: dict, limit: int = MAX_OUTPUT, steps: int = MAX_LOOP_STEPS) -> str:
    """The template rendered, refused (SecurityError) once its output passes `limit` characters
    (a loop repeating a long text), before the rest is made, or once its loops have taken
    `steps` items in all (nested loops that output nothing)."""
    out, size = [], 0
    token = _steps.set([steps])
    try:
        for chunk in template.generate(values):
            size += len(chunk)
            if size > limit:
                raise SecurityError(f"the output would be longer than {limit:,} characters")
            out.append(chunk)
    finally:
        _steps.reset(token)
    return "".join(out)


def _counted(seq):
    """A loop's sequence, each item taken from the render's budget of loop steps."""
    budget = _steps.get()
    if budget is None:  # rendered without `render` (no budget set): not counted
        yield from seq
        return
    for item in seq:
        budget[0] -= 1
        if budget[0] < 0:
            raise SecurityError("the loops would take more steps than a template may")
        yield item


class _CountedLoops(CodeGenerator):
    """Jinja's code generator, with every for-loop's sequence read through `_counted`."""

    def visit_Template(self, node: nodes.Template, frame=None) -> None:  # noqa: N802 - Jinja's visitor name
        for loop in node.find_all(nodes.For):  # before the filters are gathered
            if not (isinstance(loop.iter, nodes.Filter) and loop.iter.name == LOOP_FILTER):
                loop.iter = nodes.Filter(loop.iter, LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)


class Sandbox(SandboxedEnvironment):
    what = "a template"
    intercepted_binops = frozenset({"*", "**", "%"})
    code_generator_class = _CountedLoops

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters = {name: self._bounded(name, f) for name, f in self.filters.items()}
        self.filters[LOOP_FILTER] = _counted

    def _bounded(self, name: str, f):
        """Jinja's filter `name` with its work bounded: no width or count over MAX_SEQUENCE
        (`center(999999999)` made a gigabyte), no string argument longer than that, no output
        growing past MAX_OUTPUT (`replace`, `join`, `indent` of a long text), no %-format width of
        four digits, and an assertion of the filter (`truncate(-5)`) a FilterArgumentError."""
        head = 1 if _PassArg.from_obj(f) is not None else 0
        what = self.what

        @functools.wraps(f)
        def bounded(*args, **kwargs):
            value, rest = args[head] if len(args) > head else None, [*args[head + 1 :], *kwargs.values()]
            for a in rest:
                if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_SEQUENCE:
                    raise SecurityError(f"{name}: {a} is larger than {what} may ask ({MAX_SEQUENCE:,})")
                if isinstance(a, str) and len(a) > MAX_SEQUENCE:
                    raise SecurityError(f"{name}: an argument longer than {MAX_SEQUENCE:,} is not allowed")
            if name == "format" and isinstance(value, str) and _WIDE_FORMAT.search(value):
                raise SecurityError(f"format: a width that large is not allowed in {what}")
            if name == "join" and value is not None and not isinstance(value, str | list | tuple):
                value = list(value)  # a generator: counted (it would have been read all the same)
                args = (*args[:head], value, *args[head + 1 :])
            if _grown(name, value, rest) > MAX_OUTPUT:
                raise SecurityError(f"{name}: the output would be longer than {MAX_OUTPUT:,} characters")
            try:
                out = f(*args, **kwargs)
            except AssertionError as e:
                raise FilterArgumentError(f"{name}: {e}") from None
            if isinstance(out, str | list | tuple) and len(out) > MAX_OUTPUT:
                raise SecurityError(f"{name}: the output would be longer than {MAX_OUTPUT:,} characters")
            return out

        return bounded

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
