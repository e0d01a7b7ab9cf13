"""Field checks in Kubernetes' own terms, each with a message in words (never a regular expression).

* Quantities follow apimachinery's ``ParseQuantity`` grammar (``<sign><digits>.<digits><suffix>``
  with the suffixes ``n u m k M G T P E``, ``Ki Mi Gi Ti Pi Ei`` or ``e<exponent>``) and give exact
  ``Decimal`` values, as the ``kubernetes`` client's ``parse_quantity`` does; a bare sign, whitespace,
  underscores, ``NaN`` or repeated suffixes are not quantities. Sizes are then bounded.
* Cron schedules follow the parser Kubernetes' CronJob controller uses (robfig/cron, five fields or
  a macro): the ranges minute 0-59, hour 0-23, day of month 1-31, month 1-12 or JAN-DEC, day of
  week 0-6 or SUN-SAT; ``*``, ``?``, lists, ranges and steps. croniter then confirms that the
  schedule ever runs (``0 0 30 2 *`` never does).
* Label keys and values, DNS labels and subdomains as ``k8s.io/apimachinery/pkg/util/validation``.

Every check returns ``None`` when the value is fine, else the problem as a phrase that starts with the
value itself (``"-5Gi" is not a size; ...``); callers put the field path in front.

``FieldRule`` pairs a check with the CEL expression the CRD carries for it (``None`` when CEL cannot
express it: the admission webhook and the operator enforce it); the message template is shared, so
the API server, the webhook and the operator say the same words.
"""

from __future__ import annotations

import datetime
import decimal
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from croniter import croniter

__all__ = [
    "CRON_MACROS",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "QUANTITY_CEL",
    "FieldRule",
    "QuantityError",
    "check_cron",
    "check_label_key",
    "check_label_value",
    "check_labels",
    "check_service_name",
    "cron_rules",
    "dns_label_rules",
    "dns_subdomain_rules",
    "duration_rules",
    "first_problem",
    "format_bytes",
    "matching",
    "parse_duration",
    "parse_quantity",
    "quantity_or_none",
    "quantity_rules",
]

# --- quantities -------------------------------------------------------------------------------------

_DIGITS = frozenset("0123456789")
_SUFFIX_CHARS = frozenset("eEinumkKMGTP")
_DECIMAL_SI = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SI = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_MAX_EXPONENT_DIGITS = 9  # apimachinery parses the exponent as an int32
_EXACT = decimal.Context(
    prec=200, Emax=10**6, Emin=-(10**6), traps=[decimal.Overflow, decimal.InvalidOperation]
)

# The same grammar for the CRD (non-negative quantities only), for ``self.matches(...)``.
QUANTITY_CEL = (
    "self.matches('^[+]?([0-9]+[.]?[0-9]*|[.][0-9]+)([numkMGTPE]|[KMGTPE]i|[eE][-+]?[0-9]{1,9})?$')"
)


class QuantityError(ValueError):
    """Not a Kubernetes quantity."""


def _split_quantity(text: str) -> tuple[str, str]:
    """(number, suffix) as apimachinery's parseQuantityString scans them; QuantityError otherwise."""
    pos, end = 0, len(text)
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos] in _DIGITS:
        pos += 1
    if pos < end and text[pos] == ".":
        pos += 1
        while pos < end and text[pos] in _DIGITS:
            pos += 1
    number_end = pos
    while pos < end and text[pos] in _SUFFIX_CHARS:
        pos += 1
    if pos < end and text[pos] in "+-":
        pos += 1
    while pos < end and text[pos] in _DIGITS:
        pos += 1
    if pos != end:
        raise QuantityError(f"not a quantity: {text!r}")
    return text[:number_end], text[number_end:]


