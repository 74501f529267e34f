"""Frame-accurate clip export, probing, cut lists, timestamps files and the command line, on generated videos whose
frames carry their own index."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.clips.cut import (
    MANIFEST_NAME,
    ClipError,
    Cut,
    ExportStopped,
    clip_name,
    cut_clips,
    fitted_frames,
    parse_size,
    read_manifest,
    validate_cuts,
)
from engine.clips.suggest import analyze_motion, suggest_windows
from engine.clips.timestamps import format_timestamps, parse_time, parse_timestamps
from engine.core.ffmpeg import ffmpeg_exe
from engine.core.video import (
    FRAME_TIME_TOLERANCE,
    VideoError,
    build_preview_proxy,
    frame_at,
    preview_proxy_path,
    probe_video,
    read_frame,
    read_frames,
    thumbnails,
)
from tests.engine.test_clips_videos import decode_all, make_indexed_video, make_scenes_video, read_index

REPO = Path(__file__).resolve().parents[2]


def expected_index(t: Fraction, k: int, rate: Fraction) -> int:
    """The rule, in exact arithmetic: the last source frame i with i / rate <= t + k/16 + 1 ms."""
    return math.floor((t + Fraction(k, 16) + Fraction(FRAME_TIME_TOLERANCE).limit_denominator(1000)) * rate)


@pytest.fixture
def workdir(tmp_path):
    folder = tmp_path / "it's a \"dir\" é"
    folder.mkdir()
    return folder


RATES = ["16", "24", "25", "30000/1001", "30", "60"]


@pytest.mark.parametrize("rate", RATES)
def test_every_output_frame_is_the_source_frame_on_screen(workdir, rate):
    rate_q = Fraction(rate)
    source = make_indexed_video(workdir / f"src {rate.replace('/', '_')}.mp4", rate, int(4 * rate_q))
    info = probe_video(source)
    assert info.frame_count == int(4 * rate_q) and not info.variable_frame_rate
    assert info.fps == pytest.approx(float(rate_q), rel=1e-4)
    starts = ["0", "1.5", "0.733"]  # on frame boundaries for most rates, and between frames
    results = cut_clips(source, [Cut(float(s)) for s in starts], workdir / "clips", frames=33, size=None)
    for start, clip in zip(starts, results):
        frames = decode_all(clip.path)
        assert len(frames) == 33 == probe_video(clip.path).frame_count
        assert probe_video(clip.path).fps == pytest.approx(16.0)
        got = [read_index(f) for f in frames]
        assert got == [expected_index(Fraction(start), k, rate_q) for k in range(33)], (rate, start)
        assert got[0] == info.frame_index_at(float(start)) == read_index(frame_at(info, float(start)))


def test_preview_frames_match_the_decoder_forward_backward_and_far(workdir):
    source = make_indexed_video(workdir / "seek.mp4", "24", 200)
    info = probe_video(source)
    for index in [0, 1, 2, 120, 121, 125, 30, 199, 198, 5, 100]:
        assert read_index(read_frame(info, index)) == index
    assert read_index(frame_at(source, 100 / 24 + 0.02)) == 100
    assert read_index(frame_at(source, 99.9)) == 199  # past the end: the last frame
    thumbs = thumbnails(source, count=4, width=80)
    assert [round(t, 3) for t, _ in thumbs] == [round(200 / 24 * (i + 0.5) / 4, 3) for i in range(4)]
    assert all(img.shape == (48, 80, 3) for _, img in thumbs)


def test_variable_frame_rate_source(workdir):
    # 45 frames at 30 fps, then 30 frames at 10 fps: frame i at i/30 s, then 1.5 + (i - 45) / 10 s
    source = make_indexed_video(workdir / "vfr.mkv", "30", 75, setpts="if(lt(N\\,45)\\,N/30\\,1.5+(N-45)/10)/TB")
    info = probe_video(source)
    assert info.variable_frame_rate and info.frame_count == 75
    times = [i / 30 if i < 45 else 1.5 + (i - 45) / 10 for i in range(75)]
    assert np.allclose(info.frame_times[:70], times[:70], atol=0.002)  # (x264 bends the last few timestamps)
    times = info.frame_times
    assert read_index(frame_at(info, 2.05)) == 50
    clip = cut_clips(source, [Cut(1.0)], workdir / "out", frames=33, size=None)[0]
    got = [read_index(f) for f in decode_all(clip.path)]
    want = [max(i for i, ft in enumerate(times) if ft <= 1.0 + k / 16 + 0.001) for k in range(33)]
    assert got == want


def test_rotated_ten_bit_and_odd_sized_sources(workdir):
    plain = make_indexed_video(workdir / "plain.mp4", "25", 100, pix_fmt="yuv420p10le")
    rotated = workdir / "phone.mov"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-y", "-display_rotation", "90", "-i", str(plain),
                    "-c", "copy", str(rotated)], check=True)
    info = probe_video(rotated)
    assert (info.rotation, info.width, info.height, info.bit_depth) == (90, 96, 160, 10)
    clip = cut_clips(rotated, [Cut(1.0)], workdir / "out", frames=17, size=(96, 160))[0]
    out = probe_video(clip.path)
    assert (out.width, out.height, out.pix_fmt, out.frame_count, out.rotation) == (96, 160, "yuv420p", 17, 0)
    first = decode_all(clip.path)[0].astype(int)
    assert np.abs(first - frame_at(info, 1.0).astype(int)).mean() < 12  # upright like the preview, same frame

    odd = make_indexed_video(workdir / "odd.mkv", "24", 60, size=(161, 97), codec="ffv1", pix_fmt="yuv444p")
    assert (probe_video(odd).width, probe_video(odd).height) == (161, 97)
    kept, stretched, cropped = (cut_clips(odd, [Cut(0.5, name=n)], workdir / "out", frames=9, size=s, crop=c)[0]
                                for n, s, c in [("kept", None, True), ("stretched", "64x48", False),
                                                ("cropped", "64x48", True)])
    assert (kept.width, kept.height) == (160, 96)
    assert (stretched.width, stretched.height, cropped.width, cropped.height) == (64, 48, 64, 48)
    assert [read_index(f) for f in decode_all(stretched.path)][:3] == [12, 13, 15]  # 0.5 s * 24 = frame 12


def test_resize_and_center_crop_keep_the_middle(workdir):
    source = make_indexed_video(workdir / "wide.mp4", "16", 40, size=(320, 96))
    clip = cut_clips(source, [Cut(0.0)], workdir / "out", frames=5, size="96x96")[0]
    first = decode_all(clip.path)[0]
    assert first.shape == (96, 96, 3)
    # the middle third of a 320-wide frame (bars 3..6) fills the square; frame 0 is all black, frame 1 has bit 0
    assert np.allclose(first.mean(), 0, atol=8)


def test_reexport_keeps_identical_clips_and_replaces_changed_ones(workdir):
    source = make_indexed_video(workdir / "src.mp4", "24", 80)
    out = workdir / "clips"
    first = cut_clips(source, [Cut(0.25), Cut(1.5)], out, frames=9, size="64x48")
    mtimes = [c.path.stat().st_mtime_ns for c in first]
    again = cut_clips(source, [Cut(0.25), Cut(1.5)], out, frames=9, size="64x48")
    assert [c.skipped for c in again] == [True, True]
    assert [c.path.stat().st_mtime_ns for c in again] == mtimes
    assert len((out / MANIFEST_NAME).read_text().splitlines()) == 2
    changed = cut_clips(source, [Cut(0.25)], out, frames=17, size="64x48")[0]
    assert not changed.skipped and probe_video(changed.path).frame_count == 17
    records = read_manifest(out)
    assert [(r["clip"], r["frames"]) for r in records] == [(first[0].path.name, 17), (first[1].path.name, 9)]
    assert records[1] | {"exported": None} == {
        "clip": "src_000m01s500.mp4", "source": str(source.resolve()), "start": 1.5, "end": 1.5 + 9 / 16,
        "frames": 9, "fps": 16.0, "width": 64, "height": 48, "crop": True, "first_source_frame": 36,
        "source_frames": 80, "source_size": "160x96", "exported": None}
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_NAME, *(c.path.name for c in first)])


def test_stop_keeps_finished_clips_and_leaves_no_partial_file(workdir):
    source = make_indexed_video(workdir / "src.mp4", "24", 80)
    out = workdir / "clips"
    calls_after_first_clip = []

    def stop_during_second_clip() -> bool:
        if (out / "src_000m00s000.mp4").exists():
            calls_after_first_clip.append(1)
        return len(calls_after_first_clip) > 3

    progress = []
    with pytest.raises(ExportStopped):
        cut_clips(source, [Cut(0.0), Cut(1.0), Cut(2.0)], out, frames=9, size=None,
                  should_stop=stop_during_second_clip, on_progress=lambda f, m: progress.append(f))
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "src_000m00s000.mp4"]
    assert progress[:2] == [0.0, 1 / 3]


def test_bad_sources_give_clear_errors_and_write_nothing(workdir):
    out = workdir / "clips"
    text = workdir / "notes.mp4"
    text.write_text("not a video at all")
    empty = workdir / "empty.mkv"
    empty.write_bytes(b"")
    audio = workdir / "song.m4a"
    subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "sine=duration=1", str(audio)], check=True)
    good = make_indexed_video(workdir / "good.mp4", "24", 48)
    truncated = workdir / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # moov atom at the end: cut off
    for path, words in [(text, "not"), (empty, "empty"), (audio, "only audio"), (truncated, "truncated"),
                        (workdir / "missing.mp4", "not found")]:
        with pytest.raises(VideoError, match=words) as err:
            cut_clips(path, [Cut(0.0)], out, frames=9)
        assert path.name in str(err.value)
    with pytest.raises(ClipError, match="shorter than one clip"):
        cut_clips(good, [Cut(0.0)], out, frames=81)  # 2 s source, 5.06 s clip
    with pytest.raises(ClipError, match="cut 2 .*out of range"):
        cut_clips(good, [Cut(0.0), Cut(1.9)], out, frames=9)
    with pytest.raises(ClipError, match="4k\\+1"):
        cut_clips(good, [Cut(0.0)], out, frames=8)
    with pytest.raises(ClipError, match="multiples of 16"):
        cut_clips(good, [Cut(0.0)], out, frames=9, size="100x50")
    assert not out.exists() or list(out.iterdir()) == []


def test_source_with_missing_tail_fails_cleanly(workdir):
    good = make_indexed_video(workdir / "good.mp4", "24", 96, extra=["-movflags", "+faststart"])
    broken = workdir / "broken tail.mp4"
    broken.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.6)])
    info = probe_video(broken)
    assert 0 < info.frame_count < 96
    out = workdir / "clips"
    with pytest.raises(ClipError, match="out of range"):
        cut_clips(broken, [Cut(info.duration - 0.2)], out, frames=9)
    assert not out.exists() or list(out.iterdir()) == []


def test_timestamps_files_round_trip_and_name_bad_lines():
    text = """# reference workflow: start times only
    12.5
    00:01:02.250  00:01:08.000   # with an end
    1:10.5, +5.0625 jump kick
    90 - 96 landing
    """
    cuts = parse_timestamps(text)
    assert cuts == [Cut(12.5), Cut(62.25, 68.0), Cut(70.5, 70.5 + 5.0625, "jump kick"), Cut(90.0, 96.0, "landing")]
    assert parse_timestamps(format_timestamps(cuts)) == [
        Cut(c.start, None if c.end is None else round(c.end, 3), c.name) for c in cuts]
    assert parse_time("01:00:00.001") == pytest.approx(3600.001)
    with pytest.raises(ClipError, match="line 2"):
        parse_timestamps("10\nten seconds\n")
    with pytest.raises(ClipError, match="line 1.*not after"):
        parse_timestamps("10 9\n")
    with pytest.raises(ClipError, match="line 1"):
        parse_timestamps("00:75:00\n")


def test_cut_list_flags_and_names():
    cuts = [Cut(0.0), Cut(3.0), Cut(28.0), Cut(10.0, 12.0), Cut(40.0), Cut(20.0, 30.0)]
    flags = validate_cuts(cuts, duration=30.0, frames=81, fps=16)
    assert flags[0] == ["overlaps cut 2"] and flags[1] == ["overlaps cut 1"]
    assert any("out of range" in f for f in flags[2])
    assert any("too short" in f for f in flags[3])
    assert any("out of range" in f for f in flags[4])
    assert flags[5] == []
    assert validate_cuts([Cut(10.0, 12.0)], 30.0, frames=None) == [[]]  # fits 29 frames
    assert fitted_frames(2.0) == 29 and fitted_frames(5.0625) == 81 and fitted_frames(5.0) == 77
    assert clip_name("/x/my film.mkv", Cut(75.5)) == "my film_001m15s500"
    assert clip_name("/x/a.mp4", Cut(1.0, name="../etc/pass'wd")) == "_etc_pass_wd"
    assert clip_name("/x/run – fast é.mp4", Cut(1.0)) == "run – fast é_000m01s000"  # non-ASCII names stay readable
    assert clip_name("/x/a.mp4", Cut(1.0, name='a<b>:c|d?e*"f"\x07')) == "a_b__c_d_e__f__"
    assert parse_size("832x480") == (832, 480) and parse_size(None) is None


def test_command_line_cut_probe_suggest_and_errors(workdir):
    source = make_indexed_video(workdir / "film é.mp4", "24", 120)
    times = workdir / "times 'list'.txt"
    times.write_text("# two cuts\n0.5\n00:00:02.000 +1.0625 second one\n", encoding="utf-8")
    out = workdir / "out dir"

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "engine.clips", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True)

    done = cli("cut", source, "--times", times, "--out", out, "--frames", "17", "--size", "64x48")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.glob("*.mp4")) == ["film é_000m00s500.mp4", "second one.mp4"]
    assert all(probe_video(p).frame_count == 17 for p in out.glob("*.mp4"))
    probe = cli("probe", source)
    assert json.loads(probe.stdout)["frames"] == 120
    suggest = cli("suggest", source, "--count", "2", "--frames", "17")
    assert suggest.returncode == 0, suggest.stderr
    assert len(parse_timestamps(suggest.stdout)) == 2
    bad = workdir / "bad.mp4"
    bad.write_text("nope")
    for args in [("cut", bad, "--times", times, "--out", out), ("probe", workdir / "nothing.mp4"),
                 ("cut", source, "--times", workdir / "absent.txt", "--out", out)]:
        failed = cli(*args)
        assert failed.returncode == 2 and failed.stderr.startswith("error: "), failed.stderr
        assert "Traceback" not in failed.stderr


def test_suggestions_find_scene_changes_and_rank_motion(workdir):
    source = make_scenes_video(workdir / "scenes.mp4")
    times, motion, changes = analyze_motion(source)
    assert len(changes) == 2 and abs(changes[0] - 3.0) < 0.2 and abs(changes[1] - 6.0) < 0.2
    assert motion[(times > 3.2) & (times < 5.8)].mean() > 3 * motion[(times > 6.2) & (times < 8.8)].mean()
    found = suggest_windows(source, 3, frames=17, fps=16)
    assert len(found) == 3
    assert found[0].scene == 1 and 3.0 <= found[0].start and found[0].end <= 6.0 + 1e-3
    assert [s.score for s in found] == sorted((s.score for s in found), reverse=True)
    for s in found:
        assert not any(s.start < c < s.end for c in changes)  # no window crosses a scene change
        assert s.end - s.start == pytest.approx(17 / 16)
    for a, b in zip(found, found[1:]):
        assert a.end <= b.start or b.end <= a.start
    avoided = suggest_windows(source, 1, frames=17, fps=16, avoid=[Cut(found[0].start)])
    assert avoided[0].start != found[0].start
    assert found.shortfall == ""
    few = suggest_windows(source, 5, frames=33, fps=16)  # 2.06 s windows: one fits in each 3 s scene
    assert len(few) == 3 and few.shortfall.startswith("3 of the 5 windows asked for fit: a window (33 frames")
    assert "3 of the 3 scenes (2 scene changes found)" in few.shortfall


def test_suggestion_scores_are_the_motion_inside_each_window(workdir):
    """A window that starts at a scene change reads its own scene's motion, not the flow across the cut (the windows
    of the steady slow scene read alike), and a dynamic scene's windows are packed side by side."""
    found = suggest_windows(make_scenes_video(workdir / "scenes.mp4"), 20, frames=17, fps=16)
    steady = [s.score for s in found if s.scene == 2]
    assert len(steady) >= 2 and max(steady) - min(steady) < 0.1
    fast = sorted((s for s in found if s.scene == 1), key=lambda s: s.start)
    assert len(fast) == 2 and fast[0].end == fast[1].start  # two whole windows fit in the 3 s scene: both are found


