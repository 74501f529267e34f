"""Caption text as it is stored: the one reader of caption files (the dataset check, the trainer and the Captions tab
all read captions through it) and the errors every caption reader and writer raises."""

from __future__ import annotations

import os
from pathlib import Path

from engine.core.files import TextFileError, read_text


class CaptionError(ValueError):
    """A caption operation that cannot go ahead, with what is wrong and what to do."""


class CaptionEncodingError(CaptionError):
    """A caption file is not UTF-8 text; `position` is the first byte that cannot be decoded, `detail` the message
    without the file's name (for lists that show the name already)."""

    def __init__(self, path: Path, position: int, detail: str):
        self.path, self.position, self.detail = path, position, detail
        super().__init__(f"{path.name} is {detail} ({path})")


def read_caption(path: str | os.PathLike) -> str:
    """The caption in a caption file, exactly as it is trained and shown: UTF-8 with or without a byte-order mark
    (the mark is never part of the text), line ends as "\\n", surrounding whitespace stripped.

    Raises FileNotFoundError (OSError) as open() does, and CaptionEncodingError naming the file and what to do when
    the file is not UTF-8 (e.g. saved as Windows-1252)."""
    path = Path(path)
    try:
        return read_text(path).strip()
    except TextFileError as err:
        raise CaptionEncodingError(path, err.position, (
            f"{err.reason}: open its clip in the Captions tab and save the caption there (the original bytes are "
            "kept), or save the file again as UTF-8")) from None
