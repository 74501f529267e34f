"""Every text input (cut lists, style rules, run and dataset TOML, caption tables, generation sidecars, project
settings) reads the same with or without a byte-order mark and with CRLF line ends, through the one reader
(engine.core.files.read_text); a file that is not UTF-8 is named with what to do."""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from engine.captions.store import read_caption_table
from engine.captions.style import load_style_rules
from engine.captions.text import CaptionError
from engine.clips.cut import ClipError, Cut
from engine.clips.timestamps import read_timestamps
from engine.core.files import TextFileError, read_text
from engine.generate.render import read_sidecar
from engine.generate.request import GenerationError
from engine.training.config import load_dataset_config, load_run_config, to_toml
from engine.training.schema import ConfigError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def windows_saved(text: str, tmp_path: Path, name: str) -> Path:
    """`text` as Notepad's "UTF-8 with BOM" writes it: a byte-order mark and CRLF line ends."""
    path = tmp_path / name
    path.write_bytes(codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode("utf-8"))
    return path


def test_read_text_drops_the_mark_and_reads_every_line_end(tmp_path):
    samples = {"bom crlf.txt": codecs.BOM_UTF8 + "é 1\r\nline 2\r\n".encode(),
               "plain.txt": "é 1\nline 2\n".encode(), "old mac.txt": "é 1\rline 2\r".encode(),
               "notepad unicode.txt": "é 1\r\nline 2\r\n".encode("utf-16")}  # UTF-16 with its mark
    for name, data in samples.items():
        (tmp_path / name).write_bytes(data)
        assert read_text(tmp_path / name) == "é 1\nline 2\n", name
    (tmp_path / "latin.txt").write_bytes("caf\xe9 ok".encode("cp1252"))
    with pytest.raises(TextFileError, match=r"latin\.txt is not UTF-8 text \(byte 3 is 0xe9.*Save it again as UTF-8"):
        read_text(tmp_path / "latin.txt")


def test_cut_list_saved_with_bom_and_crlf():
    """Field case timestamps-with-bom: line 1 used to be 'not a time'."""
    cuts = read_timestamps(FIXTURES / "cases" / "timestamps-with-bom" / "cuts_bom_crlf.txt")
    assert cuts == [Cut(1.0, 3.0, "shot_one"), Cut(4.0, 6.0, "shot_two")]


def test_style_rules_toml_and_json_with_bom_and_crlf(tmp_path):
    toml_rules = load_style_rules(windows_saved('trigger = "sks"\nbanned_words = ["blurry"]\n', tmp_path, "r.toml"))
    json_rules = load_style_rules(windows_saved('{\n"trigger": "sks",\n"banned_words": ["blurry"]\n}\n', tmp_path,
                                                "r.json"))
    assert toml_rules == json_rules and toml_rules.trigger == "sks" and toml_rules.banned_words == ["blurry"]


def test_run_and_dataset_toml_with_bom_and_crlf(tmp_path):
    for name in ("min_vram.toml", "min_vram_dataset.toml"):
        windows_saved((FIXTURES / name).read_text(encoding="utf-8"), tmp_path, name)
    for name, load in [("min_vram.toml", load_run_config), ("min_vram_dataset.toml", load_dataset_config)]:
        windows, plain = load(tmp_path / name), load(FIXTURES / name)
        assert to_toml(windows, full=True) == to_toml(plain, full=True), name


def test_caption_tables_and_sidecars_with_bom_and_crlf(tmp_path):
    rows = [("a.mp4", "sks, a turn"), ("b é.mp4", 'a "quoted" word')]
    csv_text = "clip,caption\n" + "".join(f'{c},"{t.replace(chr(34), chr(34) * 2)}"\n' for c, t in rows)
    jsonl_text = "".join(json.dumps({"clip": c, "caption": t}) + "\n" for c, t in rows)
    assert read_caption_table(windows_saved(csv_text, tmp_path, "t.csv")) == rows
    assert read_caption_table(windows_saved(jsonl_text, tmp_path, "t.jsonl")) == rows
    sidecar = windows_saved(json.dumps({"request": {"seed": 7}}, indent=2), tmp_path, "out.json")
    assert read_sidecar(sidecar)["request"] == {"seed": 7}


def test_text_inputs_that_are_not_utf8_are_named(tmp_path):
    def latin(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_bytes(text.encode("cp1252"))
        return path

    cases = [(lambda: read_timestamps(latin("cuts é.txt", "0.5 café\n")), ClipError, "cuts é.txt"),
             (lambda: load_style_rules(latin("rules.toml", 'trigger = "café"\n')), CaptionError, "rules.toml"),
             (lambda: load_run_config(latin("run.toml", '# café\noutput_dir = "x"\n')), ConfigError, "run.toml"),
             (lambda: read_caption_table(latin("t.csv", "clip,caption\na.mp4,café\n")), CaptionError, "t.csv"),
             (lambda: read_sidecar(latin("s.json", '{"request": "café"}')), GenerationError, "s.json")]
    for call, error, name in cases:
        with pytest.raises(error, match="not UTF-8") as raised:
            call()
        assert name in str(raised.value) and "UTF-8" in str(raised.value)
