"""Stage 1, clips: cut Wan-ready training clips out of a source video (the Clips tab).

- `cut`: clip settings, cut-list checks, clip names, frame-accurate export and the manifest.
- `timestamps`: timestamps files (one cut per line). `suggest`: the most dynamic windows within scenes.

Frame accuracy, precisely: output frame k (k = 0 .. frames-1) of a clip starting at `start` is the source frame on
screen at time start + k / fps, i.e. the last source frame whose timestamp is <= start + k / fps + 1 ms (see
engine/core/video.py). So the first frame of a clip cut at t is the source frame at t, at any source frame rate,
constant or variable; faster sources drop frames, slower ones repeat them.

Reads: source videos. Writes: clips/<name>.mp4, clips/manifest.jsonl, cache/analysis/ (motion analyses).

Command line:
    python -m engine.clips probe VIDEO
    python -m engine.clips cut VIDEO --times FILE --out DIR [--frames 81 --fps 16 --size 832x480 --no-crop]
    python -m engine.clips suggest VIDEO --count N [--frames 81 --fps 16] [--cache PROJECT/cache]
"""
