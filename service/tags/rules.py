"""What a tag name may be. One rule for the tag endpoints and for names given on a task."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator
from pydantic import Field as PField

from service.text import CONTROLS, EDGE, KEPT, SHOWN, SPACES, control_error, is_blank

TAG_NAME_MAX = 50
TAGS_PER_TASK_MAX = 20
TAGS_PER_USER_MAX = 1000


def clean_tag_name(value: str) -> str:
    """No control characters (not even a trailing newline), trimmed, 1-50 characters, not
    blank (`service.text`: invisible characters do not count)."""
    if error := control_error(value):
        raise ValueError(f"a tag name {error}")
    value = value.strip()
    if is_blank(value):
        raise ValueError("a tag name must not be blank")
    if len(value) > TAG_NAME_MAX:
        raise ValueError(f"a tag name must be at most {TAG_NAME_MAX} characters")
    return value


def tag_key(name: str) -> str:
    """Names that differ only in case, for ordering. Which names are one stored tag is
    PostgreSQL's lower() (service.tags.queries), never this: Python folds some names that it
    keeps apart ('ΟΔΟΣ' is 'οδος' to Python, 'οδοσ' to PostgreSQL)."""
    return name.lower()


def sorted_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """The order tags are shown and recorded in: case-insensitive, then exact."""
    return sorted(names, key=lambda name: (tag_key(name), name))


def unique_names(names: list[str]) -> list[str]:
    """Each name once, in the order given. Names differing only in case are made one tag
    (the first spelling kept) where they are looked up, by PostgreSQL's lower()."""
    return list(dict.fromkeys(names))


# What `clean_tag_name` accepts, for the schema: spaces (whitespace that is no control
# character) around at most TAG_NAME_MAX characters that start and end with neither, hold no
# control character and a visible one. The lookahead bounds the trimmed length, which
# `maxLength` (the name as sent) cannot.
_SPACE = f"[{SPACES}]"
TAG_NAME_PATTERN = (
    rf"^{_SPACE}*(?={EDGE}(?:[^{CONTROLS}]{{0,{TAG_NAME_MAX - 2}}}{EDGE})?{_SPACE}*$)"
    rf"(?:{EDGE}{KEPT})?{SHOWN}(?:{KEPT}{EDGE})?{_SPACE}*$"
)

TagName = Annotated[
    str,
    PField(
        min_length=1,
        # As sent: trimmed, it is at most TAG_NAME_MAX.
        max_length=TAG_NAME_MAX * 4,
        description=f"Trimmed, 1-{TAG_NAME_MAX} characters, no control characters, not blank "
        "(zero-width and bidi characters alone are blank)",
        examples=["work"],
        json_schema_extra={"pattern": TAG_NAME_PATTERN},
    ),
    AfterValidator(clean_tag_name),
]
# The list on a task; names differing only in case become one tag (service.tags.queries).
TagNames = Annotated[
    list[TagName],
    PField(
        max_length=TAGS_PER_TASK_MAX,
        description=f"Tag names, at most {TAGS_PER_TASK_MAX}; "
        "unknown names are created. Responses list them sorted.",
        examples=[["home", "urgent"]],
    ),
    AfterValidator(unique_names),
]
