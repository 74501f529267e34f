"""Reading source videos through PyAV (FFmpeg's own libraries; the ffmpeg binary of imageio-ffmpeg only encodes):
probing, the presentation time of every frame, the frames at given indices for previews, cuts, training and
captions, thumbnails and preview proxies.

The frames of a video are what a player shows, in display order, at their display size:
- Frames that an MP4/MOV edit list hides (stream-copy trims, a phone's "trim", the encoder delay of B-frames) are not
  frames of the video: FFmpeg's mov demuxer marks their packets "discard" and its decoders drop them, as players do.
- t = 0 is the first shown frame, whatever the container's start time (negative, or seconds into a stream).
- Non-square pixels (a sample aspect ratio other than 1, as DVD and anamorphic sources have) are stretched to the
  display width (width x SAR, the height kept, as ffmpeg's `scale=iw*sar:ih` and players do), then the rotation of
  the display matrix is applied.

Time convention used everywhere in the studio: "the frame at time t" is the last frame whose timestamp is
<= t + FRAME_TIME_TOLERANCE (the frame on screen at t). The tolerance absorbs times typed with millisecond precision
(frame 40 of a 30 fps video starts at 1.3333 s; "1.333" still means frame 40).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import subprocess
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator, Sequence

import av
import numpy as np

from engine.core.ffmpeg import ffmpeg_exe
from engine.core.files import atomic_path
from engine.core.layout import CacheLayout

FRAME_TIME_TOLERANCE = 0.001  # seconds; far below one frame (16.7 ms at 60 fps)


class VideoError(ValueError):
    """A source video cannot be used; the message says which file, what is wrong and what to do."""


@dataclass(frozen=True)
class VideoInfo:
    """What the studio needs to know about a video. `width` x `height` is the display size (pixel aspect and
    rotation applied): every frame the studio reads from the video has that size."""

    path: Path
    duration: float  # seconds, first displayed frame to the end of the last one
    fps: float  # average frame rate (frames / duration); the nominal rate for constant-rate sources
    width: int
    height: int
    codec: str
    pix_fmt: str
    bit_depth: int
    rotation: int  # degrees counter-clockwise of the display matrix (0, 90, 180, 270), applied to every frame
    frame_count: int  # frames shown (frames hidden by an edit list are not counted)
    variable_frame_rate: bool
    has_audio: bool
    stored_width: int  # the coded picture, before pixel aspect and rotation
    stored_height: int
    sample_aspect_ratio: Fraction  # width of a stored pixel over its height; 1 for square pixels
    time_base: Fraction  # seconds per tick of frame_pts
    frame_pts: tuple[int, ...] = field(repr=False)  # presentation timestamp of every shown frame, ascending
    frame_times: tuple[float, ...] = field(repr=False)  # presentation time of every frame, ascending, from 0

    def frame_index_at(self, t: float) -> int:
        """Index of the frame on screen at time t (clamped to the first and last frame)."""
        index = bisect.bisect_right(self.frame_times, t + FRAME_TIME_TOLERANCE) - 1
        return min(max(index, 0), self.frame_count - 1)

    def indices_at(self, start: float, count: int, fps: float) -> list[int]:
        """Frame numbers of `count` frames resampled to `fps` from `start` s: the frame on screen at start + k / fps
        (how clips are cut and how training reads clips that are not at 16 fps)."""
        return [self.frame_index_at(start + k / fps) for k in range(count)]

    def index_of_pts(self, pts: int) -> int:
        """Index of the frame with this presentation timestamp (the nearest one for a timestamp not in the list)."""
        index = bisect.bisect_left(self.frame_pts, pts)
        if index == self.frame_count or (index > 0 and pts - self.frame_pts[index - 1] < self.frame_pts[index] - pts):
            index -= 1
        return index

    def summary(self) -> dict[str, object]:
        """The probe facts a person wants to see, as plain values."""
        facts = {
            "file": self.path.name, "duration_s": round(self.duration, 3), "fps": round(self.fps, 3),
            "frame_rate": "variable" if self.variable_frame_rate else "constant",
            "resolution": f"{self.width}x{self.height}", "codec": self.codec, "pixel_format": self.pix_fmt,
            "bit_depth": self.bit_depth, "rotation": self.rotation, "frames": self.frame_count,
            "audio": self.has_audio,
        }
        if self.sample_aspect_ratio != 1:
            sar = self.sample_aspect_ratio
            facts["stored_as"] = (f"{self.stored_width}x{self.stored_height} with non-square pixels "
                                  f"(sample aspect ratio {sar.numerator}:{sar.denominator})")
        return facts


def _unreadable(path: Path, err: Exception) -> VideoError:
    reason = getattr(err, "strerror", None) or str(err)
    return VideoError(f"{path.name} is not a readable video ({reason}). It may be truncated or not a video at all; "
                      "use an mp4, mkv, mov, webm or avi file.")


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as err:
        raise _unreadable(path, err) from None


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    """The first video stream that is not a cover picture."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        if container.streams.audio:
            raise VideoError(f"{path.name} holds only audio, no video stream. Pick a video file.")
        raise VideoError(f"{path.name} is not a video: it has no video stream. Use an mp4, mkv, mov, webm or avi "
                         "file.")
    return streams[0]


