""""Pure style" rules: trigger word, replacement table, banned words, the phrase normaliser, find/replace and word
diffs."""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable, Sequence

from engine.captions.text import CaptionError
from engine.captions.tokens import WAN_TOKEN_LIMIT
from engine.core.files import TextFileError, atomic_write_text, read_text

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
        raw = read_text(path)
        data = tomllib.loads(raw) if path.suffix.lower() == ".toml" else json.loads(raw)
    except FileNotFoundError as err:
        raise CaptionError(f"Style rules file not found: {path}") from err
    except TextFileError as err:
        raise CaptionError(f"Cannot read style rules: {err}") from err
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
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


def banned_words_by_caption(captions: dict[str, str], banned_words: Iterable[str]) -> dict[str, list[str]]:
    """{clip: banned words found in its caption} for the captions holding any (clip order kept)."""
    return {clip: found for clip, text in captions.items() if (found := find_banned_words(text, banned_words))}


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


@dataclass
class CaptionChange:
    """A caption change proposed by a style rule, find-and-replace or an import (applied or previewed)."""

    clip: str
    before: str
    after: str

    @property
    def diff(self) -> str:
        return format_word_diff(self.before, self.after)


def preview_style(captions: dict[str, str], rules: StyleRules) -> list[CaptionChange]:
    """The change the rules would make to each caption (unchanged captions left out)."""
    changes = []
    for clip, text in captions.items():
        after = apply_style(text, rules)
        if after != text:
            changes.append(CaptionChange(clip, text, after))
    return changes


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
