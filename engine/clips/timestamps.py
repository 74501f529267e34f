"""Timestamps files: one cut per line, `start [end | +duration] [name]`, `#` comments."""

from __future__ import annotations

import os
import re
from typing import Sequence

from engine.clips.cut import ClipError, Cut
from engine.core.files import TextFileError, read_text
from engine.core.video import format_time

# ---------------------------------------------------------------- timestamps files

_TIME_RE = re.compile(r"^(?:(\d+):)?(?:(\d+):)?(\d+(?:\.\d*)?|\.\d+)$")


def parse_time(text: str) -> float:
    """Seconds from '75.5', '1:15.5' or '00:01:15.500'."""
    match = _TIME_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a time (use seconds like 75.5, or hh:mm:ss.mmm like 00:01:15.500)")
    first, second, seconds = match.groups()
    hours, minutes = (first, second) if second is not None else (None, first)
    if minutes is not None and hours is not None and int(minutes) >= 60:
        raise ValueError(f"{text!r}: minutes must be below 60")
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


def parse_timestamps(text: str) -> list[Cut]:
    """Parse a timestamps file: one cut per line, `START [END | +DURATION] [NAME]`, times as seconds or
    hh:mm:ss.mmm, fields separated by spaces, commas or ' - ', `#` starts a comment. Errors name the line."""
    cuts = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = [t for t in re.split(r"[\s,]+", line) if t and t not in ("-", "–", "->")]
        try:
            start = parse_time(tokens[0])
            end, rest = None, tokens[1:]
            if rest:
                second = rest[0]
                if second.startswith("+"):
                    end, rest = start + parse_time(second[1:]), rest[1:]
                elif _TIME_RE.match(second):
                    end, rest = parse_time(second), rest[1:]
        except ValueError as exc:
            raise ClipError(f"Timestamps line {number} ({raw.strip()!r}): {exc}.") from None
        if end is not None and end <= start:
            raise ClipError(f"Timestamps line {number} ({raw.strip()!r}): the end {end:.3f} s is not after the "
                            f"start {start:.3f} s.")
        cuts.append(Cut(start=start, end=end, name=" ".join(rest)))
    return cuts


def read_timestamps(path: str | os.PathLike) -> list[Cut]:
    """The cuts of a timestamps file (read_text: with or without a byte-order mark, any line ends).

    Raises ClipError naming the file when it cannot be read, is not UTF-8, or has a bad line."""
    try:
        text = read_text(path)
    except (OSError, TextFileError) as exc:
        raise ClipError(f"Cannot read the timestamps file {path}: {exc}") from None
    return parse_timestamps(text)


def format_timestamps(cuts: Sequence[Cut]) -> str:
    """The timestamps file for `cuts` (parse_timestamps reads it back unchanged, to the millisecond)."""
    lines = ["# start [end] [name]: times as hh:mm:ss.mmm; written by Wan LoRA Studio"]
    for cut in cuts:
        fields = [format_time(cut.start)] + ([format_time(cut.end)] if cut.end is not None else [])
        lines.append(" ".join(fields + ([cut.name] if cut.name else [])))
    return "\n".join(lines) + "\n"