def test_suggestions_read_the_preview_proxy_and_keep_their_analysis(workdir, monkeypatch):
    """With a project cache, the analysis reads the preview proxy (a film's full-size decode is most of its time),
    finds what the source gives, and is kept: asking again decodes nothing. A proxy of another video is ignored."""
    import engine.clips.suggest as clips

    source = make_scenes_video(workdir / "scenes.mp4")
    info = probe_video(source)
    times, motion, changes = analyze_motion(info)
    cache = workdir / "cache"
    proxy = build_preview_proxy(info, cache)
    p_times, p_motion, p_changes = analyze_motion(info, proxy=proxy)
    np.testing.assert_allclose(p_times, times)
    np.testing.assert_allclose(p_changes, changes, atol=0.2)
    assert np.corrcoef(p_motion, motion)[0, 1] > 0.95
    stranger = build_preview_proxy(make_indexed_video(workdir / "other.mp4", "16", 40), workdir / "other cache")
    assert analyze_motion(info, proxy=stranger)[2] == changes  # frame counts differ: the source is read instead

    def no_source_decoding(video, *args, **kwargs):
        assert video.path != info.path, "the source was decoded although its preview proxy exists"
        return read_frames(video, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(clips, "read_frames", no_source_decoding)
        found = suggest_windows(source, 3, frames=17, fps=16, cache_dir=cache)
    assert [s.scene for s in found][0] == 1 and len(found) == 3
    kept = list((cache / "analysis").glob("scenes-*.json"))
    assert len(kept) == 1

    def no_analysis(*args, **kwargs):
        raise AssertionError("analysed again although the analysis is kept")

    with monkeypatch.context() as patch:
        patch.setattr(clips, "analyze_motion", no_analysis)
        assert suggest_windows(source, 3, frames=17, fps=16, cache_dir=cache) == found
        more = suggest_windows(source, 4, frames=17, fps=16, cache_dir=cache, avoid=[Cut(found[0].start)])
    assert len(more) == 4 and found[0] not in more
    kept[0].write_text("{not json", encoding="utf-8")  # a damaged file is analysed again, not an error
    assert suggest_windows(source, 3, frames=17, fps=16, cache_dir=cache) == found


def test_preview_proxy_has_one_frame_per_source_frame(workdir):
    vfr = make_indexed_video(workdir / "vfr.mkv", "30", 75, setpts="if(lt(N\\,45)\\,N/30\\,1.5+(N-45)/10)/TB")
    info = probe_video(vfr)
    stops = []
    with pytest.raises(InterruptedError):
        build_preview_proxy(info, workdir / "cache", should_stop=lambda: stops.append(1) or True)
    assert not list((workdir / "cache").rglob("*.mp4"))
    proxy = build_preview_proxy(info, workdir / "cache")
    assert proxy == preview_proxy_path(info, workdir / "cache") and probe_video(proxy).frame_count == 75
    for t in [0.0, 0.9, 1.49, 1.5, 2.05, 3.2, 1.0]:
        assert read_index(frame_at(info, t, max_width=160, proxy=proxy)) == info.frame_index_at(t)
    assert build_preview_proxy(info, workdir / "cache") == proxy  # made once
    # a constant 16 fps MP4 (B-frames, an edit list): ffmpeg's rate conversion once repeated its first frame here
    mp4 = make_indexed_video(workdir / "cfr16.mp4", "16", 64)
    info = probe_video(mp4)
    proxy = build_preview_proxy(info, workdir / "cache")
    assert probe_video(proxy).frame_count == 64
    for t in [0.0, 0.07, 1.0, 2.5, 3.94, 1.3]:
        assert read_index(frame_at(info, t, max_width=160, proxy=proxy)) == info.frame_index_at(t)
