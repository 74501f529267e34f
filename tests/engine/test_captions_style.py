"""Pure-style rules on tricky text: overlapping names, punctuation, unicode, case, and the rules file."""

import json

import pytest

from engine.captions.captioners import merge_captions
from engine.captions.style import (
    StyleRules,
    add_trigger,
    apply_replacements,
    apply_style,
    find_banned_words,
    find_replace,
    format_replacement_lines,
    format_word_diff,
    load_style_rules,
    normalize_caption,
    parse_replacement_lines,
    preview_style,
    save_style_rules,
    split_phrases,
    word_diff,
)
from engine.captions.text import CaptionError

NAMES = {"Son Goku": "a warrior with spiky black hair", "Goku": "a warrior", "Dr. Gero": "an old scientist",
         "C-3PO": "a golden robot", "Zoë": "a woman"}


@pytest.mark.parametrize("text, expected", [
    # the longer overlapping name wins, any case, whole words only, spaces inside a name may vary
    ("Son Goku and goku fight", "a warrior with spiky black hair and a warrior fight"),
    ("son   GOKU jumps", "a warrior with spiky black hair jumps"),
    ("Gokuu runs, Goku.", "Gokuu runs, a warrior."),
    ("GOKU's kick", "a warrior's kick"),
    # names with punctuation inside or at the end
    ("dr. gero watches", "an old scientist watches"),
    ("C-3PO walks, xC-3PO", "a golden robot walks, xC-3PO"),
    # unicode letters count as word characters
    ("ZOË smiles, Zoëlla waits", "a woman smiles, Zoëlla waits"),
    ("nothing to change here", "nothing to change here"),
])
def test_replacements(text, expected):
    assert apply_replacements(text, NAMES) == expected


def test_replacement_output_is_not_replaced_again():
    assert apply_replacements("Goku, Vegeta", {"Goku": "Vegeta's rival", "Vegeta": "a prince"}) == \
        "Vegeta's rival, a prince"


def test_banned_words_whole_word_any_case_in_text_order():
    text = "Vegeta watches Goku, goku again, Gokuu, super saiyan   form"
    assert find_banned_words(text, ["goku", "Vegeta", "Frieza", "Super Saiyan", " "]) == \
        ["Vegeta", "goku", "Super Saiyan"]
    assert find_banned_words("a warrior", ["goku"]) == []


def test_split_phrases_trims_and_collapses():
    assert split_phrases("  a  man ,, running;\nfast.  , ") == ["a man", "running", "fast"]


def test_normaliser_trigger_first_dedupe_and_category_order():
    text = ("  anime style ,a warrior with golden hair,  close-up shot, jumping high, in a dark forest, "
            "A Warrior with golden hair,,sks")
    assert normalize_caption(text, trigger="sks") == \
        "sks, a warrior with golden hair, jumping high, in a dark forest, close-up shot, anime style"


def test_normaliser_keeps_order_when_nothing_is_detectable_and_is_idempotent():
    assert normalize_caption("blue glow, soft edges, rapid") == "blue glow, soft edges, rapid"
    once = normalize_caption("cinematic, a dancer spinning, camera pans left, a dancer")
    assert once == "a dancer, a dancer spinning, camera pans left, cinematic"  # subject before action
    assert normalize_caption(once) == once


def test_normaliser_without_order_only_trims_and_dedupes():
    assert normalize_caption("anime, a man, ANIME", category_order=()) == "anime, a man"


def test_add_trigger_once_and_first():
    assert add_trigger("a man, SKS, running", "sks") == "sks, a man, running"
    assert add_trigger("a man", "") == "a man"


def test_apply_style_and_preview():
    rules = StyleRules(trigger="sks style", replacements={"Goku": "a warrior"}, banned_words=["goku"])
    captions = {"a.mp4": "Goku kicks, goku kicks, anime", "b.mp4": "sks style, a warrior"}
    changes = preview_style(captions, rules)
    assert [c.clip for c in changes] == ["a.mp4"]
    assert changes[0].after == "sks style, a warrior kicks, anime"
    assert find_banned_words(changes[0].after, rules.banned_words) == []
    assert "[-Goku-]" in changes[0].diff and "{+a warrior+}" in changes[0].diff
    assert apply_style("Goku, x", StyleRules(replacements={"Goku": "a warrior"}, normalize=False)) == "a warrior, x"


def test_word_diff_round_trip():
    before, after = "Goku jumps, anime", "a warrior jumps, anime style"
    pieces = word_diff(before, after)
    assert "".join(t for op, t in pieces if op != "+") == before
    assert "".join(t for op, t in pieces if op != "-") == after
    assert format_word_diff(before, before) == before


def test_find_replace_plain_regex_and_errors():
    assert find_replace("a Cat and a cat", "cat", "dog") == ("a dog and a dog", 2)
    assert find_replace("a Cat, a cat", "cat", "dog", case_sensitive=True) == ("a Cat, a dog", 1)
    assert find_replace("cat, catalog", "cat", "dog", whole_word=True) == ("dog, catalog", 1)
    assert find_replace("a-b", "-", r"\1") == (r"a\1b", 1)  # plain replacement text is taken literally
    assert find_replace("a Cat", r"(c)at", r"\1ow", regex=True) == ("a Cow", 1)
    with pytest.raises(CaptionError, match="Invalid regular expression"):
        find_replace("x", "(", "y", regex=True)
    with pytest.raises(CaptionError, match="empty"):
        find_replace("x", "", "y")


def test_merge_captions_dedupes_phrases_across_frames():
    merged = merge_captions(["a man running", "A MAN RUNNING in a field", "a man, a dog", "a dog"])
    assert merged == "A MAN RUNNING in a field, a dog"


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_rules_file_round_trip(tmp_path, suffix):
    rules = StyleRules(trigger="sks", replacements={"Zoë": "a woman", "Dr. Gero": "an old scientist"},
                       banned_words=["goku"], token_limit=300)
    path = save_style_rules(rules, tmp_path / f"rules{suffix}")
    assert load_style_rules(path) == rules


def test_rules_file_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"trigger": "x", "replace": {}}), encoding="utf-8")
    with pytest.raises(CaptionError, match="unknown key.*replace"):
        load_style_rules(tmp_path / "bad.json")
    (tmp_path / "order.toml").write_text('category_order = ["subject", "mood"]\n', encoding="utf-8")
    with pytest.raises(CaptionError, match="mood"):
        load_style_rules(tmp_path / "order.toml")
    (tmp_path / "broken.toml").write_text("trigger = \n", encoding="utf-8")
    with pytest.raises(CaptionError, match="broken.toml"):
        load_style_rules(tmp_path / "broken.toml")
    with pytest.raises(CaptionError, match="not found"):
        load_style_rules(tmp_path / "missing.toml")


def test_replacement_lines_round_trip_and_errors():
    text = "# names from the film\nSon  Goku = a warrior with spiky black hair\n\nZoë = a woman = tall\n"
    table = parse_replacement_lines(text)
    assert table == {"Son Goku": "a warrior with spiky black hair", "Zoë": "a woman = tall"}
    assert parse_replacement_lines(format_replacement_lines(table)) == table
    with pytest.raises(CaptionError, match="line 2"):
        parse_replacement_lines("Goku = a warrior\nVegeta a prince")
