"""Atomic file writes (a crash or a full disk never leaves a half-written file in place of a good one), and the one
reader of text inputs (cut lists, captions, style rules, TOML, sidecars) that accepts what editors save.

A write goes to a hidden temporary name beside its target, `.<target name>.<pid>-<random>.tmp<ending>`, is synced to
disk, renamed over the target, and the folder is synced so the rename itself survives a power cut. A process killed
mid-write leaves its temporary file behind: `remove_stale_temps` clears those of dead processes when a stage starts.
Files get the permissions the user's umask gives (not mkstemp's 0600), so another user's tool can read them.
"""

from __future__ import annotations

import codecs
import fcntl
import filecmp
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which would race
    with other threads creating files meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# .<target name>.<pid>-<8 random chars from mkstemp>.tmp<ending>, or a folder .<name>.<pid>-<random>.tmp
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp(\..*)?")


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}-"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in `folder` durable (a file's own fsync does not cover its folder's entry)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename.

    `suffix` is the temporary file's ending (default `.tmp` + the target's extension; ffmpeg reads the container from
    it). With `overwrite=False` an existing `target` is never replaced: FileExistsError is raised instead (also when
    another writer got there first). On any error the temporary file is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    ending = suffix if suffix is not None and suffix.startswith(".tmp") else f".tmp{suffix or target.suffix}"
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=ending, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes 0600, and writers that replace the file (safetensors) keep that: give the usual permissions
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync_file(tmp)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if target exists, unlike a rename
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success every file in it is synced and the folder takes
    `target`'s place in one rename (an older `target` is removed first). On any error nothing is left behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        umask = current_umask()  # mkdtemp makes 0700 and safetensors writes 0600: give the usual permissions
        for path in [tmp, *tmp.rglob("*")]:
            if path.is_dir():
                os.chmod(path, 0o777 & ~umask)
            elif path.is_file():
                os.chmod(path, 0o666 & ~umask)
                _fsync_file(path)
        fsync_dir(tmp)
        if target.exists():  # the same folder written again (e.g. a state saved twice at one step)
            shutil.rmtree(target)
        tmp.rename(target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Remove the temporary files and folders that killed writers left in `folder` (and below, with `recursive`).

    Only names of this module's pattern whose writing process is gone are touched, so a write in progress elsewhere
    (another thread or process) is never disturbed. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(".*") if recursive else folder.glob(".*"):
        match = _TEMP_NAME.fullmatch(path.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


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


def append_numbered_jsonl(target: str | os.PathLike, record: dict, key: str = "id") -> int:
    """Append `record` with `key` set to one more than the highest number in the file; returns that number.

    The read and the append happen under an exclusive lock on the file, so two writers never get the same number.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a+", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        number = max((r.get(key, 0) for r in read_jsonl(target) if isinstance(r.get(key), int)), default=0) + 1
        f.write(json.dumps({**record, key: number}, ensure_ascii=False) + "\n")
        f.flush()
    return number


def copy_keeping_apart(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy `source` to `target` unless a file with the same bytes is there; a different file of that name is kept
    and the copy gets the next free numbered name ("IMG_0001 (2).mp4"). Returns where the bytes now are.

    Same bytes are the same file (uploading it again reuses the copy); nothing is ever overwritten.
    """
    source, target = Path(source), Path(target)
    number = 1
    while True:
        candidate = target if number == 1 else target.with_name(f"{target.stem} ({number}){target.suffix}")
        if candidate.exists():
            if candidate.is_file() and filecmp.cmp(source, candidate, shallow=False):
                return candidate
            number += 1
            continue
        try:
            with atomic_path(candidate, overwrite=False) as tmp:
                shutil.copyfile(source, tmp)
        except FileExistsError:  # another upload took this name meanwhile: compare with it on the next pass
            continue
        return candidate


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
