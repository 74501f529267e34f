"""Atomic file writes (a crash or a full disk never leaves a half-written file in place of a good one), and the one
reader of text inputs (cut lists, captions, style rules, TOML, sidecars) that accepts what editors save."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    On any error the temporary file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix if suffix is not None else f".tmp{target.suffix}",
        dir=target.parent,
    )
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class TextFileError(ValueError):
    """A text input is not UTF-8 text; the message names the file, the first bad byte and what to do."""

    def __init__(self, path: Path, position: int, byte: int):
        self.path, self.position = path, position
        self.reason = f"not UTF-8 text (byte {position} is 0x{byte:02x}: saved as Windows-1252 or Latin-1?)"
        super().__init__(f"{path.name} is {self.reason}. Save it again as UTF-8 (in Notepad: Save as, Encoding "
                         f"UTF-8) and retry. File: {path}")


def read_text(source: str | os.PathLike) -> str:
    """The text of a text input as every reader in the studio takes it: UTF-8 with or without a byte-order mark
    (UTF-16 when the file starts with a UTF-16 byte-order mark, as Notepad's "Unicode"), the mark never part of the
    text, and CRLF or CR line ends read as "\\n".

    Raises OSError (FileNotFoundError, ...) as open() does, and TextFileError when the bytes are not UTF-8.
    """
    source = Path(source)
    data = source.read_bytes()
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"
    else:
        encoding = "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise TextFileError(source, err.start, data[err.start]) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file's bytes, remembered per (path, mtime, size): a file is hashed once per version.
    Raises OSError when the file cannot be read."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def append_jsonl(target: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as one line; a single write() so a crash loses at most that line."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(target, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(source: str | os.PathLike) -> list[dict]:
    """Read JSON lines, skipping a torn last line left by a crash."""
    source = Path(source)
    if not source.exists():
        return []
    records = []
    for line in source.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_json_lines_since(path: str | os.PathLike, offset: int) -> tuple[list[dict], int]:
    """JSON objects from the complete lines appended to `path` after byte `offset`, and the offset to read on from.

    A half-written last line is left for the next call; lines that are not JSON objects (plain log text) are skipped.
    If the file shrank (rewritten), reading starts again from the beginning.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    if size < offset:
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size - offset)
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        line = line.strip()
        if not line.startswith(b"{"):
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end
