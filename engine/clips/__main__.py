"""`python -m engine.clips probe|cut|suggest`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from engine.clips.cut import DEFAULT_FPS, DEFAULT_FRAMES, ClipError, ExportStopped, cut_clips
from engine.clips.suggest import suggest_windows
from engine.clips.timestamps import read_timestamps
from engine.core.motion import MOTION_UNIT
from engine.core.video import VideoError, format_time, probe_video

# ---------------------------------------------------------------- command line


def _cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.clips", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("probe", help="print what the studio knows about a video, as JSON")
    probe.add_argument("video", type=Path)
    cut = commands.add_parser("cut", help="export the clips listed in a timestamps file")
    cut.add_argument("video", type=Path)
    cut.add_argument("--times", type=Path, required=True, help="timestamps file: START [END|+DURATION] [NAME]")
    cut.add_argument("--out", type=Path, required=True, help="folder for the clips and manifest.jsonl")
    cut.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per clip, 4k+1 (default 81)")
    cut.add_argument("--fit", action="store_true", help="give each cut with an end the longest 4k+1 that fits")
    cut.add_argument("--fps", type=float, default=DEFAULT_FPS, help="output frame rate (default 16)")
    cut.add_argument("--size", default="832x480", help="WxH in multiples of 16, or 'source' to keep the size")
    cut.add_argument("--no-crop", action="store_true", help="stretch to the size instead of center-cropping")
    suggest = commands.add_parser("suggest", help="print the N most dynamic windows (timestamps file format)")
    suggest.add_argument("video", type=Path)
    suggest.add_argument("--count", type=int, default=5)
    suggest.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    suggest.add_argument("--fps", type=float, default=DEFAULT_FPS)
    suggest.add_argument("--cache", type=Path, help="keep the motion analysis here (a project's cache/ folder: its "
                         "preview proxy, if the studio built one, is read instead of the source)")
    args = parser.parse_args(argv)

    def progress(fraction: float, message: str) -> None:
        print(f"[{fraction:4.0%}] {message}", file=sys.stderr)

    try:
        if args.command == "probe":
            print(json.dumps(probe_video(args.video).summary(), indent=2, ensure_ascii=False))
        elif args.command == "cut":
            cuts = read_timestamps(args.times)
            size = None if args.size.lower() == "source" else args.size
            results = cut_clips(args.video, cuts, args.out, frames=None if args.fit else args.frames,
                                fps=args.fps, size=size, crop=not args.no_crop, on_progress=progress)
            for clip in results:
                state = "kept" if clip.skipped else "wrote"
                print(f"{state} {clip.path} ({clip.frames} frames, {clip.width}x{clip.height})")
        else:
            found = suggest_windows(args.video, args.count, frames=args.frames, fps=args.fps, cache_dir=args.cache,
                                    on_progress=progress)
            print(f"# start end  # motion ({MOTION_UNIT}), scene")
            for s in found:
                print(f"{format_time(s.start)} {format_time(s.end)}  # motion {s.score:.2f}, scene {s.scene + 1}")
    except (VideoError, ClipError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ExportStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
