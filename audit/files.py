"""The audit tools' output files (`audit export`, `audit checkpoint`, the periodic checkpoint
copies): each appears only once complete, so a reader never takes half a file for a whole one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def complete_file(path: Path, *, newline: str | None = None) -> Iterator[TextIO]:
    """Written beside `path`, then renamed over it. A path that is no regular file once its
    links are followed (/dev/null, /dev/stdout, a FIFO) is written into, as a shell's `>`
    would: renaming over it would replace the device itself. A symbolic link stays, and the
    file it names is the one replaced."""
    if path.exists() and not path.is_file():
        with path.open("w", encoding="utf-8", newline=newline) as out:
            yield out
        return
    target = path.resolve() if path.is_symlink() else path
    partial = target.with_name(target.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8", newline=newline) as out:
            yield out
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def write_complete_file(path: Path, content: str) -> None:
    with complete_file(path) as out:
        out.write(content)
