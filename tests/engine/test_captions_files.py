"""Caption files: UTF-8 round trips, history and undo, suggestions, non-UTF-8 files, export/import, token counts."""

import csv
import json

import numpy as np
import pytest

from engine.captions.store import (
    CaptionStore,
    apply_style_to_clips,
    export_captions,
    find_replace_in_clips,
    import_captions,
)
from engine.captions.style import StyleRules
from engine.captions.text import CaptionError
from engine.captions.tokens import TokenCounter
from engine.core.ffmpeg import write_video


def make_clip(clips_dir, name, frames=9, size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    video = [np.full((size[1], size[0], 3), rng.integers(0, 255, 3), np.uint8) for _ in range(frames)]
    return write_video(video, clips_dir / name, fps=8)


@pytest.fixture(scope="module")
def clip_bytes(tmp_path_factory):
    """One small encoded clip, reused by copying (encoding is the slow part)."""
    return make_clip(tmp_path_factory.mktemp("clip"), "c.mp4").read_bytes()


@pytest.fixture
def store(project, clip_bytes):
    for name in ("shot 1.mp4", "shot 'two' é.mp4", "shot3.mp4"):
        (project.clips_dir / name).write_bytes(clip_bytes)
    return CaptionStore(project.clips_dir)


def test_clips_being_exported_are_not_listed(store, clip_bytes):
    (store.clips_dir / ".shot4.mp4.part.mp4").write_bytes(clip_bytes)  # an atomic export still in progress
    assert store.list_clips() == ["shot 'two' é.mp4", "shot 1.mp4", "shot3.mp4"]


def test_save_read_round_trip_unicode_atomic_and_beside_clip(store):
    assert store.save("shot 'two' é.mp4", "  a warrior — golden hair, 日本語, émigré  \n")
    path = store.clips_dir / "shot 'two' é.txt"
    assert path.read_bytes().decode("utf-8") == "a warrior — golden hair, 日本語, émigré"
    assert store.read("shot 'two' é.mp4").text == "a warrior — golden hair, 日本語, émigré"
    # unchanged text: nothing written, no new history record
    assert not store.save("shot 'two' é.mp4", "a warrior — golden hair, 日本語, émigré")
    assert len(store.history("shot 'two' é.mp4")) == 1
    assert not list(store.clips_dir.glob(".*.tmp*"))
    # the studio's own files stay out of the dataset folder's top level (only clips and captions there)
    assert sorted(p.suffix for p in store.clips_dir.iterdir() if p.is_file()) == [".mp4", ".mp4", ".mp4", ".txt"]


def test_history_and_undo_walk_back_to_no_caption(store):
    clip = "shot 1.mp4"
    for text in ("first", "second", "third"):
        store.save(clip, text)
    assert [r["text"] for r in store.history(clip)] == ["first", "second", "third"]
    assert store.undo(clip) == "second"
    assert store.read(clip).text == "second"
    assert store.undo(clip) == "first"
    store.save(clip, "fourth")
    assert store.undo(clip) == "first"
    assert store.undo(clip) == ""  # back to before the first save: no caption file
    assert not store.caption_file(clip).exists()
    assert store.undo(clip) is None
    assert store.info(clip).status == "missing"


def test_caption_written_outside_the_studio_is_kept_in_history(store):
    store.caption_file("shot3.mp4").write_text("typed in an editor", encoding="utf-8")
    assert store.info("shot3.mp4").status == "edited"
    store.save("shot3.mp4", "saved in the studio")
    assert store.undo("shot3.mp4") == "typed in an editor"


def test_utf8_bom_is_read_as_text(store):
    store.caption_file("shot3.mp4").write_bytes("\ufeffa man".encode("utf-8"))
    assert store.read("shot3.mp4").text == "a man" and store.read("shot3.mp4").readable


def test_non_utf8_caption_is_never_replaced_without_consent(store):
    original = "Café crème, naïve".encode("cp1252")
    path = store.caption_file("shot 1.mp4")
    path.write_bytes(original)
    current = store.read("shot 1.mp4")
    assert not current.readable and "not UTF-8" in current.message and "shot 1.txt" in current.message
    assert "Caf\ufffd" in current.text
    assert store.info("shot 1.mp4").status == "unreadable"
    with pytest.raises(CaptionError, match="not UTF-8"):
        store.save("shot 1.mp4", "a new caption")
    assert path.read_bytes() == original
    # bulk tools leave it alone and say so
    changes, unreadable = apply_style_to_clips(store, StyleRules(trigger="sks"))
    assert unreadable == ["shot 1.mp4"] and path.read_bytes() == original
    # with consent the original bytes are kept first
    store.save("shot 1.mp4", "a new caption", replace_unreadable=True)
    backup = store.history("shot 1.mp4")[-1]["original_bytes_file"]
    assert open(backup, "rb").read() == original
    assert store.read("shot 1.mp4").text == "a new caption"
    store.undo("shot 1.mp4")  # undo puts the exact original bytes back
    assert path.read_bytes() == original


def test_suggestions_are_separate_and_resolved_explicitly(store):
    clip = "shot 1.mp4"
    store.save(clip, "a warrior, jumping")
    store.add_suggestion(clip, "a man in a field", model="tiny")
    assert store.read(clip).text == "a warrior, jumping"  # a suggestion never touches the caption
    info = store.info(clip)
    assert info.status == "edited" and info.suggestion.text == "a man in a field"
    assert store.resolve_suggestion(clip, "append") == "a warrior, jumping, a man in a field"
    assert store.suggestion(clip) is None
    with pytest.raises(CaptionError, match="No pending suggestion"):
        store.resolve_suggestion(clip, "accept")
    store.add_suggestion(clip, "a dog", model="tiny")
    assert store.resolve_suggestion(clip, "ignore") == "a warrior, jumping, a man in a field"
    store.add_suggestion("shot3.mp4", "a dog", model="tiny")
    assert store.info("shot3.mp4").status == "suggested"
    assert store.resolve_suggestion("shot3.mp4", "accept") == "a dog"
    assert store.info("shot3.mp4").status == "edited"
    assert store.undo("shot3.mp4") == ""  # accepting is undoable like any save
    store.add_suggestion("shot3.mp4", "a cat", model="tiny")
    store.add_suggestion("shot 'two' é.mp4", "a bird", model="tiny")
    store.save("shot 'two' é.mp4", "typed by hand")
    assert store.accept_suggestions_where_empty() == ["shot3.mp4"]
    assert store.read("shot3.mp4").text == "a cat" and store.read("shot 'two' é.mp4").text == "typed by hand"


def test_export_import_jsonl_and_csv_round_trip(store, tmp_path):
    store.save("shot 1.mp4", 'a man, "quoted", comma, and\nnewline')
    store.save("shot 'two' é.mp4", "ünïcode, 日本語")
    for suffix in (".jsonl", ".csv"):
        out = tmp_path / f"captions{suffix}"
        count, unreadable = export_captions(store, out)
        assert count == 3 and unreadable == []
        if suffix == ".csv":
            rows = list(csv.DictReader(out.read_text(encoding="utf-8-sig").splitlines()))
        else:
            rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert {r["clip"]: r["status"] for r in rows} == {"shot 1.mp4": "edited", "shot 'two' é.mp4": "edited",
                                                           "shot3.mp4": "missing"}
    # edit the exported file as a spreadsheet user would, import it back
    rows = [{"clip": "shot 1.mp4", "caption": "changed, in a sheet"}, {"clip": "shot3.mp4", "caption": "new one"},
            {"clip": "not there.mp4", "caption": "x"}]
    sheet = tmp_path / "edited.csv"
    with open(sheet, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["clip", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    dry = import_captions(store, sheet, dry_run=True)
    assert [c.clip for c in dry.changes] == ["shot 1.mp4", "shot3.mp4"] and store.read("shot3.mp4").text == ""
    kept = import_captions(store, sheet, keep_existing=True)
    assert kept.kept_existing == ["shot 1.mp4"] and kept.unknown_clips == ["not there.mp4"]
    assert store.read("shot3.mp4").text == "new one"
    report = import_captions(store, sheet)
    assert [c.clip for c in report.changes] == ["shot 1.mp4"]
    assert store.read("shot 1.mp4").text == "changed, in a sheet"
    assert store.undo("shot 1.mp4").startswith("a man")


def test_import_errors_name_file_and_line(store, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clip": "shot3.mp4", "caption": "ok"}\n{"clip": "x"}\n', encoding="utf-8")
    with pytest.raises(CaptionError, match="bad.jsonl line 2"):
        import_captions(store, bad)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("clip,caption\nshot3.mp4,café\n".encode("cp1252"))
    with pytest.raises(CaptionError, match="not UTF-8"):
        import_captions(store, latin)
    with pytest.raises(CaptionError, match=".jsonl or .csv"):
        export_captions(store, tmp_path / "out.txt")


def test_apply_style_and_find_replace_across_clips(store):
    store.save("shot 1.mp4", "Goku kicks, anime")
    store.save("shot3.mp4", "goku runs")
    rules = StyleRules(trigger="sks", replacements={"Goku": "a warrior"})
    preview, _ = apply_style_to_clips(store, rules, dry_run=True)
    assert len(preview) == 2 and store.read("shot3.mp4").text == "goku runs"
    applied, _ = apply_style_to_clips(store, rules)
    assert store.read("shot3.mp4").text == "sks, a warrior runs"
    assert store.history("shot3.mp4")[-1]["source"] == "style" and len(applied) == 2
    changes = find_replace_in_clips(store, r"a (\w+)or", r"one \1or", regex=True)
    assert {c.clip for c in changes} == {"shot 1.mp4", "shot3.mp4"}
    assert store.read("shot 1.mp4").text == "sks, one warrior kicks, anime"


def test_token_count_with_the_wan_tokenizer(tiny_models):
    counter = TokenCounter.for_wan_model(tiny_models.wan)
    short = counter.count("a warrior with golden hair")
    assert short.tokens == 6 and short.warning == ""  # five words and the end-of-sequence token
    long = counter.count(" ".join(["warrior"] * 600))
    assert long.tokens == 601 and "over Wan's 512-token limit" in long.warning
    assert "close to" in counter.count(" ".join(["warrior"] * 470)).warning