def _scale(suffix: str) -> tuple[int, int]:
    """(base, exponent) of a suffix: value = number * base ** exponent."""
    if suffix in _DECIMAL_SI:
        return 10, _DECIMAL_SI[suffix]
    if suffix in _BINARY_SI:
        return 2, _BINARY_SI[suffix]
    exponent = suffix[1:].lstrip("+-")
    if suffix[:1] in ("e", "E") and exponent and set(exponent) <= _DIGITS:
        if len(exponent) > _MAX_EXPONENT_DIGITS:
            raise QuantityError(f"exponent out of range: {suffix!r}")
        return 10, int(suffix[1:])
    raise QuantityError(f"unknown suffix {suffix!r}")


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity (``512Mi``, ``1.5G``, ``100m``, ``1e3``) as its exact value in base units.

    The grammar is apimachinery's; the value is what ``kubernetes.utils.parse_quantity`` returns.
    Negative quantities parse (``-1``); callers that want sizes check the sign (``check_quantity``)."""
    if not isinstance(text, str) or not text:
        raise QuantityError(f"not a quantity: {text!r}")
    number_text, suffix = _split_quantity(text)
    base, exponent = _scale(suffix)
    try:
        number = Decimal(number_text)  # only sign, digits and one dot reach here
        return _EXACT.multiply(number, _EXACT.power(Decimal(base), exponent))
    except (decimal.InvalidOperation, decimal.Overflow) as exc:
        raise QuantityError(f"not a quantity: {text!r}") from exc


_BINARY_UNITS = (("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10))


def format_bytes(n_bytes: int | Decimal) -> str:
    """A byte count in the largest binary unit that keeps one decimal (``1.5Gi``, ``300Mi``, ``12``)."""
    for unit, size in _BINARY_UNITS:
        if n_bytes >= size:
            value = Decimal(n_bytes) / size
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text}{unit}"
    return str(int(n_bytes))


# --- durations ----------------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600)}


def parse_duration(text: str) -> Decimal:
    """``30s``, ``500ms``, ``2m``, ``1h`` (one number, one unit) as seconds; ValueError otherwise."""
    for unit in ("ms", "s", "m", "h"):  # "ms" before "m" and "s"
        digits = text.removesuffix(unit)
        if digits != text and digits and set(digits) <= _DIGITS:
            return int(digits) * _DURATION_UNITS[unit]
    raise ValueError(f"not a duration: {text!r}")


# --- cron ----------------------------------------------------------------------------------------------

CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_WEEKDAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}


@dataclass(frozen=True)
class _CronField:
    name: str
    low: int
    high: int
    names: Mapping[str, int]
    shown: str


_CRON_FIELDS = (
    _CronField("minute", 0, 59, {}, "0-59"),
    _CronField("hour", 0, 23, {}, "0-23"),
    _CronField("day of month", 1, 31, {}, "1-31"),
    _CronField("month", 1, 12, _MONTHS, "1-12 or JAN-DEC"),
    _CronField("day of week", 0, 6, _WEEKDAYS, "0-6 or SUN-SAT"),
)
_CRON_HELP = 'use five fields such as "0 */6 * * *" or a macro such as @daily'


def _cron_value(token: str, field: _CronField) -> int | None:
    if token.lower() in field.names:
        return field.names[token.lower()]
    if token and set(token) <= _DIGITS:
        return int(token)
    return None


def _cron_item(item: str, field: _CronField) -> str | None:
    """The problem with one comma-separated item of a field (robfig/cron's getRange), or None."""
    span, _, step = item.partition("/")
    if "/" in step:
        return f"the {field.name} field has two '/' in {item!r}"
    if step and (not set(step) <= _DIGITS or int(step) == 0):
        return f"the step in {item!r} ({field.name} field) must be a positive number"
    if span in ("*", "?"):
        return None
    bounds = span.split("-")
    if len(bounds) > 2:
        return f"the {field.name} field has two '-' in {item!r}"
    values = [_cron_value(b, field) for b in bounds]
    if any(v is None for v in values):
        return f"the {field.name} field allows {field.shown}, got {item!r}"
    low, high = values[0], values[-1]
    assert low is not None and high is not None
    for v in (low, high):
        if not field.low <= v <= field.high:
            return f"the {field.name} field allows {field.shown}, got {v}"
    if low > high:
        return f"the range {item!r} ({field.name} field) runs backwards"
    return None


def _cron_problem(text: str) -> str | None:
    if text.startswith(("TZ=", "CRON_TZ=")):
        return "time zones in the schedule are not supported; write the schedule in UTC"
    if text.startswith("@"):
        if text.startswith("@every"):
            return "@every is not supported"
        return None if text in CRON_MACROS else f"the macros are {', '.join(CRON_MACROS)}"
    fields = text.split()
    if len(fields) != 5:
        return f"a schedule has five fields (minute hour day-of-month month day-of-week), got {len(fields)}"
    for token, field in zip(fields, _CRON_FIELDS, strict=True):
        for item in token.split(","):
            problem = _cron_item(item, field)
            if problem is not None:
                return problem
    return None


def check_cron(text: str) -> str | None:
    """``None`` for a schedule Kubernetes' CronJob accepts and that runs at least once in 5 years."""
    problem = _cron_problem(text)
    if problem is None:
        start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        try:
            upcoming = croniter(text, start).get_next(datetime.datetime)
        except (ValueError, KeyError):  # croniter's errors subclass ValueError
            upcoming = None
        if upcoming is None or upcoming - start > datetime.timedelta(days=5 * 366):
            problem = "it never runs (no such date)"
    if problem is None:
        return None
    return f'"{text}" is not a schedule: {problem}; {_CRON_HELP}'


# --- names and labels -----------------------------------------------------------------------------------

_LOWER_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_ALNUM = _LOWER_ALNUM | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_dns_label(text: str) -> bool:
    return (
        0 < len(text) <= 63
        and set(text) <= _LOWER_ALNUM | {"-"}
        and text[0] in _LOWER_ALNUM
        and text[-1] in _LOWER_ALNUM
    )


def _is_dns_subdomain(text: str) -> bool:
    return 0 < len(text) <= 253 and all(_is_dns_label(part) for part in text.split("."))


def check_service_name(text: str) -> str | None:
    """A DNS-1035 label (Service names): a DNS label that starts with a letter."""
    if _is_dns_label(text) and text[0].isalpha():
        return None
    return (
        f"\"{text}\" is not a valid name: use lowercase letters, digits and '-', starting with a letter "
        "and ending with a letter or digit (e.g. llama-cache)"
    )


def _is_label_name(text: str) -> bool:
    return (
        0 < len(text) <= 63
        and set(text) <= _ALNUM | {"-", "_", "."}
        and text[0] in _ALNUM
        and text[-1] in _ALNUM
    )


def check_label_key(key: str) -> str | None:
    """A qualified name: ``[prefix/]name`` (prefix a DNS subdomain, name at most 63 characters)."""
    prefix, slash, name = key.rpartition("/")
    if _is_label_name(name) and (not slash or _is_dns_subdomain(prefix)):
        return None
    return (
        f"\"{key}\" is not a label key: use at most 63 letters, digits, '-', '_' and '.', starting "
        "and ending with a letter or digit, optionally after a DNS prefix and '/' (e.g. example.com/tier)"
    )


def check_label_value(value: str) -> str | None:
    if value == "" or _is_label_name(value):
        return None
    return (
        f"\"{value}\" is not a label value: use at most 63 letters, digits, '-', '_' and '.', "
        "starting and ending with a letter or digit (or leave it empty)"
    )


def check_labels(labels: Mapping[str, str]) -> list[str]:
    """Every problem with a map of labels (keys then values)."""
    problems = [p for key in labels if (p := check_label_key(key)) is not None]
    problems += [p for value in labels.values() if (p := check_label_value(value)) is not None]
    return problems


# --- rules shared by the CRD (CEL) and Python ----------------------------------------------------------


@dataclass(frozen=True)
class FieldRule:
    """A rule on one string field. ``message`` is the problem in words, ``{value}`` marking where the
    value goes; ``ok`` is the rule in Python; ``cel`` the same rule for the CRD (``self`` is the value),
    ``None`` when only Python enforces it (the admission webhook and the operator). The API server
    prefixes the field path, as ``parse_kvcache`` does: both say the same words."""

    message: str
    ok: Callable[[str], bool]
    cel: str | None = None
    detail: Callable[[str], str | None] | None = None  # Python-only rules: a message per value

    def problem(self, value: str) -> str | None:
        if self.detail is not None:
            return self.detail(value)
        return None if self.ok(value) else self.message.replace("{value}", value)

    def validations(self) -> list[dict[str, str]]:
        """This rule's ``x-kubernetes-validations`` entry (none without CEL)."""
        if self.cel is None:
            return []
        before, _, after = self.message.partition("{value}")
        return [
            {
                "rule": self.cel,
                "message": self.message.replace('"{value}"', "the value"),
                "messageExpression": f"{_cel_string(before)} + self + {_cel_string(after)}",
            }
        ]


def _cel_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def matching(pattern: str) -> tuple[Callable[[str], bool], str]:
    """A predicate and its CEL rule from one anchored pattern that RE2 and Python read alike."""
    compiled = re.compile(pattern)
    return (lambda value: compiled.fullmatch(value) is not None), f"self.matches('^{pattern}$')"


def first_problem(rules: Iterable[FieldRule], value: str) -> str | None:
    """The first rule ``value`` breaks, in words (CEL-backed rules come first)."""
    return next((p for rule in rules if (p := rule.problem(value)) is not None), None)


def quantity_or_none(text: str) -> Decimal | None:
    """The value of a well-formed, non-negative quantity; None otherwise."""
    try:
        value = parse_quantity(text)
    except QuantityError:
        return None
    return None if text.startswith("-") else value


def _cores(value: Decimal) -> str:
    return f"{value * 1000:f}m".replace(".000m", "m") if value < 1 else f"{value:f} cores"


def quantity_rules(
    *,
    what: str,
    example: str,
    maximum: Decimal,
    minimum: Decimal | None = None,
    positive: bool = True,
    unit: str = "bytes",
) -> tuple[FieldRule, ...]:
    """A non-negative quantity (CEL: the grammar), then, in Python, its bounds: at least ``minimum``
    (else more than 0 when ``positive``) and at most ``maximum``, shown in binary units or cores."""
    show = format_bytes if unit == "bytes" else _cores
    rules = [
        FieldRule(
            f'"{{value}}" is not {what}; use a Kubernetes quantity such as {example}',
            lambda text: quantity_or_none(text) is not None,
            QUANTITY_CEL,
        )
    ]
    if minimum is not None:
        floor = minimum
        rules.append(
            FieldRule(
                f'"{{value}}" is too small: {what} must be at least {show(floor)} (such as {example})',
                lambda text: (q := quantity_or_none(text)) is None or q >= floor,
            )
        )
    elif positive:
        rules.append(
            FieldRule(
                f'"{{value}}" is too small: {what} must be more than 0 (such as {example})',
                lambda text: (q := quantity_or_none(text)) is None or q > 0,
            )
        )
    rules.append(
        FieldRule(
            f'"{{value}}" is too large: {what} must be at most {show(maximum)}',
            lambda text: (q := quantity_or_none(text)) is None or q <= maximum,
        )
    )
    return tuple(rules)


_DURATION = "[0-9]+(ms|s|m|h)"


def duration_rules(*, what: str, minimum: str, maximum: str) -> tuple[FieldRule, ...]:
    """One number and one unit (ms, s, m, h), then the range [minimum, maximum] (CEL: ``duration()``)."""
    matches, cel = matching(_DURATION)
    low, high = parse_duration(minimum), parse_duration(maximum)
    in_range = f"duration(self) >= duration('{minimum}') && duration(self) <= duration('{maximum}')"
    return (
        FieldRule(f'"{{value}}" is not a duration; write {what} like 30s (units: ms, s, m, h)', matches, cel),
        FieldRule(
            f'"{{value}}" is out of range: {what} must be between {minimum} and {maximum}',
            lambda v: not matches(v) or low <= parse_duration(v) <= high,
            f"!{cel} || ({in_range})",
        ),
    )


_CRON_ITEM = "[0-9A-Za-z*?,/-]+"
_CRON_SHAPE = f"(@[a-z]+|{_CRON_ITEM}( +{_CRON_ITEM}){{4}})"


def cron_rules() -> tuple[FieldRule, ...]:
    """Five fields or a macro (CEL: the shape), then, in Python, every value in range and a next run."""
    shaped, cel = matching(_CRON_SHAPE)
    return (
        FieldRule(f'"{{value}}" is not a schedule; {_CRON_HELP}', shaped, cel),
        FieldRule(
            '"{value}" is not a schedule Kubernetes runs',
            lambda v: not shaped(v) or check_cron(v) is None,
            detail=lambda v: check_cron(v) if shaped(v) else None,
        ),
    )


DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = f"{DNS_LABEL}([.]{DNS_LABEL})*"


def dns_subdomain_rules(what: str, example: str) -> tuple[FieldRule, ...]:
    matches, cel = matching(DNS_SUBDOMAIN)
    return (
        FieldRule(
            f"\"{{value}}\" is not a valid {what}: use lowercase letters, digits, '-' and '.', starting "
            f"and ending with a letter or digit (e.g. {example})",
            matches,
            cel,
        ),
    )


def dns_label_rules(what: str, example: str) -> tuple[FieldRule, ...]:
    matches, cel = matching(DNS_LABEL)
    return (
        FieldRule(
            f"\"{{value}}\" is not a valid {what}: use lowercase letters, digits and '-', starting and "
            f"ending with a letter or digit (e.g. {example})",
            matches,
            cel,
        ),
    )
