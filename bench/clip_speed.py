"""Clips benchmark: frame-preview latency on a 1080p source (with and without the preview proxy), proxy build speed,
export speed (x real time) and suggestion speed (from the source, from the preview proxy, from the kept analysis). Prints a markdown table.

    python bench/clip_speed.py [--seconds 20] [--source FILE]

Without --source it generates a 1080p24 H.264 source with ffmpeg's default long GOP (keyframes up to 250 frames
apart), which is what makes random seeks in films slow.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.clips.cut import Cut, cut_clips
from engine.clips.suggest import suggest_windows
from engine.core.ffmpeg import ffmpeg_exe
from engine.core.video import build_preview_proxy, frame_at, probe_video


def make_source(path: Path, seconds: float) -> Path:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=1920x1080:rate=24:duration={seconds}", "-c:v", "libx264", "-preset", "veryfast",
                    "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def timings(fn, times) -> list[float]:
    out = []
    for t in times:
        start = time.perf_counter()
        fn(t)
        out.append(time.perf_counter() - start)
    return out


def row(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return f"| {name} | {statistics.median(ms):.0f} | {p95:.0f} | {ms[-1]:.0f} | {len(ms)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--source", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = args.source or make_source(tmp / "source 1080p.mp4", args.seconds)
        start = time.perf_counter()
        info = probe_video(source)
        probe_s = time.perf_counter() - start
        rng = random.Random(0)
        far = [rng.uniform(0, info.duration - 0.1) for _ in range(20)]
        steps = [5.0 + i / info.fps for i in range(48)]

        direct_random = timings(lambda t: frame_at(info, t, max_width=640), far)
        direct_steps = timings(lambda t: frame_at(info, t, max_width=640), steps)
        start = time.perf_counter()
        proxy = build_preview_proxy(info, tmp / "cache")
        proxy_s = time.perf_counter() - start
        rng = random.Random(1)  # fresh times, so the frame cache does not answer
        far = [rng.uniform(0, info.duration - 0.1) for _ in range(40)]
        proxy_random = timings(lambda t: frame_at(info, t, max_width=640, proxy=proxy), far)
        proxy_steps = timings(lambda t: frame_at(info, t, max_width=640, proxy=proxy), [s + 3 for s in steps])

        cuts = [Cut(1.0), Cut(7.0), Cut(13.0)]
        start = time.perf_counter()
        cut_clips(source, cuts, tmp / "clips", frames=81, fps=16, size="832x480")
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        from_source = suggest_windows(source, 5)
        suggest_s = time.perf_counter() - start
        start = time.perf_counter()
        from_proxy = suggest_windows(source, 5, cache_dir=tmp / "cache")  # the proxy above exists
        suggest_proxy_s = time.perf_counter() - start
        start = time.perf_counter()
        suggest_windows(source, 10, cache_dir=tmp / "cache")
        suggest_kept_s = time.perf_counter() - start
        same = len({(s.start, s.end) for s in from_source} & {(s.start, s.end) for s in from_proxy})

    print(f"source: {info.width}x{info.height} {info.codec} {info.fps:g} fps, {info.duration:.1f} s; "
          f"CPU cores: {os.cpu_count()}")
    print("\n| frame preview (640 px wide) | median ms | p95 ms | max ms | n |\n|---|---|---|---|---|")
    print(row("random seek, source", direct_random))
    print(row("+1 frame steps, source", direct_steps))
    print(row("random seek, preview proxy", proxy_random))
    print(row("+1 frame steps, preview proxy", proxy_steps))
    clip_seconds = len(cuts) * 81 / 16
    print("\n| task | seconds | x real time |\n|---|---|---|")
    print(f"| probe (header + packet scan) | {probe_s:.2f} | {info.duration / probe_s:.0f} |")
    print(f"| preview proxy build (640 px, GOP 12) | {proxy_s:.1f} | {info.duration / proxy_s:.1f} |")
    print(f"| export 3 clips x 81 frames, 832x480 | {export_s:.1f} | {clip_seconds / export_s:.2f} |")
    print(f"| suggest 5 windows (8 fps analysis of the source) | {suggest_s:.1f} | {info.duration / suggest_s:.1f} |")
    print(f"| suggest 5 windows from the preview proxy ({same} of 5 windows as from the source) | "
          f"{suggest_proxy_s:.1f} | {info.duration / suggest_proxy_s:.1f} |")
    print(f"| suggest 10 windows again (kept analysis) | {suggest_kept_s:.2f} | {info.duration / suggest_kept_s:.0f} |")


if __name__ == "__main__":
    main()
