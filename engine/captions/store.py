"""Caption files beside their clips, with history and undo, kept suggestions, and table export/import."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

from engine.captions.style import CaptionChange, StyleRules, find_replace, normalize_caption, preview_style
from engine.captions.text import CaptionEncodingError, CaptionError, read_caption
from engine.core.files import (
    TextFileError,
    append_jsonl,
    append_numbered_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    read_jsonl,
    read_text,
)
from engine.core.layout import CaptionMetaLayout, caption_file, list_videos


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- caption files

@dataclass(frozen=True)
class CaptionText:
    """A caption as read from disk. `readable` is False for a non-UTF-8 file: `text` is then for display only."""

    text: str
    exists: bool
    readable: bool = True
    message: str = ""


@dataclass(frozen=True)
class Suggestion:
    clip: str
    text: str
    model: str
    time: str


@dataclass(frozen=True)
class CaptionInfo:
    """One clip's caption state, as the Captions tab lists it."""

    clip: str
    status: str  # "missing" | "suggested" | "edited" | "unreadable"
    text: str
    suggestion: Suggestion | None


class CaptionStore:
    """Caption files of one clips folder, with save history, undo and suggestions."""

    def __init__(self, clips_dir: str | Path):
        self.clips_dir = Path(clips_dir).expanduser()
        if not self.clips_dir.is_dir():
            raise CaptionError(f"Clips folder not found: {self.clips_dir}")
        self.layout = CaptionMetaLayout(self.clips_dir)

    # paths
    @property
    def meta_dir(self) -> Path:
        return self.layout.root

    @property
    def suggestions_file(self) -> Path:
        return self.layout.suggestions_file

    def clip_path(self, clip: str | Path) -> Path:
        """The clip file for a clip name (e.g. 'shot 1.mp4') or path; it must be in this clips folder."""
        path = self.clips_dir / Path(clip).name
        if not path.is_file():
            raise CaptionError(f"Clip not found: {path}")
        return path

    def caption_file(self, clip: str | Path) -> Path:
        return caption_file(self.clips_dir / Path(clip).name)

    def history_file(self, clip: str | Path) -> Path:
        return self.layout.history_file(clip)

    def list_clips(self) -> list[str]:
        return [p.name for p in list_videos(self.clips_dir)]

    # reading and saving
    def read(self, clip: str | Path) -> CaptionText:
        path = self.caption_file(clip)
        if not path.exists():
            return CaptionText("", exists=False)
        try:
            return CaptionText(read_caption(path), exists=True)
        except CaptionEncodingError as err:
            return CaptionText(
                path.read_bytes().decode("utf-8", errors="replace").strip(), exists=True, readable=False,
                message=(f"{path.name} is not UTF-8 text (byte {err.position} cannot be decoded); it is shown with "
                         f"\N{REPLACEMENT CHARACTER} marks and left untouched. Saving a new caption replaces it; "
                         f"the original bytes are kept in {self.layout.originals_dir}."),
            )

    def save(self, clip: str | Path, text: str, source: str = "human", replace_unreadable: bool = False) -> bool:
        """Write the caption (stripped) and record the change in history; return False when nothing changed.

        A non-UTF-8 caption file is only replaced with `replace_unreadable=True`; its bytes are kept first.
        """
        self.clip_path(clip)
        text = text.strip()
        current = self.read(clip)
        record = {"time": _now(), "source": source, "text": text,
                  "previous": current.text if current.exists else None}
        if not current.readable:
            if not replace_unreadable:
                raise CaptionError(current.message + " Confirm replacing it to save.")
            record["original_bytes_file"] = str(self._keep_original(clip))
        elif current.exists and current.text == text:
            return False
        self._append_history(clip, record)
        atomic_write_text(self.caption_file(clip), text)
        return True

    def _keep_original(self, clip: str | Path) -> Path:
        source = self.caption_file(clip)
        target = self.layout.originals_dir / f"{source.stem}.{datetime.now():%Y%m%d-%H%M%S-%f}.txt"
        atomic_write_bytes(target, source.read_bytes())
        return target

    def _append_history(self, clip: str | Path, record: dict) -> None:
        append_numbered_jsonl(self.history_file(clip), record)  # locked: two writers never share an id

    def history(self, clip: str | Path) -> list[dict]:
        return read_jsonl(self.history_file(clip))

    def undo_stack(self, clip: str | Path) -> list[dict]:
        """The saves that an undo would revert, oldest first (undone saves and the undos themselves removed)."""
        stack: list[dict] = []
        for record in self.history(clip):
            if record.get("source") == "undo":
                stack = [r for r in stack if r.get("id") != record.get("undoes")]
            else:
                stack.append(record)
        return stack

    def undo(self, clip: str | Path) -> str | None:
        """Revert the latest save that is not undone yet; return the restored text, or None if nothing to undo."""
        stack = self.undo_stack(clip)
        if not stack:
            return None
        last = stack[-1]
        current = self.read(clip)
        if not current.readable:
            raise CaptionError(current.message + " Undo would replace it; save a new caption instead.")
        previous = last.get("previous")
        self._append_history(clip, {"time": _now(), "source": "undo", "undoes": last["id"],
                                    "text": previous, "previous": current.text if current.exists else None})
        path = self.caption_file(clip)
        if previous is None:
            path.unlink(missing_ok=True)
            return ""
        if "original_bytes_file" in last:  # the undone save replaced a non-UTF-8 file: put its exact bytes back
            atomic_write_bytes(path, Path(last["original_bytes_file"]).read_bytes())
            return self.read(clip).text
        atomic_write_text(path, previous)
        return previous

    # suggestions
    def add_suggestion(self, clip: str | Path, text: str, model: str) -> Suggestion:
        suggestion = Suggestion(clip=Path(clip).name, text=text, model=model, time=_now())
        append_jsonl(self.suggestions_file, {**asdict(suggestion), "state": "pending"})
        return suggestion

    def _suggestion_records(self) -> dict[str, dict]:
        latest: dict[str, dict] = {}
        for record in read_jsonl(self.suggestions_file):
            latest[record.get("clip", "")] = record
        return latest

    def suggestion(self, clip: str | Path) -> Suggestion | None:
        """The pending (not yet accepted or ignored) suggestion for a clip."""
        return self._pending(self._suggestion_records().get(Path(clip).name))

    @staticmethod
    def _pending(record: dict | None) -> Suggestion | None:
        if not record or record.get("state") != "pending":
            return None
        return Suggestion(clip=record["clip"], text=record["text"], model=record.get("model", ""),
                          time=record.get("time", ""))

    def resolve_suggestion(self, clip: str | Path, action: str) -> str:
        """Accept (replace the caption), append (add its phrases) or ignore the pending suggestion.

        Returns the caption afterwards."""
        if action not in ("accept", "append", "ignore"):
            raise ValueError(f"action must be accept, append or ignore, not {action!r}")
        suggestion = self.suggestion(clip)
        if suggestion is None:
            raise CaptionError(f"No pending suggestion for {Path(clip).name}: run Suggest first.")
        current = self.read(clip)
        if action == "accept":
            self.save(clip, suggestion.text, source="suggestion")
        elif action == "append":
            joined = ", ".join(t for t in (current.text, suggestion.text) if t)
            self.save(clip, normalize_caption(joined, category_order=()), source="suggestion")  # dedupe only
        state = {"accept": "accepted", "append": "appended", "ignore": "ignored"}[action]
        append_jsonl(self.suggestions_file, {"clip": Path(clip).name, "state": state, "time": _now(),
                                             "text": suggestion.text})
        return self.read(clip).text

    def accept_suggestions_where_empty(self) -> list[str]:
        """Accept every pending suggestion whose clip has no caption yet (nothing is overwritten); return the clips."""
        accepted, clips = [], set(self.list_clips())
        for clip, record in self._suggestion_records().items():
            if self._pending(record) and clip in clips:
                current = self.read(clip)
                if current.readable and not current.text:
                    self.resolve_suggestion(clip, "accept")
                    accepted.append(clip)
        return accepted

    # overview
    def info(self, clip: str | Path, suggestions: dict[str, dict] | None = None) -> CaptionInfo:
        name = Path(clip).name
        records = suggestions if suggestions is not None else self._suggestion_records()
        suggestion = self._pending(records.get(name))
        current = self.read(name)
        if not current.readable:
            status = "unreadable"
        elif not current.text:
            status = "suggested" if suggestion else "missing"
        else:
            stack = self.undo_stack(name)
            last = stack[-1] if stack else {}
            status = "suggested" if last.get("source") == "captioner" and last.get("text") == current.text else "edited"
        return CaptionInfo(clip=name, status=status, text=current.text, suggestion=suggestion)

    def overview(self) -> list[CaptionInfo]:
        records = self._suggestion_records()
        return [self.info(clip, records) for clip in self.list_clips()]

    # bulk edits
    def apply_changes(self, changes: Iterable[CaptionChange], source: str) -> list[CaptionChange]:
        applied = []
        for change in changes:
            if self.save(change.clip, change.after, source=source):
                applied.append(change)
        return applied

    def readable_captions(self, clips: Sequence[str] | None = None) -> tuple[dict[str, str], list[str]]:
        """Captions of `clips` (default all) that exist and are UTF-8, and the names of unreadable ones."""
        captions, unreadable = {}, []
        for clip in clips if clips is not None else self.list_clips():
            current = self.read(clip)
            if not current.readable:
                unreadable.append(Path(clip).name)
            elif current.exists:
                captions[Path(clip).name] = current.text
        return captions, unreadable


