"""Which characters the text a client sends may hold: one definition for titles,
descriptions, tag names, the search text, the token's name and email, and user ids.

Control characters (Unicode category Cc: C0, DEL and C1) are never stored: no one types them,
and they rewrite terminals, logs and exports (`ESC [2J`, a bare carriage return). A multi-line
field (a description) may still hold tab, line feed and carriage return. The character
classes are regex text, so the OpenAPI patterns built from them say exactly what is enforced.

Characters that show nothing (Unicode's default-ignorable ones: zero-width, bidi controls, the
BOM, ...) are not content: a title or tag name made of them and whitespace is blank. Beside
visible text they are kept as sent (they join emoji and order right-to-left words).
"""

from __future__ import annotations

import re
from typing import TypeGuard

from service.limits import USER_ID_MAX

# Unicode's control characters (category Cc): C0, DEL, C1.
CONTROLS = r"\x00-\x1f\x7f-\x9f"
# The same without tab, line feed and carriage return: what a multi-line field may not hold.
CONTROLS_BUT_LINE_BREAKS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
# What str.strip() removes (str.isspace()).
WHITESPACE = r"\t\n\x0b\x0c\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# The same without the control characters: what may surround a one-line name.
SPACES = r"\x20\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): characters that show
# nothing, e.g. zero-width space, joiners, bidi marks and controls, the soft hyphen, Hangul
# fillers, variation selectors, the BOM and the tag characters. Those beyond the BMP are the
# characters themselves, not escapes: Python's and ECMAScript's (OpenAPI's) regex dialects
# spell astral escapes differently, and both read the characters.
INVISIBLE = (
    r"\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e"
    r"\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
)

# For the OpenAPI schema: text that a multi-line field may hold.
MULTI_LINE_PATTERN = rf"^[^{CONTROLS_BUT_LINE_BREAKS}]*$"
# The parts of a one-line value's pattern (a title's, a tag name's): a run of characters that
# are not controls, an end of the trimmed text, and a character that shows.
KEPT = f"[^{CONTROLS}]*"
EDGE = f"[^{CONTROLS}{WHITESPACE}]"
SHOWN = f"[^{CONTROLS}{WHITESPACE}{INVISIBLE}]"

# A user id: the token's `sub`, the `{user_id}` of a path, REMINDER_ACTOR_ID and what `dev-token`
# signs. One line, not whitespace alone (str.strip() leaves something), no control character,
# at most USER_ID_MAX characters (checked beside the pattern, as `max_length` in OpenAPI).
USER_ID_PATTERN = rf"^[^{CONTROLS}]*[^{CONTROLS}{WHITESPACE}][^{CONTROLS}]*$"
USER_ID_RULE = (
    f"a user id is 1 to {USER_ID_MAX} characters, not whitespace alone, without control characters"
)

_CONTROL = re.compile(f"[{CONTROLS}]")
_USER_ID = re.compile(USER_ID_PATTERN)
_CONTROL_BUT_LINE_BREAKS = re.compile(f"[{CONTROLS_BUT_LINE_BREAKS}]")
_VISIBLE = re.compile(f"[^{WHITESPACE}{INVISIBLE}]")

SINGLE_LINE_RULE = "must not contain control characters"
MULTI_LINE_RULE = (
    "must not contain control characters other than tab, line feed and carriage return"
)


def control_error(value: str, *, multi_line: bool = False) -> str | None:
    """Why `value` cannot be stored, naming the first control character found (its code
    point, not the character, which may not print); None when it can."""
    found = (_CONTROL_BUT_LINE_BREAKS if multi_line else _CONTROL).search(value)
    if found is None:
        return None
    rule = MULTI_LINE_RULE if multi_line else SINGLE_LINE_RULE
    return f"{rule} (found U+{ord(found.group()):04X})"


def is_user_id(value: object) -> TypeGuard[str]:
    """Whether `value` is a user id the API can serve (USER_ID_PATTERN, USER_ID_MAX)."""
    return (
        isinstance(value, str)
        and len(value) <= USER_ID_MAX
        and _USER_ID.fullmatch(value) is not None
    )


def is_utf8(value: str) -> bool:
    """Whether `value` has a UTF-8 form, as PostgreSQL's text needs: a lone surrogate has none
    (`"\\ud800"` in JSON, or a byte that is not UTF-8 in a command's argument, which Python
    reads as one)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_line(value: object) -> str:
    """An error's message up to its first line break. PostgreSQL's (and libpq's) go on with
    `DETAIL`, `HINT`, `CONTEXT` and `LINE n:` lines, which quote values (`Key
    (user_id, lower(name))=(bob, groceries) already exists`) and the statement."""
    text = str(value).strip()
    return text.splitlines()[0] if text else ""


def is_blank(value: str) -> bool:
    """Nothing to see: only whitespace and invisible characters, or nothing at all."""
    return _VISIBLE.search(value) is None
