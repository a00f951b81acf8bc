"""Recurrence rules: the RFC 5545 RRULE subset people use, parsed by python-dateutil.

A task's rule describes the rest of its series, starting at its own `due_at` (the rule's
DTSTART). Completing the task creates the next occurrence at the rule's first date after that
`due_at`; with `COUNT=n` the next occurrence carries `COUNT=n-1` (the count includes the task
itself), so `COUNT=1` means "this is the last one". Dates are computed in UTC, the zone
`due_at` is stored and returned in. A rule a client sets must have a date after `due_at`
(`check_recurs`); the search for it is bounded (`_no_month_has_the_day`).
"""

from __future__ import annotations

import re
import string
from calendar import monthrange
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, datetime
from math import gcd

from dateutil.rrule import rrule, rrulestr

from service.text import control_error

RULE_MAX = 200
INTERVAL_MAX = 1000
COUNT_MAX = 1000
FREQUENCIES = ("DAILY", "WEEKLY", "MONTHLY", "YEARLY")
# The supported parts, in the order the stored rule lists them.
PARTS = ("FREQ", "INTERVAL", "BYDAY", "BYMONTHDAY", "COUNT", "UNTIL")
_PREFIX = re.compile(r"^RRULE:", re.IGNORECASE | re.ASCII)
# RFC 5545's names and values are ASCII, their case ignored in ASCII only. str.upper() would
# read `dA\u0131LY` (a dotless i) as DAILY and `\u017fa` (a long s) as SA; str.strip() would
# take other scripts' spaces (a no-break space) for the spaces allowed around a list's commas.
_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_SPACES = string.whitespace
_WEEKDAY = re.compile(r"^(MO|TU|WE|TH|FR|SA|SU)$")
# RFC 5545's numbers are ASCII digits; Python's int() also takes other scripts' digits,
# '1_0' and '+3'.
_DIGITS = re.compile(r"[0-9]{1,9}")
_MONTH_DAY = re.compile(r"[+-]?[0-9]{1,2}")
# RFC 5545's UTC form only: dateutil also reads `+01`, `UTC`, dashes, no seconds or fractions.
_UNTIL = re.compile(r"[0-9]{8}T[0-9]{6}Z")
# Any aware time works for checking a rule's syntax; UNTIL must then be in UTC (`...Z`).
_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)

EXAMPLES = ["FREQ=WEEKLY;BYDAY=MO,WE,FR", "FREQ=MONTHLY;BYMONTHDAY=-1;COUNT=12"]
DESCRIPTION = (
    "iCalendar RRULE (RFC 5545), without the `RRULE:` prefix. Supported: `FREQ=DAILY|WEEKLY|"
    f"MONTHLY|YEARLY`, `INTERVAL` (1-{INTERVAL_MAX}), `BYDAY` (weekly, e.g. `MO,WE`), "
    "`BYMONTHDAY` (monthly, 1-31 or -31 to -1 counting from the month's end), and at most one "
    f"of `COUNT` (1-{COUNT_MAX}, "
    "this task included) or `UNTIL` (UTC, e.g. `20271231T235959Z`). Needs `due_at`, and a "
    "date after it (`COUNT=1` aside): a rule that can never recur is a 400. `null` removes "
    "it. Dates are computed in UTC."
)


class RuleError(ValueError):
    """A rule that is not valid or uses a part that is not supported; the message says which."""


@dataclass(frozen=True, slots=True)
class Occurrence:
    due_at: datetime
    rule: str