# ---------------------------------------------------------------------------------------------- export / import

EXPORT_FORMATS = (".jsonl", ".csv")


def apply_style_to_clips(store: CaptionStore, rules: StyleRules, clips: Sequence[str] | None = None,
                         dry_run: bool = False) -> tuple[list[CaptionChange], list[str]]:
    """Apply the rules to existing captions (all clips by default); return (changes, unreadable clips)."""
    rules.validate()
    captions, unreadable = store.readable_captions(clips)
    changes = preview_style({c: t for c, t in captions.items() if t}, rules)
    return (changes if dry_run else store.apply_changes(changes, source="style")), unreadable


def find_replace_in_clips(store: CaptionStore, find: str, replace: str, *, regex: bool = False,
                          case_sensitive: bool = False, whole_word: bool = False,
                          dry_run: bool = False) -> list[CaptionChange]:
    """Find and replace across every readable caption; each change is saved with history (unless dry_run)."""
    captions, _ = store.readable_captions()
    changes = []
    for clip, text in captions.items():
        after, count = find_replace(text, find, replace, regex=regex, case_sensitive=case_sensitive,
                                    whole_word=whole_word)
        after = after.strip()
        if count and after != text:
            changes.append(CaptionChange(clip, text, after))
    return changes if dry_run else store.apply_changes(changes, source="find-replace")


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise CaptionError(f"{path.name}: use a .jsonl or .csv file for caption export/import.")
    return suffix