_PROBE_CACHE: OrderedDict[tuple, VideoInfo] = OrderedDict()
_PROBE_LOCK = threading.Lock()


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Probe a video file: container facts, the display size, and the presentation time of every shown frame (a
    packet scan, no decoding, plus one decoded frame for the rotation and to prove the file decodes).

    Raises VideoError for a missing or empty file, a file that is not a video, audio only, a video without frames,
    or one whose first frame cannot be decoded. Results are cached per (path, size, mtime), so calling it again is
    free.
    """
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"Video file not found: {path}. Check the path (or upload the file again).")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _PROBE_LOCK:
        if key in _PROBE_CACHE:
            _PROBE_CACHE.move_to_end(key)
            return _PROBE_CACHE[key]
    if stat.st_size == 0:
        raise VideoError(f"{path.name} is empty (0 bytes). Copy or download the video again.")
    info = _probe_uncached(path)
    with _PROBE_LOCK:
        _PROBE_CACHE[key] = info
        while len(_PROBE_CACHE) > 32:
            _PROBE_CACHE.popitem(last=False)
    return info


def _packet_stamps(path: Path) -> tuple[list[int], int, Fraction]:
    """Presentation timestamps of the shown frames' packets (sorted), the last one's duration, and the time base.

    Packets an edit list hides carry FFmpeg's discard flag and are left out; a damaged tail ends the scan. A packet
    without timestamps (Matroska drops a trim's negative one) is shown before the first timestamped packet when it
    comes before it, as players show it, else after the last."""
    stamps: list[tuple[int, int]] = []
    leading: list[int] = []  # durations of timestampless packets before any timestamped one
    trailing: list[int] = []
    with _open(path) as container:
        stream = _video_stream(container, path)
        try:
            for packet in container.demux(stream):
                if not packet.size or packet.is_discard:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None:
                    (trailing if stamps else leading).append(packet.duration or 0)
                else:
                    stamps.append((stamp, packet.duration or 0))
        except av.FFmpegError:
            pass  # a truncated or damaged file: the frames before the damage are the video
        time_base = stream.time_base or Fraction(1, 1)
    if not stamps:
        return [], 0, time_base
    stamps.sort()
    for duration in leading:
        stamps.insert(0, (stamps[0][0] - (duration or stamps[0][1] or 1), duration))
    for duration in trailing:
        stamps.append((stamps[-1][0] + (stamps[-1][1] or 1), duration))
    return [pts for pts, _ in stamps], stamps[-1][1], time_base


def _stream_facts(path: Path) -> dict:
    """Facts of the video stream that need its first decoded frame (rotation, pixel format); decoding it also proves
    that the file decodes."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        codec = stream.codec_context.name
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as err:
            raise VideoError(f"{path.name}: its video ({codec}) cannot be decoded ({err}). Re-encode it as H.264 "
                             "mp4.") from None
        if first is None:
            raise VideoError(f"{path.name} has a video stream but no frames (zero length or truncated). "
                             "Copy or download the video again.")
        rotation = int(round(first.rotation)) % 360
        return dict(codec=codec, stored_width=first.width, stored_height=first.height,
                    sample_aspect_ratio=Fraction(stream.sample_aspect_ratio or 1), average_rate=stream.average_rate,
                    pix_fmt=first.format.name, bit_depth=first.format.components[0].bits,
                    rotation=rotation if rotation % 90 == 0 else 0,  # a skewed display matrix: shown as stored
                    has_audio=bool(container.streams.audio))


def _probe_uncached(path: Path) -> VideoInfo:
    facts = _stream_facts(path)
    average_rate, sar, rotation = facts.pop("average_rate"), facts["sample_aspect_ratio"], facts["rotation"]
    pts, last_duration, time_base = _packet_stamps(path)
    if not pts:
        raise VideoError(f"{path.name} has a video stream but no frames (zero length or truncated). "
                         "Copy or download the video again.")
    origin = pts[0]
    frame_times = tuple(float((p - origin) * time_base) for p in pts)
    intervals = np.diff(np.asarray(pts, dtype=np.int64))
    if len(intervals):
        typical = int(np.median(intervals))
        uneven = np.abs(intervals - typical) > max(float(0.001 / time_base), 0.1 * typical)
        variable = bool(uneven.mean() > 0.01)
    else:
        typical, variable = 0, False
    last = float(last_duration * time_base) or (float(typical * time_base) if typical > 0 else 1 / 25)
    duration = frame_times[-1] + last
    fps = len(pts) / duration
    if not variable and len(pts) > 1:
        measured = (len(pts) - 1) / frame_times[-1]
        # The nominal rate where the timestamps agree with it (29.97 stays 30000/1001 in a 1 ms time base).
        fps = float(average_rate) if average_rate and abs(average_rate - measured) < 0.01 * measured else measured
    if sar <= 0:
        facts["sample_aspect_ratio"] = sar = Fraction(1)
    display_width = max(1, round(facts["stored_width"] * sar))
    width, height = display_width, facts["stored_height"]
    if rotation in (90, 270):
        width, height = height, width
    return VideoInfo(path=path, duration=duration, fps=fps, width=width, height=height, frame_count=len(pts),
                     variable_frame_rate=variable, time_base=Fraction(time_base), frame_pts=tuple(pts),
                     frame_times=frame_times, **facts)


# ---------------------------------------------------------------- decoding frames


def _picture(info: VideoInfo, frame: av.VideoFrame, size: tuple[int, int] | None, gray: bool) -> np.ndarray:
    """A decoded frame as shown: scaled (swscale, area) to `size` (width, height of the shown picture; None: the
    display size), then rotated. RGB uint8 [H, W, 3], or [H, W] when gray."""
    width, height = size or (info.width, info.height)
    if info.rotation in (90, 270):
        width, height = height, width
    array = frame.to_ndarray(format="gray" if gray else "rgb24", width=width, height=height,
                             interpolation="AREA", src_color_range=frame.color_range)
    if info.rotation:
        array = np.rot90(array, info.rotation // 90)  # counter-clockwise, as ffmpeg's autorotate shows it
    return np.ascontiguousarray(array)


class _Decoder:
    """An open video positioned somewhere: decoding forward from the current position is much cheaper than a seek,
    which is what scrubbing, one-frame steps and consecutive windows of one clip do. Not thread-safe: hold `lock`."""

    FORWARD_LIMIT = 48  # frames; beyond this a keyframe seek is cheaper than decoding forward
    REOPEN_BEFORE = 2.0  # seconds; targets this close to the start are read from the start, without a seek
    # Seconds before the target to seek to, tried in turn until decoding starts at or before the target (an MP4's
    # index lands on the keyframe before it; MPEG-TS has no index and can land past it), then the start.
    SEEK_MARGINS = (0.0, 3.0, 30.0)

    def __init__(self, info: VideoInfo):
        self.info = info
        self.lock = threading.Lock()
        self.container: av.container.InputContainer | None = None
        self.frames: Iterator[av.VideoFrame] | None = None
        self.next_index = 0

    def _restart(self, first: int, attempt: int) -> bool:
        """Position before frame `first`, with the attempt-th seek margin; True when reading from the start."""
        t = self.info.frame_times[first] - (self.SEEK_MARGINS[attempt] if attempt < len(self.SEEK_MARGINS) else 1e18)
        from_start = t < self.REOPEN_BEFORE
        if self.container is None or from_start:
            self.close()
            self.container = _open(self.info.path)
            _video_stream(self.container, self.info.path).thread_type = "AUTO"  # before its codec opens
        stream = _video_stream(self.container, self.info.path)
        if not from_start:  # the keyframe at or before that time
            self.container.seek(self.info.frame_pts[0] + int(t / self.info.time_base), stream=stream, backward=True)
        self.frames = self.container.decode(stream)
        self.next_index = -1  # unknown until a frame is decoded
        return from_start

    def decoded(self, first: int) -> Iterator[tuple[int, av.VideoFrame]]:
        """(index, frame) of the decoded frames from index `first` on, in display order."""
        ahead = first - self.next_index
        attempt, landed = 0, True
        if self.frames is None or self.next_index < 0 or not 0 <= ahead <= self.FORWARD_LIMIT:
            landed = self._restart(first, attempt)
        while True:
            try:
                frame = next(self.frames, None)
            except av.FFmpegError as err:
                self.frames = None
                raise VideoError(f"Decoding {self.info.path.name} failed near frame {self.next_index} ({err}); the "
                                 "file may be damaged: copy or export it again.") from None
            index = None if frame is None else (  # a frame without a timestamp follows the one before it
                self.info.index_of_pts(frame.pts) if frame.pts is not None else max(self.next_index, 0))
            if not landed and (index is None or index > first):  # the seek landed past the target: seek earlier
                attempt += 1
                landed = self._restart(first, attempt)
                continue
            landed = True
            if frame is None:
                self.frames = None
                return
            self.next_index = index + 1
            if index >= first:
                yield index, frame

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
        self.container, self.frames = None, None


def read_frames(info: VideoInfo, indices: Sequence[int], *, size: tuple[int, int] | None = None,
                gray: bool = False, decoder: _Decoder | None = None) -> Iterator[np.ndarray]:
    """The shown picture of each frame in `indices` (ascending; repeats allowed), in one decoding pass: RGB uint8
    [H, W, 3] (grey [H, W] with gray=True) at `size` (width, height) or the display size (see the module docstring).

    This is how the studio reads frames everywhere (preview, cut, suggestions, training, captions), so all of them
    agree on which frame index i is and when it is shown (info.frame_times[i]).
    Raises VideoError naming the file when it ends or fails to decode before the last wanted frame.
    """
    if not indices:
        return
    if list(indices) != sorted(indices) or indices[0] < 0 or indices[-1] >= info.frame_count:
        raise ValueError(f"indices must be ascending within 0..{info.frame_count - 1}, got {indices[0]}..{indices[-1]}")
    own = decoder is None
    decoder = decoder or _Decoder(info)
    position, count, shown = 0, len(indices), None
    try:
        for index, frame in decoder.decoded(indices[0]):
            picture = None
            if indices[position] <= index:
                picture = _picture(info, frame, size, gray)
            while position < count and indices[position] < index:  # not decoded (a damaged frame): the picture
                yield shown if shown is not None else picture  # on screen before it stays, as in a player
                position += 1
            while position < count and indices[position] == index:
                yield picture
                position += 1
            shown = picture if picture is not None else shown
            if position == count:
                return
        raise VideoError(f"{info.path.name} ended after frame {decoder.next_index - 1} of {info.frame_count}: the "
                         "file may be truncated or damaged. Copy or export it again.")
    finally:
        if own:
            decoder.close()


# ---------------------------------------------------------------- previews

_DECODERS: OrderedDict[tuple, _Decoder] = OrderedDict()
_FRAMES: OrderedDict[tuple, np.ndarray] = OrderedDict()
_CACHE_LOCK = threading.Lock()
FRAME_CACHE_SIZE = 64  # previews (at most max_width wide), so a few tens of MB


def _open_decoder(info: VideoInfo) -> _Decoder:
    """The kept-open decoder of this exact file (a few are kept: the source and its proxy while scrubbing)."""
    stat = info.path.stat()
    key = (info.path, stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        decoder = _DECODERS.get(key)
        if decoder is None:
            decoder = _DECODERS[key] = _Decoder(info)
        _DECODERS.move_to_end(key)
        while len(_DECODERS) > 4:
            old = _DECODERS.popitem(last=False)[1]
            with old.lock:
                old.close()
        return decoder


def _usable_proxy(info: VideoInfo, proxy: Path | None) -> VideoInfo | None:
    """The proxy's VideoInfo when it is a finished proxy of this source (one frame per source frame)."""
    if proxy is None or not proxy.exists():
        return None
    try:
        proxy_info = probe_video(proxy)
    except VideoError:
        return None
    return proxy_info if proxy_info.frame_count == info.frame_count else None


def read_frame(info: VideoInfo, index: int, proxy: Path | None = None,
               size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB frame number `index` (0-based, display order, at its display size or `size`), exactly the frame a cut
    would use. With a finished preview proxy (build_preview_proxy) the frame comes from it, small and quick;
    otherwise from the source, kept open and decoding forward when possible."""
    if not 0 <= index < info.frame_count:
        raise VideoError(f"{info.path.name} has frames 0..{info.frame_count - 1}; frame {index} does not exist.")
    source = _usable_proxy(info, proxy) or info
    decoder = _open_decoder(source)
    with decoder.lock:
        picture = next(read_frames(source, [index], size=size, decoder=decoder))
    return picture


def frame_at(source: str | os.PathLike | VideoInfo, t: float, max_width: int | None = None,
             proxy: Path | None = None) -> np.ndarray:
    """RGB frame on screen at time t seconds (see the module's time convention), at most `max_width` wide.

    Previews are cached, so stepping back and forth over the same frames costs nothing. Pass the source's preview
    proxy (preview_proxy_path) for random access in well under 150 ms on long high-resolution sources.
    """
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    index = info.frame_index_at(t)
    size = (info.width, info.height)
    if max_width and info.width > max_width:
        size = (max_width, max(2, round(info.height * max_width / info.width)))
    use_proxy = proxy if max_width and max_width <= PROXY_WIDTH else None
    key = (info.path, info.frame_count, info.duration, index, size, use_proxy is not None and use_proxy.exists())
    with _CACHE_LOCK:
        if key in _FRAMES:
            _FRAMES.move_to_end(key)
            return _FRAMES[key]
    frame = read_frame(info, index, use_proxy, size)
    frame.setflags(write=False)
    with _CACHE_LOCK:
        _FRAMES[key] = frame
        while len(_FRAMES) > FRAME_CACHE_SIZE:
            _FRAMES.popitem(last=False)
    return frame


PROXY_WIDTH = 640  # pixels; preview proxies are this wide (or the source's width if smaller)
PROXY_RATE = 25  # proxies number frames at a constant rate, so frame i of the proxy is frame i of the source
PROXY_VERSION = 3  # in the proxy's name: version 2 kept a non-square source's stored pixel shape; made again
PROXY_KEYINT = 12  # a keyframe every 12 frames: any frame is at most 11 cheap decodes away


def preview_proxy_path(info: VideoInfo, cache_dir: str | os.PathLike) -> Path:
    """Where the preview proxy of this exact source file (path, size, date) lives under cache_dir."""
    stat = info.path.stat()
    key = f"{info.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|proxy-v{PROXY_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return CacheLayout(Path(cache_dir)).previews_dir / f"{info.path.stem}-{digest}.mp4"


def build_preview_proxy(source: str | os.PathLike | VideoInfo, cache_dir: str | os.PathLike, *,
                        on_progress: Callable[[float, str], None] | None = None,
                        should_stop: Callable[[], bool] | None = None) -> Path:
    """Make (once) a small, short-GOP copy of the source with exactly one frame per shown source frame, square
    pixels at the source's display aspect, for fast random access while scrubbing; long GOPs of films otherwise cost
    seconds per seek. Returns its path.

    Nothing is left behind when it fails or is stopped (should_stop() -> True raises InterruptedError).
    """
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    target = preview_proxy_path(info, cache_dir)
    if target.exists():
        return target
    width = min(PROXY_WIDTH, info.width - info.width % 2)
    height = max(2, round(info.height * width / info.width / 2) * 2)
    with atomic_path(target, suffix=".part.mp4") as tmp:
        # ffmpeg drops the frames an edit list hides and rotates upright, as the studio's reader does; the scale to
        # the display size (setsar=1) makes its pixels square. Renumbering the frames in a 1/PROXY_RATE time base
        # keeps timestamps exact and the fps filter only sets durations; passthrough and the frame count stop
        # ffmpeg's rate conversion from repeating a frame (it repeated the first of a 16 fps MP4).
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(info.path),
               "-map", "0:v:0", "-vf",
               f"settb=1/{PROXY_RATE},setpts=N,fps={PROXY_RATE},scale={width}:{height}:flags=bilinear,setsar=1",
               "-fps_mode", "passthrough", "-frames:v", str(info.frame_count), "-an", "-sn", "-c:v", "libx264",
               "-preset", "ultrafast", "-tune", "fastdecode", "-g", str(PROXY_KEYINT), "-bf", "0", "-crf", "26",
               "-pix_fmt", "yuv420p", "-progress", "pipe:1", "-nostats", str(tmp)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        stopped = False
        for line in proc.stdout:
            if should_stop is not None and should_stop():
                stopped = True
                proc.kill()
                break
            if line.startswith(b"frame=") and on_progress is not None:
                done = int(line.split(b"=")[1] or 0)
                on_progress(min(1.0, done / info.frame_count), f"preview copy: frame {done}/{info.frame_count}")
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.wait()
        if stopped:
            raise InterruptedError(f"Preview copy of {info.path.name} stopped.")
        if proc.returncode != 0:
            raise VideoError(f"Could not make a preview copy of {info.path.name}: {err.strip()[-300:]}")
    return target


def thumbnails(source: str | os.PathLike | VideoInfo, count: int = 12, width: int = 160,
               proxy: Path | None = None) -> list[tuple[float, np.ndarray]]:
    """`count` evenly spaced (time, RGB frame) pairs over the whole video, each `width` pixels wide."""
    info = source if isinstance(source, VideoInfo) else probe_video(source)
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    times = [info.duration * (i + 0.5) / count for i in range(count)]
    return [(t, frame_at(info, t, max_width=width, proxy=proxy)) for t in times]


def format_time(seconds: float) -> str:
    """hh:mm:ss.mmm, the timestamps file's notation."""
    millis = int(round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"
