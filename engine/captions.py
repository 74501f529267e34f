"""Captions: caption files with history and undo, BLIP-2 suggestions, and "pure style" rules.

The caption of `clip.mp4` is `clip.txt` beside it (diffusion-pipe's convention), UTF-8, written atomically. What the
studio knows about captions lives in a hidden folder inside the clips folder, so the clips folder stays a valid
diffusion-pipe dataset:

    clips/.captions/history/<clip stem>.jsonl   every save of that caption (new text, previous text, source)
    clips/.captions/suggestions.jsonl           captioner suggestions and what became of them (accepted, ignored)
    clips/.captions/originals/                  the bytes of non-UTF-8 caption files replaced with consent

A suggestion never replaces a caption by itself: the UI offers accept / append / ignore, and the command line only
writes captions for clips that have none unless `--overwrite` is given (and even then the old text stays in history).

Command line:
    python -m engine.captions suggest CLIPS_DIR [--model PATH] [--overwrite] [--frames 3] [--prompt TEXT]
    python -m engine.captions apply-style CLIPS_DIR --rules FILE [--dry-run]
    python -m engine.captions find-replace CLIPS_DIR FIND REPLACE [--regex] [--dry-run]
    python -m engine.captions export CLIPS_DIR OUT.jsonl|OUT.csv
    python -m engine.captions import CLIPS_DIR IN.jsonl|IN.csv [--keep-existing] [--dry-run]
    python -m engine.captions undo CLIPS_DIR CLIP
    python -m engine.captions check CLIPS_DIR [--rules FILE] [--wan PATH]
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import re
import sys
import tomllib
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from engine.files import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl
from engine.models import BLIP2_HUB_ID, load_blip2, load_wan_tokenizer
from engine.project import PROJECT_FILE, list_videos

META_DIRNAME = ".captions"
WAN_TOKEN_LIMIT = 512  # the Wan pipeline pads/cuts prompts to 512 UMT5 tokens
TOKEN_WARNING_FRACTION = 0.9  # warn when a caption uses this share of the limit

ProgressFn = Callable[[float, str], None]
StopFn = Callable[[], bool]


def _no_progress(fraction: float, message: str) -> None:
    pass


def _never_stop() -> bool:
    return False


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


class CaptionError(ValueError):
    """A caption operation that cannot go ahead, with what is wrong and what to do."""


class ClipDecodeError(CaptionError):
    """A clip whose frames cannot be read."""


class CaptionerOutOfMemory(RuntimeError):
    """The captioner ran out of GPU memory; the message names the settings that reduce memory."""


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


@dataclass
class CaptionChange:
    """A caption change proposed by a style rule, find-and-replace or an import (applied or previewed)."""

    clip: str
    before: str
    after: str

    @property
    def diff(self) -> str:
        return format_word_diff(self.before, self.after)


class CaptionStore:
    """Caption files of one clips folder, with save history, undo and suggestions."""

    def __init__(self, clips_dir: str | Path):
        self.clips_dir = Path(clips_dir).expanduser()
        if not self.clips_dir.is_dir():
            raise CaptionError(f"Clips folder not found: {self.clips_dir}")

    # paths
    @property
    def meta_dir(self) -> Path:
        return self.clips_dir / META_DIRNAME

    @property
    def suggestions_file(self) -> Path:
        return self.meta_dir / "suggestions.jsonl"

    def clip_path(self, clip: str | Path) -> Path:
        """The clip file for a clip name (e.g. 'shot 1.mp4') or path; it must be in this clips folder."""
        path = self.clips_dir / Path(clip).name
        if not path.is_file():
            raise CaptionError(f"Clip not found: {path}")
        return path

    def caption_file(self, clip: str | Path) -> Path:
        return (self.clips_dir / Path(clip).name).with_suffix(".txt")

    def history_file(self, clip: str | Path) -> Path:
        return self.meta_dir / "history" / f"{Path(clip).stem}.jsonl"

    def list_clips(self) -> list[str]:
        return [p.name for p in list_videos(self.clips_dir)]

    # reading and saving
    def read(self, clip: str | Path) -> CaptionText:
        path = self.caption_file(clip)
        if not path.exists():
            return CaptionText("", exists=False)
        data = path.read_bytes()
        try:
            return CaptionText(data.decode("utf-8-sig").strip(), exists=True)
        except UnicodeDecodeError as err:
            return CaptionText(
                data.decode("utf-8", errors="replace").strip(), exists=True, readable=False,
                message=(f"{path.name} is not UTF-8 text (byte {err.start} cannot be decoded); it is shown with "
                         f"\N{REPLACEMENT CHARACTER} marks and left untouched. Saving a new caption replaces it; "
                         f"the original bytes are kept in {self.meta_dir / 'originals'}."),
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
        target = self.meta_dir / "originals" / f"{source.stem}.{datetime.now():%Y%m%d-%H%M%S-%f}.txt"
        atomic_write_bytes(target, source.read_bytes())
        return target

    def _append_history(self, clip: str | Path, record: dict) -> None:
        history = read_jsonl(self.history_file(clip))
        record["id"] = max((r.get("id", 0) for r in history), default=0) + 1
        append_jsonl(self.history_file(clip), record)

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
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise CaptionError(f"{path} is not UTF-8 (byte {err.start}); save it as UTF-8 and import again.") from err
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


# ---------------------------------------------------------------------------------------------- style rules

DEFAULT_CATEGORY_ORDER = ("subject", "action", "scene", "camera", "style")
# Words that mark a phrase's category; a phrase takes the first category (in DETECTION_ORDER) with a word in it.
DEFAULT_CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "camera": ("camera", "shot", "close-up", "closeup", "close up", "wide angle", "angle", "pan", "pans", "panning",
               "zoom", "zooms", "zooming", "tracking", "dolly", "handheld", "pov", "aerial", "overhead",
               "low angle", "high angle", "view", "framing", "static"),
    "style": ("style", "anime", "cinematic", "realistic", "photorealistic", "painted", "painting", "animation",
              "animated", "cartoon", "watercolor", "sketch", "3d", "render", "cel-shaded", "film grain", "lighting",
              "motion blur", "vintage", "monochrome", "black and white"),
    "scene": ("background", "foreground", "forest", "city", "street", "road", "room", "sky", "sea", "ocean", "beach",
              "river", "mountain", "mountains", "field", "desert", "castle", "building", "buildings", "interior",
              "exterior", "night", "day", "sunset", "sunrise", "rain", "snow", "fog", "indoors", "outdoors"),
    "action": ("jumps", "runs", "walks", "turns", "spins", "strikes", "swings", "kicks", "punches", "dodges",
               "rolls", "falls", "rises", "flies", "leaps", "dashes", "slashes", "blocks", "charges", "attacks",
               "fights", "dances", "moves", "throws", "lands", "bounces", "rotates", "orbits", "waves", "raises"),
    "subject": ("man", "woman", "boy", "girl", "child", "person", "people", "warrior", "fighter", "figure",
                "character", "creature", "dancer", "soldier", "knight", "robot", "animal", "dog", "cat", "horse",
                "ball", "square", "shape", "shapes", "object"),
}
DETECTION_ORDER = ("camera", "style", "action", "subject", "scene")
_SCENE_PREPOSITIONS = ("in", "on", "at", "inside", "outside", "under", "near", "against", "amid", "among", "by",
                       "beneath", "above")
_NOT_ACTIONS = {"lighting", "building", "clothing", "ceiling", "morning", "evening", "ring", "king", "thing",
                "something", "nothing", "everything", "painting", "string", "wing", "spring", "sling"}


@dataclass
class StyleRules:
    """Pure-style rules, stored as TOML or JSON for `python -m engine.captions apply-style --rules FILE`."""

    trigger: str = ""  # word or phrase put first in every caption (e.g. "sks motion"); empty: none
    replacements: dict[str, str] = field(default_factory=dict)  # name -> generic description, whole word, any case
    banned_words: list[str] = field(default_factory=list)  # words that must not appear (checked, not removed)
    normalize: bool = True  # comma-separated phrases: trimmed, deduplicated, ordered by category
    category_order: list[str] = field(default_factory=lambda: list(DEFAULT_CATEGORY_ORDER))
    category_words: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_CATEGORY_WORDS.items()})
    token_limit: int = WAN_TOKEN_LIMIT  # Wan's UMT5 prompt length in tokens

    def validate(self) -> None:
        unknown = [c for c in self.category_order if c not in self.category_words]
        if unknown:
            raise CaptionError(f"category_order names {unknown}, which have no entry in category_words "
                               f"(known: {sorted(self.category_words)}).")
        empty = [name for name in self.replacements if not name.strip()]
        if empty:
            raise CaptionError("replacements has an empty name; every entry needs a name to replace.")
        if self.token_limit <= 0:
            raise CaptionError(f"token_limit must be a positive number of tokens, not {self.token_limit}.")


def load_style_rules(path: str | Path) -> StyleRules:
    """Read style rules from a .toml or .json file; unknown keys are an error naming the file and allowed keys."""
    path = Path(path)
    try:
        raw = path.read_bytes().decode("utf-8")
        data = tomllib.loads(raw) if path.suffix.lower() == ".toml" else json.loads(raw)
    except FileNotFoundError as err:
        raise CaptionError(f"Style rules file not found: {path}") from err
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise CaptionError(f"Cannot read style rules {path}: {err}. Use a UTF-8 .toml or .json file.") from err
    allowed = {f.name for f in fields(StyleRules)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise CaptionError(f"{path.name}: unknown key(s) {unknown}; allowed: {sorted(allowed)}.")
    rules = StyleRules(**data)
    if "category_words" in data:  # categories not named in the file keep their defaults
        rules.category_words = {**{k: list(v) for k, v in DEFAULT_CATEGORY_WORDS.items()}, **data["category_words"]}
    rules.validate()
    return rules


def save_style_rules(rules: StyleRules, path: str | Path) -> Path:
    path = Path(path)
    data = asdict(rules)
    if path.suffix.lower() == ".toml":
        import tomli_w

        return atomic_write_text(path, tomli_w.dumps(data))
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def parse_replacement_lines(text: str) -> dict[str, str]:
    """A replacement table typed one entry per line, `Name = generic description` (blank and # lines skipped)."""
    table: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, description = line.partition("=")
        if not sep or not name.strip():
            raise CaptionError(f"Replacement line {number} ({line!r}): write it as 'Name = generic description'.")
        table[" ".join(name.split())] = description.strip()
    return table


def format_replacement_lines(table: dict[str, str]) -> str:
    return "\n".join(f"{name} = {description}" for name, description in table.items())


def _word_pattern(words: Iterable[str]) -> re.Pattern | None:
    """One case-insensitive alternation of whole words/phrases, longest first so overlapping names match fully."""
    parts = []
    for word in sorted({w.strip() for w in words if w.strip()}, key=lambda w: (-len(w), w.lower())):
        body = r"\s+".join(re.escape(piece) for piece in word.split())
        # Word boundaries only where the name itself starts/ends with a word character ("C-3PO", "Dr." work too).
        head = r"(?<!\w)" if re.match(r"\w", word) else ""
        tail = r"(?!\w)" if re.search(r"\w$", word) else ""
        parts.append(f"{head}{body}{tail}")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def apply_replacements(text: str, replacements: dict[str, str]) -> str:
    """Replace each name by its description: whole words, any case, the longest name first, in one pass."""
    pattern = _word_pattern(replacements)
    if pattern is None:
        return text
    lookup = {" ".join(name.split()).casefold(): value for name, value in replacements.items()}
    return pattern.sub(lambda m: lookup[" ".join(m.group(0).split()).casefold()], text)


def find_banned_words(text: str, banned_words: Iterable[str]) -> list[str]:
    """The banned words/phrases found in the text (whole words, any case), as written in the rules, in text order."""
    banned = [w for w in banned_words if w.strip()]
    pattern = _word_pattern(banned)
    if pattern is None:
        return []
    by_key = {" ".join(w.split()).casefold(): w.strip() for w in banned}
    found: list[str] = []
    for match in pattern.finditer(text):
        word = by_key[" ".join(match.group(0).split()).casefold()]
        if word not in found:
            found.append(word)
    return found


def split_phrases(text: str) -> list[str]:
    """Comma-separated phrases (commas, semicolons and line breaks all separate), trimmed, spaces collapsed."""
    phrases = (" ".join(p.split()).strip(" .") for p in re.split(r"[,;\n]", text))
    return [p for p in phrases if p]


def detect_category(phrase: str, category_words: dict[str, Sequence[str]]) -> str | None:
    """The phrase's category (subject, action, scene, camera, style) from its words, or None when unclear."""
    lowered = phrase.casefold()
    for category in DETECTION_ORDER:
        pattern = _word_pattern(category_words.get(category, ()))
        if pattern is not None and pattern.search(lowered):
            return category
        if category == "action" and any(w.endswith("ing") and len(w) > 4 and w not in _NOT_ACTIONS
                                        for w in re.findall(r"\w+", lowered)):
            return "action"
    if lowered.split()[0] in _SCENE_PREPOSITIONS:
        return "scene"
    return None


def normalize_caption(text: str, trigger: str = "", category_order: Sequence[str] | None = None,
                      category_words: dict[str, Sequence[str]] | None = None) -> str:
    """Trim and deduplicate comma-separated phrases, put the trigger first, order the rest by category.

    Phrases whose category cannot be detected stay right after the phrase they followed, so a caption with no
    detectable categories keeps its order. `category_order=()` keeps the order of every phrase.
    """
    order = list(DEFAULT_CATEGORY_ORDER if category_order is None else category_order)
    words = category_words if category_words is not None else DEFAULT_CATEGORY_WORDS
    phrases, seen = [], set()
    trigger = " ".join(trigger.split())
    for phrase in split_phrases(text):
        key = phrase.casefold()
        if key not in seen and key != trigger.casefold():
            seen.add(key)
            phrases.append(phrase)
    ranks, previous = [], None
    for phrase in phrases:
        category = detect_category(phrase, words) if order else None
        rank = order.index(category) if category in order else previous
        ranks.append(rank)
        previous = rank
    first_known = next((r for r in ranks if r is not None), 0)
    ranks = [first_known if r is None else r for r in ranks]
    ordered = [p for _, p in sorted(zip(ranks, phrases), key=lambda item: item[0])]  # stable
    return ", ".join(([trigger] if trigger else []) + ordered)


def add_trigger(text: str, trigger: str) -> str:
    """Put the trigger phrase first (once), leaving the rest of the caption as written."""
    trigger = " ".join(trigger.split())
    if not trigger:
        return text.strip()
    rest = [p for p in split_phrases(text) if p.casefold() != trigger.casefold()]
    return ", ".join([trigger] + rest)


def apply_style(text: str, rules: StyleRules) -> str:
    """Replacements, then the trigger, then (if on) the normaliser: the caption as the rules want it."""
    styled = apply_replacements(text, rules.replacements)
    if rules.normalize:
        return normalize_caption(styled, rules.trigger, rules.category_order, rules.category_words)
    return add_trigger(styled, rules.trigger) if rules.trigger else styled.strip()


def preview_style(captions: dict[str, str], rules: StyleRules) -> list[CaptionChange]:
    """The change the rules would make to each caption (unchanged captions left out)."""
    changes = []
    for clip, text in captions.items():
        after = apply_style(text, rules)
        if after != text:
            changes.append(CaptionChange(clip, text, after))
    return changes


def apply_style_to_clips(store: CaptionStore, rules: StyleRules, clips: Sequence[str] | None = None,
                         dry_run: bool = False) -> tuple[list[CaptionChange], list[str]]:
    """Apply the rules to existing captions (all clips by default); return (changes, unreadable clips)."""
    rules.validate()
    captions, unreadable = store.readable_captions(clips)
    changes = preview_style({c: t for c, t in captions.items() if t}, rules)
    return (changes if dry_run else store.apply_changes(changes, source="style")), unreadable


def find_replace(text: str, find: str, replace: str, *, regex: bool = False, case_sensitive: bool = False,
                 whole_word: bool = False) -> tuple[str, int]:
    """Replace every match in one caption; return (new text, number of matches)."""
    if not find:
        raise CaptionError("Find what? The search text is empty.")
    try:
        pattern = re.compile(find if regex else re.escape(find), 0 if case_sensitive else re.IGNORECASE)
    except re.error as err:
        raise CaptionError(f"Invalid regular expression {find!r}: {err}.") from err
    if whole_word:
        pattern = re.compile(rf"(?<!\w)(?:{pattern.pattern})(?!\w)", pattern.flags)
    try:
        return pattern.subn(replace if regex else (lambda _: replace), text)
    except (re.error, IndexError) as err:
        raise CaptionError(f"Invalid replacement {replace!r}: {err} (use \\1 for a group).") from err


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


def word_diff(before: str, after: str) -> list[tuple[str, str]]:
    """(op, text) pieces turning `before` into `after`: op is '=' kept, '-' removed, '+' added."""
    a, b = re.findall(r"\S+|\s+", before), re.findall(r"\S+|\s+", after)
    pieces: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            pieces.append(("=", "".join(a[i1:i2])))
            continue
        if i2 > i1:
            pieces.append(("-", "".join(a[i1:i2])))
        if j2 > j1:
            pieces.append(("+", "".join(b[j1:j2])))
    return pieces


def format_word_diff(before: str, after: str) -> str:
    """A one-line diff: [-removed-]{+added+}."""
    marks = {"=": "{}", "-": "[-{}-]", "+": "{{+{}+}}"}
    return "".join(marks[op].format(text) for op, text in word_diff(before, after))


# ---------------------------------------------------------------------------------------------- token counts

@dataclass(frozen=True)
class TokenCount:
    tokens: int
    limit: int

    @property
    def warning(self) -> str:
        if self.tokens > self.limit:
            return (f"{self.tokens} tokens: over Wan's {self.limit}-token limit, the text encoder cuts everything "
                    f"after token {self.limit}. Shorten the caption.")
        if self.tokens >= TOKEN_WARNING_FRACTION * self.limit:
            return f"{self.tokens} tokens: close to Wan's {self.limit}-token limit."
        return ""


class TokenCounter:
    """Counts tokens as the Wan pipeline's UMT5 tokenizer sees a prompt (special tokens included, no truncation)."""

    def __init__(self, tokenizer, limit: int = WAN_TOKEN_LIMIT):
        self.tokenizer = tokenizer
        self.limit = limit

    @classmethod
    def for_wan_model(cls, wan_source: str | Path, limit: int = WAN_TOKEN_LIMIT) -> "TokenCounter":
        return cls(load_wan_tokenizer(wan_source), limit)

    def count(self, text: str) -> TokenCount:
        ids = self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return TokenCount(len(ids), self.limit)


# ---------------------------------------------------------------------------------------------- captioners

class Captioner(Protocol):
    """What the studio needs from a captioner; BLIP-2 is one, another image captioner can be plugged in."""

    name: str

    def caption_images(self, images: Sequence[np.ndarray], prompt: str = "") -> list[str]:
        """One caption per RGB uint8 image (H, W, 3)."""

    def unload(self) -> None:
        """Free the model's memory; the next caption_images call loads it again."""


@dataclass
class CaptionerSettings:
    frames_per_clip: int = 3  # frames captioned per clip (first, middle, last for 3), merged into one suggestion
    prompt: str = ""  # optional text the captioner continues, e.g. "a video of"; empty: plain captioning
    batch_size: int = 8  # frames per forward pass; lower it when the GPU runs out of memory

    def validate(self) -> None:
        if not 1 <= self.frames_per_clip <= 32:
            raise CaptionError(f"frames per clip must be 1..32, not {self.frames_per_clip}.")
        if self.batch_size < 1:
            raise CaptionError(f"batch size must be at least 1, not {self.batch_size}.")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Blip2Captioner:
    """BLIP-2 (a local folder or hub id) loaded on first use and kept until `unload()`; fp16 on GPU, float32 on CPU."""

    def __init__(self, source: str | Path, device: str | None = None, max_new_tokens: int = 30,
                 min_new_tokens: int = 3, batch_size: int = 8):
        if not 0 <= min_new_tokens <= max_new_tokens:
            raise CaptionError(f"caption length: need 0 <= min new tokens ({min_new_tokens}) <= max new tokens "
                               f"({max_new_tokens}).")
        self.source = str(source)
        self.name = Path(self.source).name or self.source
        self.device = device or default_device()
        self.max_new_tokens = max_new_tokens  # caption length limit per frame, in captioner tokens
        self.min_new_tokens = min_new_tokens  # a caption of at least a few tokens: never an empty suggestion
        self.batch_size = batch_size
        self._processor = None
        self._model = None

    @classmethod
    def from_loaded(cls, processor, model, name: str, **kwargs) -> "Blip2Captioner":
        """Wrap a processor and model built in memory (benchmarks with random weights); `name` is what reloads."""
        captioner = cls(name, device=str(model.device), **kwargs)
        captioner._processor, captioner._model = processor, model
        return captioner

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        if self._model is None:
            self._processor, self._model = load_blip2(self.source, device=self.device)

    def unload(self) -> None:
        import gc

        import torch

        self._processor = self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def caption_images(self, images: Sequence[np.ndarray], prompt: str = "") -> list[str]:
        import torch
        from PIL import Image

        self.load()
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            batch = [Image.fromarray(np.asarray(image, dtype=np.uint8)) for image in chunk]
            inputs = self._processor(images=batch, text=[prompt] * len(batch) if prompt else None, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
            try:
                with torch.inference_mode():
                    output = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                                  min_new_tokens=self.min_new_tokens, do_sample=False)
            except torch.cuda.OutOfMemoryError as err:
                torch.cuda.empty_cache()
                raise CaptionerOutOfMemory(
                    f"The GPU ran out of memory captioning {len(batch)} frames with {self.name}. Lower 'batch size' "
                    f"(now {self.batch_size}) or 'frames per clip', stop other GPU jobs, or caption on the CPU."
                ) from err
            # generate() returns the input tokens (image tokens, prompt) followed by the new ones.
            new_tokens = output[:, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else output
            captions.extend(t.strip() for t in self._processor.batch_decode(new_tokens, skip_special_tokens=True))
        return captions


def read_clip_frames(clip: str | Path, count: int = 3) -> list[np.ndarray]:
    """`count` RGB frames spread evenly over the clip (first, middle, last for 3), read with OpenCV."""
    import cv2

    clip = Path(clip)
    capture = cv2.VideoCapture(str(clip))
    try:
        if not capture.isOpened():
            raise ClipDecodeError(f"Cannot open {clip.name} as a video (unsupported or damaged file).")
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        # The reported count can be off by a few frames: read sequentially and keep the wanted indices.
        wanted = sorted({int(round(i)) for i in np.linspace(0, max(total - 1, 0), count)}) if total > 0 else [0]
        frames, last, index = [], None, 0
        while wanted and index <= wanted[-1]:
            if not capture.grab():
                break
            if index in wanted:
                ok, frame = capture.retrieve()
                if ok:
                    last = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    frames.append(last)
            index += 1
        if not frames:
            raise ClipDecodeError(f"No frame of {clip.name} could be decoded; re-cut or re-encode the clip.")
        while len(frames) < len(wanted):  # the file ended early: reuse its last decoded frame
            frames.append(last)
        return frames
    finally:
        capture.release()


def merge_captions(captions: Iterable[str]) -> str:
    """One caption from several frames' captions: their phrases, with repeats and phrases inside others dropped."""
    kept: list[str] = []
    for caption in captions:
        for phrase in split_phrases(caption):
            key = f" {phrase.casefold()} "
            if any(key in f" {k.casefold()} " for k in kept):
                continue
            kept = [k for k in kept if f" {k.casefold()} " not in key]  # a longer phrase replaces a shorter one
            kept.append(phrase)
    return ", ".join(kept)


def caption_clip(captioner: Captioner, clip: str | Path, settings: CaptionerSettings | None = None) -> str:
    settings = settings or CaptionerSettings()
    frames = read_clip_frames(clip, settings.frames_per_clip)
    return merge_captions(captioner.caption_images(frames, settings.prompt))


@dataclass
class SuggestReport:
    suggested: dict[str, str] = field(default_factory=dict)  # clip -> suggestion
    written: list[str] = field(default_factory=list)  # clips whose caption file was written (write_captions)
    skipped: list[str] = field(default_factory=list)  # clips left out because they have a caption
    failed: dict[str, str] = field(default_factory=dict)  # clip -> why (e.g. cannot be decoded)
    stopped: bool = False


def suggest_captions(store: CaptionStore, captioner: Captioner, *, clips: Sequence[str] | None = None,
                     overwrite: bool = False, write_captions: bool = False,
                     settings: CaptionerSettings | None = None, on_progress: ProgressFn = _no_progress,
                     should_stop: StopFn = _never_stop) -> SuggestReport:
    """Caption clips and store each result as a pending suggestion.

    Only clips without a caption are done unless `overwrite` is set. With `write_captions` (the command line) the
    suggestion is also written as the caption, the previous text (if any) kept in history. Clips that cannot be
    decoded are reported in `failed` and skipped. Frames of several clips share one forward pass.
    """
    settings = settings or CaptionerSettings()
    settings.validate()
    report = SuggestReport()
    todo = []
    for clip in clips if clips is not None else store.list_clips():
        current = store.read(clip)
        if not current.readable:
            report.failed[Path(clip).name] = current.message
        elif current.text and not overwrite:
            report.skipped.append(Path(clip).name)
        else:
            todo.append(Path(clip).name)
    clips_per_batch = max(1, getattr(captioner, "batch_size", settings.batch_size) // settings.frames_per_clip)
    done = 0
    on_progress(0.0, f"captioning {len(todo)} clips")
    for start in range(0, len(todo), clips_per_batch):
        if should_stop():
            report.stopped = True
            break
        batch, frames = [], []
        for clip in todo[start:start + clips_per_batch]:
            try:
                clip_frames = read_clip_frames(store.clip_path(clip), settings.frames_per_clip)
            except CaptionError as err:
                report.failed[clip] = str(err)
                continue
            batch.append((clip, len(clip_frames)))
            frames.extend(clip_frames)
        captions = captioner.caption_images(frames, settings.prompt) if frames else []
        offset = 0
        for clip, count in batch:
            text = merge_captions(captions[offset:offset + count])
            offset += count
            if not text:
                report.failed[clip] = "the captioner returned an empty caption"
                continue
            store.add_suggestion(clip, text, model=captioner.name)
            report.suggested[clip] = text
            if write_captions:
                store.save(clip, text, source="captioner")
                report.written.append(clip)
        done = min(start + clips_per_batch, len(todo))
        on_progress(done / max(len(todo), 1), f"{done}/{len(todo)} clips captioned")
    return report


# ---------------------------------------------------------------------------------------------- command line

def _project_setting(clips_dir: Path, key: str) -> str:
    """A model the project chose (when CLIPS_DIR is a project's clips/ folder), else ''."""
    settings = clips_dir.parent / PROJECT_FILE
    if not settings.exists():
        return ""
    return str(json.loads(settings.read_text(encoding="utf-8")).get(key) or "")


def _print_changes(changes: Sequence[CaptionChange], verb: str) -> None:
    for change in changes:
        print(f"{change.clip}: {change.diff}")
    print(f"{len(changes)} caption(s) {verb}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.captions", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("suggest", help="caption clips with BLIP-2 (only clips without a caption unless --overwrite)")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("--model", help=f"BLIP-2 folder or hub id (default: the project's captioner, else {BLIP2_HUB_ID})")
    p.add_argument("--overwrite", action="store_true", help="also replace existing captions (old text kept in history)")
    p.add_argument("--frames", type=int, default=3, help="frames captioned per clip and merged (default 3)")
    p.add_argument("--prompt", default="", help="text the captioner continues, e.g. 'a video of'")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="frames per forward pass (lower it on out-of-memory)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p = sub.add_parser("apply-style", help="apply pure-style rules (TOML/JSON) to every caption")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("--rules", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the changes without saving them")
    p = sub.add_parser("find-replace", help="find and replace across all captions")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("find")
    p.add_argument("replace")
    p.add_argument("--regex", action="store_true")
    p.add_argument("--case-sensitive", action="store_true")
    p.add_argument("--whole-word", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("export", help="write all captions to a .jsonl or .csv file")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("import", help="set captions from a .jsonl or .csv file (columns clip, caption)")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("source", type=Path)
    p.add_argument("--keep-existing", action="store_true", help="only fill clips that have no caption")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("undo", help="revert the latest change to one clip's caption")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("clip")
    p = sub.add_parser("check", help="list caption status, banned words and token counts")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("--rules", type=Path, help="style rules whose banned words to check")
    p.add_argument("--wan", help="Wan I2V folder whose tokenizer counts tokens (default: the project's model)")
    args = parser.parse_args(argv)

    try:
        store = CaptionStore(args.clips_dir)
        if args.command == "suggest":
            settings = CaptionerSettings(frames_per_clip=args.frames, prompt=args.prompt, batch_size=args.batch_size)
            settings.validate()
            model = args.model or _project_setting(store.clips_dir, "captioner_model") or BLIP2_HUB_ID
            captioner = Blip2Captioner(model, device=args.device,
                                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)

            def progress(fraction: float, message: str) -> None:
                print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

            report = suggest_captions(store, captioner, overwrite=args.overwrite, write_captions=True,
                                      settings=settings, on_progress=progress)
            for clip, text in report.suggested.items():
                print(f"{clip}: {text}")
            for clip, why in report.failed.items():
                print(f"skipped {clip}: {why}", file=sys.stderr)
            print(f"{len(report.written)} caption(s) written, {len(report.skipped)} clip(s) already captioned "
                  f"(use --overwrite to replace), {len(report.failed)} failed")
            return 1 if report.failed else 0
        if args.command == "apply-style":
            changes, unreadable = apply_style_to_clips(store, load_style_rules(args.rules), dry_run=args.dry_run)
            _print_changes(changes, "would change" if args.dry_run else "changed")
            for clip in unreadable:
                print(f"skipped {clip}: caption file is not UTF-8", file=sys.stderr)
            return 0
        if args.command == "find-replace":
            changes = find_replace_in_clips(store, args.find, args.replace, regex=args.regex,
                                            case_sensitive=args.case_sensitive, whole_word=args.whole_word,
                                            dry_run=args.dry_run)
            _print_changes(changes, "would change" if args.dry_run else "changed")
            return 0
        if args.command == "export":
            count, unreadable = export_captions(store, args.out)
            print(f"{count} caption(s) written to {args.out}")
            for clip in unreadable:
                print(f"left out {clip}: caption file is not UTF-8", file=sys.stderr)
            return 0
        if args.command == "import":
            report = import_captions(store, args.source, keep_existing=args.keep_existing, dry_run=args.dry_run)
            _print_changes(report.changes, "would change" if args.dry_run else "changed")
            for clip in report.kept_existing:
                print(f"kept existing caption of {clip}", file=sys.stderr)
            for clip in report.unknown_clips:
                print(f"no clip named {clip} in {store.clips_dir}", file=sys.stderr)
            for clip in report.unreadable:
                print(f"skipped {clip}: caption file is not UTF-8", file=sys.stderr)
            return 0
        if args.command == "undo":
            restored = store.undo(args.clip)
            print("nothing to undo" if restored is None else f"{Path(args.clip).name}: {restored or '(no caption)'}")
            return 0
        # check
        rules = load_style_rules(args.rules) if args.rules else StyleRules()
        wan = args.wan or _project_setting(store.clips_dir, "wan_model")
        counter = TokenCounter.for_wan_model(wan, rules.token_limit) if wan else None
        for info in store.overview():
            notes = []
            if counter and info.text:
                count = counter.count(info.text)
                notes.append(count.warning or f"{count.tokens} tokens")
            banned = find_banned_words(info.text, rules.banned_words)
            if banned:
                notes.append("banned: " + ", ".join(banned))
            print(f"{info.clip}\t{info.status}\t{'; '.join(notes)}")
        return 0
    except (CaptionError, CaptionerOutOfMemory, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