def export_captions(store: CaptionStore, out_path: str | Path) -> tuple[int, list[str]]:
    """Write every readable caption (clip, caption, status) as JSON lines or CSV; return (count, unreadable clips)."""
    out_path = Path(out_path)
    fmt = _format_of(out_path)
    rows = [info for info in store.overview() if info.status != "unreadable"]
    unreadable = [info.clip for info in store.overview() if info.status == "unreadable"]
    if fmt == ".jsonl":
        text = "".join(json.dumps({"clip": r.clip, "caption": r.text, "status": r.status}, ensure_ascii=False) + "\n"
                       for r in rows)
        atomic_write_text(out_path, text)
    else:
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer)
        writer.writerow(["clip", "caption", "status"])
        writer.writerows([r.clip, r.text, r.status] for r in rows)
        # A BOM so spreadsheet programs open the file as UTF-8.
        atomic_write_bytes(out_path, buffer.getvalue().encode("utf-8-sig"))
    return len(rows), unreadable


@dataclass
class ImportReport:
    changes: list[CaptionChange] = field(default_factory=list)  # applied (or, in a dry run, proposed)
    kept_existing: list[str] = field(default_factory=list)  # differing captions left alone (keep_existing)
    unknown_clips: list[str] = field(default_factory=list)  # rows naming no clip in the folder
    unreadable: list[str] = field(default_factory=list)  # non-UTF-8 caption files left alone


def read_caption_table(path: str | Path) -> list[tuple[str, str]]:
    """(clip, caption) rows of an exported .jsonl or .csv file, with line numbers in errors."""
    path = Path(path)
    fmt = _format_of(path)
    try:
        text = read_text(path)
    except TextFileError as err:
        raise CaptionError(f"Cannot import captions: {err}") from err
    rows = []
    if fmt == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((str(record["clip"]), str(record["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CaptionError(f"{path.name} line {number}: expected {{\"clip\": ..., \"caption\": ...}} "
                                   f"({err}).") from err
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not reader.fieldnames or not {"clip", "caption"} <= set(reader.fieldnames):
            raise CaptionError(f"{path.name}: the first row must name the columns 'clip' and 'caption'.")
        rows = [(row["clip"] or "", row["caption"] or "") for row in reader]
    return rows


def import_captions(store: CaptionStore, in_path: str | Path, *, keep_existing: bool = False,
                    dry_run: bool = False) -> ImportReport:
    """Set captions from an exported file; every replaced caption stays in history (undo brings it back)."""
    report = ImportReport()
    clips = set(store.list_clips())
    for clip, caption in read_caption_table(in_path):
        name = Path(clip).name
        if name not in clips:
            report.unknown_clips.append(clip)
            continue
        current = store.read(name)
        if not current.readable:
            report.unreadable.append(name)
            continue
        caption = caption.strip()
        if current.exists and current.text == caption:
            continue
        if keep_existing and current.text:
            report.kept_existing.append(name)
            continue
        report.changes.append(CaptionChange(name, current.text, caption))
    if not dry_run:
        report.changes = store.apply_changes(report.changes, source="import")
    return report