def _split(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for chunk in text.split(";"):
        name, sep, value = chunk.partition("=")
        name = name.strip(_SPACES).translate(_UPPER)
        if not sep or not name or not value.strip(_SPACES):
            raise RuleError(f"'{chunk}' is not a NAME=VALUE part")
        if name not in PARTS:
            raise RuleError(
                f"{name} is not supported (supported parts: {', '.join(PARTS)})",
            )
        if name in parts:
            raise RuleError(f"{name} is given twice")
        # A list without the spaces around its commas, which RFC 5545 does not allow.
        parts[name] = ",".join(item.strip(_SPACES) for item in value.split(",")).translate(_UPPER)
    return parts


def _check_supported(parts: dict[str, str]) -> None:
    """What dateutil accepted (so the numbers parse) but this product does not support."""
    freq = parts["FREQ"]
    if freq not in FREQUENCIES:
        raise RuleError(f"FREQ={freq} is not supported (use DAILY, WEEKLY, MONTHLY or YEARLY)")
    if "COUNT" in parts and "UNTIL" in parts:
        raise RuleError("give COUNT or UNTIL, not both")
    if not _within(parts.get("INTERVAL", "1"), INTERVAL_MAX):
        raise RuleError(f"INTERVAL must be between 1 and {INTERVAL_MAX}")
    if "COUNT" in parts and not _within(parts["COUNT"], COUNT_MAX):
        raise RuleError(f"COUNT must be between 1 and {COUNT_MAX}")
    if "UNTIL" in parts and not _UNTIL.fullmatch(parts["UNTIL"]):
        raise RuleError("UNTIL must be a UTC time written like 20271231T235959Z")
    if "BYDAY" in parts:
        if freq != "WEEKLY":
            raise RuleError(f"BYDAY is supported with FREQ=WEEKLY only, not FREQ={freq}")
        for day in parts["BYDAY"].split(","):
            if not _WEEKDAY.match(day):
                raise RuleError(f"BYDAY={day} is not supported (use weekdays such as MO,WE)")
    if "BYMONTHDAY" in parts:
        if freq != "MONTHLY":
            raise RuleError(f"BYMONTHDAY is supported with FREQ=MONTHLY only, not FREQ={freq}")
        for day in parts["BYMONTHDAY"].split(","):
            if not _MONTH_DAY.fullmatch(day) or not 1 <= abs(int(day)) <= 31:
                raise RuleError(f"BYMONTHDAY={day} is not a day of the month (1-31 or -31 to -1)")


def _canonical(parts: dict[str, str]) -> str:
    """One spelling per rule: numbers without sign or leading zeros, each list item once; so
    a rule sent again as written differently is no change."""
    parts = dict(parts)
    for name in ("INTERVAL", "COUNT"):
        if name in parts:
            parts[name] = str(int(parts[name]))
    if "BYMONTHDAY" in parts:
        parts["BYMONTHDAY"] = ",".join(str(int(day)) for day in parts["BYMONTHDAY"].split(","))
    for name in ("BYDAY", "BYMONTHDAY"):
        if name in parts:
            parts[name] = ",".join(dict.fromkeys(parts[name].split(",")))
    return ";".join(f"{name}={parts[name]}" for name in PARTS if name in parts)


def _within(number: str, maximum: int) -> bool:
    return bool(_DIGITS.fullmatch(number)) and 1 <= int(number) <= maximum


def _parse(text: str, dtstart: datetime) -> rrule:
    try:
        parsed = rrulestr(text, dtstart=dtstart)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RuleError(f"not a valid RRULE: {exc}") from None
    if not isinstance(parsed, rrule):  # an rruleset (several lines): refused earlier
        raise RuleError("only a single RRULE is supported")
    return parsed


def normalize(text: str) -> str:
    """The rule as stored: validated, upper case, parts in a fixed order, no `RRULE:` prefix.

    Raises RuleError naming the part that is wrong or not supported.
    """
    text = _PREFIX.sub("", text.strip(_SPACES))
    if not text:
        raise RuleError("must not be empty")
    if len(text) > RULE_MAX:
        raise RuleError(f"must be at most {RULE_MAX} characters")
    if any(ch in text for ch in "\r\n\x00") or ":" in text:
        raise RuleError("only the RRULE value is supported (no DTSTART, RDATE or EXDATE lines)")
    if error := control_error(text):
        raise RuleError(error)
    parts = _split(text)
    if "FREQ" not in parts:
        raise RuleError("FREQ is required")
    _parse(";".join(f"{name}={value}" for name, value in parts.items()), _REFERENCE)
    _check_supported(parts)
    return _canonical(parts)


# The Gregorian calendar repeats every 400 years (4800 months): which months are long enough
# for a day of the month never depends on more than that.
_CYCLE_MONTHS = 4800


def _no_month_has_the_day(parts: dict[str, str], due_at: datetime) -> bool:
    """True when no month the rule visits has a day it names after `due_at`, so it has no
    date after `due_at` at all (`FREQ=MONTHLY;INTERVAL=12;BYMONTHDAY=31` from February).

    dateutil finds that out only by visiting every month up to year 9999 (tens of ms); this
    looks at one 400-year cycle at most (a few hundred steps of arithmetic). A rule that has
    such a month reaches it within 16 periods, whatever its due date, so dateutil's search
    is short too.
    """
    freq = parts["FREQ"]
    if freq not in ("MONTHLY", "YEARLY"):
        return False  # every day or week has a date of a daily or weekly rule
    step = int(parts.get("INTERVAL", "1")) * (12 if freq == "YEARLY" else 1)
    days = [int(day) for day in parts.get("BYMONTHDAY", str(due_at.day)).split(",")]
    shortest = min(abs(day) for day in days)
    if shortest <= 28:
        return False  # every month has it
    # `due_at`'s own month: a later day of it (-1 is the month's last day).
    length = monthrange(due_at.year, due_at.month)[1]
    later = [d if d > 0 else length + 1 + d for d in days if abs(d) <= length]
    if any(day > due_at.day for day in later):
        return False
    start = due_at.year * 12 + due_at.month - 1
    for k in range(1, _CYCLE_MONTHS // gcd(step, _CYCLE_MONTHS) + 1):
        year, month = divmod(start + k * step, 12)
        if year > MAXYEAR:
            break
        if monthrange(year, month + 1)[1] >= shortest:
            return False
    return True


def check_recurs(rule: str, due_at: datetime) -> None:
    """Raise RuleError when the rule has no date after `due_at`: a task given it would never
    recur, silently. `COUNT=1` is the exception: it says on purpose "the last one"."""
    parts = _split(rule)
    if parts.get("COUNT") == "1" or next_occurrence(rule, due_at) is not None:
        return
    if "UNTIL" in parts and _until(parts["UNTIL"]) <= due_at:
        raise RuleError(
            "UNTIL is not after due_at, so the task would never recur: move UNTIL later, or "
            "remove recurrence."
        )
    raise RuleError(
        "The rule has no date after due_at (up to year 9999), so the task would never recur: "
        "change the rule or due_at, or remove recurrence."
    )


def _until(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


def next_occurrence(rule: str, due_at: datetime) -> Occurrence | None:
    """The occurrence after the one due at `due_at`, or None when the rule is exhausted.

    Bounded in cost: well under a millisecond for any rule and due date (bench/recurrence.py).
    """
    parts = _split(rule)
    remaining = int(parts.pop("COUNT")) if "COUNT" in parts else None
    if remaining is not None and remaining <= 1:
        return None
    due_at = due_at.astimezone(UTC)
    # dateutil drops DTSTART's microseconds (RFC 5545 times are whole seconds): the rule's
    # dates are computed, and compared with UNTIL, to the second, and every occurrence gets
    # back `due_at`'s fraction, so the series stays the rule's interval apart.
    start = due_at.replace(microsecond=0)
    following = None
    if not _no_month_has_the_day(parts, start):
        rest = ";".join(f"{name}={value}" for name, value in parts.items())
        try:
            following = _parse(rest, start).after(start, inc=False)
        except (ValueError, OverflowError):  # past year 9999
            return None
    if following is None:
        return None
    if remaining is not None:
        parts["COUNT"] = str(remaining - 1)
    next_rule = ";".join(f"{name}={parts[name]}" for name in PARTS if name in parts)
    due = following.astimezone(UTC).replace(microsecond=due_at.microsecond)
    return Occurrence(due_at=due, rule=next_rule)
