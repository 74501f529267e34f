"""Clips tab: open a source video, scrub it frame by frame, build a cut list (by hand, from a timestamps file or from
motion suggestions) and export Wan-ready clips into the project's clips/ folder.

Thin UI over engine.clips and engine.core.video. The cut list of each source is saved as a timestamps file under
cache/cuts/ on every change, so a page reload or a restart shows the same list.
"""

from __future__ import annotations

import html
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import gradio as gr
from gradio.context import Context

from engine.clips.cut import (
    ClipError,
    Cut,
    ExportStopped,
    clip_frames,
    cut_clip,
    cut_clips,
    fitted_frames,
    parse_size,
    read_manifest,
    validate_cuts,
)
from engine.clips.suggest import suggest_windows
from engine.clips.timestamps import format_timestamps, parse_time, read_timestamps
from engine.core.files import atomic_write_text
from engine.core.layout import VIDEO_EXTENSIONS
from engine.core.motion import MOTION_UNIT, MOTION_UNIT_SHORT
from engine.core.video import (
    VideoError,
    VideoInfo,
    build_preview_proxy,
    format_time,
    frame_at,
    preview_proxy_path,
    probe_video,
    thumbnails,
)
from studio.context import AppContext
from studio.progress import report_to, session_of

TITLE = "Clips"
OUTPUT_FPS = 16.0  # Wan's frame rate: every exported clip is resampled to it
PREVIEW_WIDTH = 640
THUMBNAIL_COUNT = 12
CUT_HEADERS = ["#", "Start (s)", "End (s)", "Frames", "Name", f"Motion ({MOTION_UNIT_SHORT})", "Flags"]
EXPORTED_HEADERS = ["Clip", "Start", "Frames", "Size", "Source"]
BAD_INPUT = (VideoError, ClipError, OSError)


class ClipsTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.project = ctx.project
        self.proxy_builds: dict[Path, Future] = {}
        self.proxy_progress: dict[Path, float] = {}
        self.proxy_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preview-proxy")
        self.tasks = ctx.jobs.tasks

    # ------------------------------------------------------------ helpers over the engine

    def source_path(self, name: str | None) -> Path:
        if not name:
            raise ClipError("No source video: upload one or pick one from the project's sources.")
        try:
            path = self.project.source_file(name)
        except ValueError as err:
            raise ClipError(str(err)) from None
        if not path.is_file():
            raise ClipError(f"{name} is no longer in {self.project.sources_dir}.")
        return path

    def info(self, name: str | None) -> VideoInfo:
        return probe_video(self.source_path(name))

    def proxy(self, info: VideoInfo) -> Path | None:
        path = preview_proxy_path(info, self.project.cache_dir)
        return path if path.exists() else None

    def start_proxy(self, info: VideoInfo) -> bool:
        """Build the preview copy in the background (once); True while it is being made."""
        if self.proxy(info) is not None:
            return False
        future = self.proxy_builds.get(info.path)
        if future is None or (future.done() and future.exception() is not None and not self.proxy(info)):
            self.proxy_progress[info.path] = 0.0

            def progress(fraction: float, _message: str, path=info.path) -> None:
                self.proxy_progress[path] = fraction

            future = self.proxy_executor.submit(build_preview_proxy, info, self.project.cache_dir,
                                                on_progress=progress)
            self.proxy_builds[info.path] = future
        return not future.done()

    def cuts_file(self, name: str) -> Path:
        return self.project.cache.cut_list_file(name)

    def deleted_cuts_file(self, name: str) -> Path:
        return self.project.cache.deleted_cuts_file(name)

    def export_settings(self, frames, fit: bool) -> int | None:
        return None if fit else int(frames or 81)

    def rows(self, cuts: list[Cut], info: VideoInfo | None, frames: int | None,
             scores: dict[int, float] | None = None) -> list[list]:
        flags = validate_cuts(cuts, info.duration, frames=frames, fps=OUTPUT_FPS) if info else [[] for _ in cuts]
        scores = scores or {}
        return [[i + 1, round(c.start, 3), None if c.end is None else round(c.end, 4),
                 clip_frames(c, frames, OUTPUT_FPS), c.name, scores.get(i, ""), "; ".join(f) or "ok"]
                for i, (c, f) in enumerate(zip(cuts, flags))]

    @staticmethod
    def cuts_from_rows(rows) -> tuple[list[Cut], dict[int, float]]:
        """The cut list in the table; rows without a start are dropped. Raises ClipError naming a bad cell."""
        cuts, scores = [], {}
        for number, row in enumerate(rows or [], 1):
            row = list(row) + [""] * (len(CUT_HEADERS) - len(row))
            _, start, end, _, name, score, _ = row[: len(CUT_HEADERS)]
            if _blank(start):
                continue
            try:
                start_s = _seconds(start)
                end_s = None if _blank(end) else _seconds(end)
            except ValueError as exc:
                raise ClipError(f"Cut {number}: {exc}") from None
            if not _blank(score):
                scores[len(cuts)] = float(score)
            cuts.append(Cut(start_s, end_s, "" if _blank(name) else str(name).strip()))
        return cuts, scores

    def save_cuts(self, name: str | None, cuts: list[Cut]) -> None:
        if name:
            atomic_write_text(self.cuts_file(name), format_timestamps(cuts))

    def load_cuts(self, name: str) -> list[Cut]:
        path = self.cuts_file(name)
        try:
            return read_timestamps(path) if path.exists() else []
        except ClipError:
            return []

    def exported_rows(self) -> list[list]:
        return [[r["clip"], format_time(r["start"]), r["frames"], f"{r['width']}x{r['height']}",
                 Path(r["source"]).name] for r in read_manifest(self.project.clips_dir)]

    def source_choices(self) -> list[str]:
        return [p.name for p in self.project.list_sources()]

    # ------------------------------------------------------------ layout

    def build(self) -> None:
        settings = self.project.settings()
        gr.Markdown("Open a source video, scrub to the moments you want, mark cuts, then export them as training "
                    f"clips ({OUTPUT_FPS:g} fps, 4k+1 frames) into `{self.project.clips_dir}`.")
        with gr.Row():
            self.source = gr.Dropdown(self.source_choices(), label="Source video", interactive=True, scale=3)
            self.upload = gr.UploadButton("Add a video to sources", file_types=list(VIDEO_EXTENSIONS), scale=1)
        self.info_box = gr.Markdown(elem_id="clips-info")
        self.proxy_timer = gr.Timer(1.0, active=False)
        with gr.Row():
            with gr.Column(scale=3):
                self.preview = gr.Image(label="Frame preview", type="numpy", interactive=False, height=380,
                                        elem_id="clips-preview")
                self.time = gr.Slider(0, 1, value=0, step=0.001, label="Time (s)")
                self.position = gr.Textbox(label="Position", interactive=False, elem_id="clips-position")
                with gr.Row():
                    back_second = gr.Button("-1 s", size="sm")
                    back_frame = gr.Button("-1 frame", size="sm")
                    next_frame = gr.Button("+1 frame", size="sm")
                    next_second = gr.Button("+1 s", size="sm")
                self.strip = gr.Gallery(label="Whole video (click to jump)", columns=THUMBNAIL_COUNT, rows=1,
                                        height=120, allow_preview=False, object_fit="cover")
            with gr.Column(scale=2):
                with gr.Row():
                    self.mark_in = gr.Number(label="In (s)", precision=3)
                    self.mark_out = gr.Number(label="Out (s)", precision=3)
                with gr.Row():
                    set_in = gr.Button("Mark in")
                    set_out = gr.Button("Mark out")
                with gr.Row():
                    add_in_out = gr.Button("Add cut in..out")
                    add_here = gr.Button("Add a clip here", variant="primary")
                play = gr.Button("Play selection")
                self.selection = gr.Video(label="Selection (16 fps)", interactive=False, autoplay=True, loop=True,
                                          height=240)
        gr.Markdown("### Cut list\n\nA suggested window's motion is the mean optical flow inside it, in "
                    f"{MOTION_UNIT}: the same measure as the Generate tab's readout of a generated video.")
        self.table = gr.Dataframe(headers=CUT_HEADERS, datatype=["number", "number", "number", "number", "str",
                                                                 "str", "str"],
                                  type="array", interactive=True, label="Cuts (edit start, end or name)",
                                  static_columns=[0, 3, 5, 6], wrap=True, elem_id="clips-cuts")
        with gr.Row():
            self.delete_number = gr.Number(1, label="Cut #", precision=0, minimum=1, scale=1)
            delete = gr.Button("Delete cut", scale=1)
            clear = gr.Button("Delete all cuts", variant="stop", scale=1)
            restore = gr.Button("Restore deleted cuts", scale=1)
            self.suggest_count = gr.Number(label="How many suggestions", value=5, precision=0, minimum=1, scale=1)
            suggest = gr.Button("Suggest dynamic windows", scale=2)
            stop_suggest = gr.Button("Stop analysis", scale=1)
        with gr.Row():
            self.times_upload = gr.UploadButton("Import timestamps file", file_types=[".txt"])
            times_export = gr.Button("Export timestamps file")
            self.times_file = gr.File(label="Timestamps file", interactive=False, height=60)
        gr.Markdown("### Export")
        with gr.Row():
            self.frames = gr.Number(label="Frames per clip (4k+1)", value=settings.clip_frames, precision=0,
                                    minimum=5, step=4)
            self.fit = gr.Checkbox(label="Use each cut's own length (longest 4k+1 in start..end)", value=False)
            self.size = gr.Textbox(label="Size (WxH, multiples of 16; empty keeps the source size)",
                                   value=f"{settings.clip_width}x{settings.clip_height}")
            self.crop = gr.Checkbox(label="Center-crop (off: stretch)", value=True)
        with gr.Row():
            export = gr.Button("Export clips", variant="primary")
            stop = gr.Button("Stop export")
        self.export_status = gr.Markdown(elem_id="clips-export-status")
        self.exported = gr.Dataframe(headers=EXPORTED_HEADERS, type="array", interactive=False,
                                     label="Exported clips", elem_id="clips-exported")
        self.ctx.ui["clips.exported"] = self.exported  # other tabs may refresh when clips are exported

        source_outputs = [self.info_box, self.time, self.preview, self.position, self.strip, self.table,
                          self.proxy_timer, self.mark_in, self.mark_out]
        self.source.change(self.open_source, [self.source, self.frames, self.fit], source_outputs)
        self.upload.upload(self.add_upload, [self.upload], [self.source])
        self.proxy_timer.tick(self.proxy_tick, [self.source], [self.info_box, self.strip, self.proxy_timer])
        self.time.change(self.show_frame, [self.source, self.time], [self.preview, self.position],
                         trigger_mode="always_last", show_progress="hidden")
        for button, frames_step, seconds_step in [(back_second, 0, -1.0), (back_frame, -1, 0.0),
                                                  (next_frame, 1, 0.0), (next_second, 0, 1.0)]:
            button.click(lambda name, t, f=frames_step, s=seconds_step: self.step(name, t, f, s),
                         [self.source, self.time], [self.time], show_progress="hidden")
        self.strip.select(self.jump_to_thumbnail, [self.source], [self.time])
        set_in.click(lambda t: t, [self.time], [self.mark_in])
        set_out.click(lambda t: t, [self.time], [self.mark_out])
        settings_inputs = [self.source, self.table, self.frames, self.fit]
        add_in_out.click(self.add_in_out, [*settings_inputs, self.mark_in, self.mark_out], [self.table])
        add_here.click(self.add_here, [*settings_inputs, self.time], [self.table])
        play.click(self.play_selection, [self.source, self.mark_in, self.mark_out, self.time, self.frames],
                   [self.selection])
        self.table.input(self.edit_table, settings_inputs, [self.table])
        self.frames.change(self.edit_table, settings_inputs, [self.table])
        self.fit.change(self.edit_table, settings_inputs, [self.table])
        delete.click(self.delete_cut, [*settings_inputs, self.delete_number], [self.table])
        clear.click(self.clear_cuts, settings_inputs, [self.table])
        restore.click(self.restore_cuts, settings_inputs, [self.table])
        suggest.click(self.suggest, [*settings_inputs, self.suggest_count], [self.table])
        stop_suggest.click(self.stop_own("analysis"), None, None, concurrency_limit=None)
        self.times_upload.upload(self.import_times, [*settings_inputs, self.times_upload], [self.table])
        times_export.click(self.export_times, [self.source, self.table], [self.times_file])
        export.click(self.export, [*settings_inputs, self.size, self.crop], [self.export_status, self.exported])
        stop.click(self.stop_own("export"), None, None, concurrency_limit=None)
        # the dropdown may already show the first source, so no change event: open it explicitly after loading
        Context.root_block.load(self.refresh, None, [self.source, self.exported]).then(
            self.open_source, [self.source, self.frames, self.fit], source_outputs)
        self.ctx.refreshers[TITLE] = (self.reread, [self.source], [self.source, self.exported])

    # ------------------------------------------------------------ handlers (thin)

    def refresh(self):
        choices = self.source_choices()
        return gr.Dropdown(choices=choices, value=choices[0] if choices else None), self.exported_rows()

    def reread(self, name):
        """The sources and exported clips as the disk has them now; the open source stays open."""
        choices = self.source_choices()
        if name in choices:
            return gr.update(choices=choices), self.exported_rows()
        return gr.update(choices=choices, value=choices[0] if choices else None), self.exported_rows()

    def stop_own(self, kind: str):
        """A Stop button's handler: stops this page's `kind` task only (another page's export runs on)."""
        def stop(request: gr.Request) -> None:
            if not self.tasks.stop_owned(request.session_hash or "", (kind,)):
                gr.Info(f"This page has no {kind} running.")
        return stop

    def open_source(self, name, frames, fit):
        if not name:
            return ("No source video yet: upload one.", gr.Slider(0, 1, value=0), None, "", [], [],
                    gr.Timer(active=False), None, None)
        try:
            info = self.info(name)
        except BAD_INPUT as exc:
            gr.Warning(str(exc))
            return (f"**Cannot open {html.escape(name)}:** {html.escape(str(exc))}", gr.Slider(0, 1, value=0),
                    None, "", [], [], gr.Timer(active=False), None, None)
        building = self.start_proxy(info)
        strip = self.strip_items(info)
        cuts = self.load_cuts(name)
        return (self.info_text(info, building), gr.Slider(0, round(info.duration, 3), value=0, step=0.001),
                frame_at(info, 0.0, max_width=PREVIEW_WIDTH, proxy=self.proxy(info)), self.position_text(info, 0.0),
                strip, self.rows(cuts, info, self.export_settings(frames, fit)), gr.Timer(active=building), None, None)

    def strip_items(self, info: VideoInfo) -> list[tuple]:
        proxy = self.proxy(info)
        if proxy is None and info.duration > 120:  # a long source: wait for the preview copy, seeks are slow
            return []
        return [(image, format_time(t)) for t, image in thumbnails(info, THUMBNAIL_COUNT, width=160, proxy=proxy)]

    def info_text(self, info: VideoInfo, building: bool) -> str:
        facts = info.summary()
        parts = [f"**{html.escape(info.path.name)}**", f"{facts['duration_s']} s", f"{facts['fps']} fps "
                 f"({facts['frame_rate']})", str(facts["resolution"]),
                 *([facts["stored_as"]] if "stored_as" in facts else []), str(facts["codec"]),
                 f"{facts['pixel_format']} ({facts['bit_depth']}-bit)", f"rotation {facts['rotation']}°",
                 f"{facts['frames']} frames", "audio (dropped on export)" if facts["audio"] else "no audio"]
        text = " · ".join(parts)
        if building:
            done = self.proxy_progress.get(info.path, 0.0)
            text += f"\n\nMaking a fast preview copy in the background ({done:.0%}); scrubbing works meanwhile."
        return text

    def proxy_tick(self, name):
        try:
            info = self.info(name)
        except BAD_INPUT:
            return gr.skip(), gr.skip(), gr.Timer(active=False)
        future = self.proxy_builds.get(info.path)
        if future is not None and future.done():
            error = future.exception()
            if error is not None:
                gr.Warning(f"No preview copy for {info.path.name} (scrubbing stays slower): {error}")
            return self.info_text(info, False), self.strip_items(info), gr.Timer(active=False)
        return self.info_text(info, True), gr.skip(), gr.Timer(active=True)

    def add_upload(self, file):
        if file is None:
            return gr.skip()
        uploaded = Path(file if isinstance(file, str) else file.name)
        if uploaded.suffix.lower() not in VIDEO_EXTENSIONS:
            raise gr.Error(f"{uploaded.name} is not an mp4, mkv, mov, webm or avi file.")
        try:
            probe_video(uploaded)
        except VideoError as exc:
            raise gr.Error(str(exc)) from None
        try:  # a different video of the same name is kept beside the first, not dropped
            target = self.project.add_upload(uploaded, self.project.sources_dir)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if target.name != uploaded.name:
            gr.Info(f"Another {uploaded.name} is in the sources already: this one is kept as {target.name}.")
        return gr.Dropdown(choices=self.source_choices(), value=target.name)

    def position_text(self, info: VideoInfo, t: float) -> str:
        index = info.frame_index_at(t)
        return f"{format_time(t)} · frame {index} of {info.frame_count} (shown from {info.frame_times[index]:.3f} s)"

    def show_frame(self, name, t):
        try:
            info = self.info(name)
            t = float(t or 0.0)
            return frame_at(info, t, max_width=PREVIEW_WIDTH, proxy=self.proxy(info)), self.position_text(info, t)
        except BAD_INPUT as exc:
            return None, str(exc)

    def step(self, name, t, frames_step: int, seconds_step: float):
        try:
            info = self.info(name)
        except BAD_INPUT as exc:
            raise gr.Error(str(exc)) from None
        t = float(t or 0.0)
        if frames_step:
            index = min(max(info.frame_index_at(t) + frames_step, 0), info.frame_count - 1)
            t = info.frame_times[index]
        else:
            t = t + seconds_step
        return round(min(max(t, 0.0), info.duration), 3)

    def jump_to_thumbnail(self, name, evt: gr.SelectData):
        info = self.info(name)
        return round(info.duration * (evt.index + 0.5) / THUMBNAIL_COUNT, 3)

    def _update(self, name, cuts: list[Cut], frames, fit, scores=None):
        try:
            info = self.info(name)
        except BAD_INPUT:
            info = None
        self.save_cuts(name, cuts)
        return self.rows(cuts, info, self.export_settings(frames, fit), scores)

    def _cuts(self, rows) -> tuple[list[Cut], dict[int, float]]:
        try:
            return self.cuts_from_rows(rows)
        except ClipError as exc:
            raise gr.Error(str(exc)) from None

    def add_in_out(self, name, rows, frames, fit, mark_in, mark_out):
        if mark_in is None:
            raise gr.Error("Mark in first (and out, or use 'Add a clip here').")
        cuts, scores = self._cuts(rows)
        if mark_out is not None and mark_out <= mark_in:
            raise gr.Error(f"Out ({mark_out:.3f} s) must be after in ({mark_in:.3f} s).")
        cuts.append(Cut(float(mark_in), None if mark_out is None else float(mark_out)))
        return self._update(name, cuts, frames, fit, scores)

    def add_here(self, name, rows, frames, fit, t):
        cuts, scores = self._cuts(rows)
        length = int(frames or 81)
        start = round(float(t or 0.0), 3)
        cuts.append(Cut(start, start + length / OUTPUT_FPS))
        return self._update(name, cuts, frames, fit, scores)

    def edit_table(self, name, rows, frames, fit):
        cuts, scores = self._cuts(rows)
        return self._update(name, cuts, frames, fit, scores)

    def delete_cut(self, name, rows, frames, fit, number):
        cuts, scores = self._cuts(rows)
        if number is None or not 1 <= int(number) <= len(cuts):
            raise gr.Error(f"There is no cut #{number}; the list has {len(cuts)}.")
        index = int(number) - 1
        del cuts[index]
        scores = {i - (i > index): s for i, s in scores.items() if i != index}
        return self._update(name, cuts, frames, fit, scores)

    def clear_cuts(self, name, rows, frames, fit):
        cuts, _ = self._cuts(rows)
        if not cuts:
            raise gr.Error("The cut list is already empty.")
        atomic_write_text(self.deleted_cuts_file(name), format_timestamps(cuts))
        gr.Info(f"Deleted {len(cuts)} cut{'s' * (len(cuts) != 1)}; 'Restore deleted cuts' brings them back.")
        return self._update(name, [], frames, fit)

    def restore_cuts(self, name, rows, frames, fit):
        cuts, scores = self._cuts(rows)
        path = self.deleted_cuts_file(name) if name else None
        if path is None or not path.exists():
            raise gr.Error("No deleted cuts to restore for this source.")
        restored = read_timestamps(path)
        path.unlink()
        gr.Info(f"Restored {len(restored)} cut{'s' * (len(restored) != 1)}.")
        return self._update(name, cuts + restored, frames, fit, scores)

    def suggest(self, name, rows, frames, fit, count, request: gr.Request = None, progress=gr.Progress()):
        cuts, scores = self._cuts(rows)
        length = int(frames or 81)
        try:
            with self.tasks.run("analysis", f"finding motion windows in {name}", session_of(request)) as task:
                found = suggest_windows(self.source_path(name), int(count or 5), frames=length, fps=OUTPUT_FPS,
                                        avoid=cuts, cache_dir=self.project.cache_dir,
                                        on_progress=report_to(task, progress), should_stop=task.should_stop)
        except ExportStopped:
            gr.Info("Analysis stopped; the cut list is unchanged.")
            return gr.update()
        except BAD_INPUT as exc:
            raise gr.Error(str(exc)) from None
        if found.shortfall:
            gr.Warning(found.shortfall)
        for s in found:
            scores[len(cuts)] = s.score
            cuts.append(Cut(s.start, s.end))
        return self._update(name, cuts, frames, fit, scores)

    def import_times(self, name, rows, frames, fit, file):
        cuts, scores = self._cuts(rows)
        path = Path(file if isinstance(file, str) else file.name)
        try:
            imported = read_timestamps(path)
        except ClipError as exc:
            raise gr.Error(f"{path.name}: {exc}") from None
        gr.Info(f"Imported {len(imported)} cuts from {path.name}.")
        return self._update(name, cuts + imported, frames, fit, scores)

    def export_times(self, name, rows):
        cuts, _ = self._cuts(rows)
        if not cuts:
            raise gr.Error("The cut list is empty.")
        stem = Path(name).stem if name else "cuts"
        target = self.project.cache.timestamps_dir / f"{stem} timestamps.txt"
        atomic_write_text(target, format_timestamps(cuts))
        return str(target)

    def play_selection(self, name, mark_in, mark_out, t, frames):
        try:
            info = self.info(name)
            start = float(mark_in if mark_in is not None else t or 0.0)
            length = fitted_frames(float(mark_out) - start) if mark_out is not None and mark_out > start else \
                int(frames or 81)
            length = max(5, length)
            width = 320 if info.width >= info.height else 192
            height = max(16, int(round(width * info.height / info.width / 16)) * 16)
            target = self.project.cache.previews_dir / f"selection {Path(name).stem} {start:.3f}+{length}.mp4"
            if not target.exists():
                cut_clip(info, Cut(start), target, frames=length, fps=OUTPUT_FPS, size=(width, height))
            return str(target)
        except BAD_INPUT as exc:
            raise gr.Error(str(exc)) from None

    def export(self, name, rows, frames, fit, size, crop, request: gr.Request = None, progress=gr.Progress()):
        cuts, _ = self._cuts(rows)
        try:
            size_value = parse_size((size or "").strip() or None)
            with self.tasks.run("export", f"exporting {len(cuts)} clips from {name}", session_of(request)) as task:
                results = cut_clips(self.source_path(name), cuts, self.project.clips_dir,
                                    frames=self.export_settings(frames, fit), fps=OUTPUT_FPS, size=size_value,
                                    crop=bool(crop), on_progress=report_to(task, progress), should_stop=task.should_stop)
        except ExportStopped as exc:
            return f"Stopped: {exc} Finished clips are kept.", self.exported_rows()
        except BAD_INPUT as exc:
            raise gr.Error(str(exc)) from None
        written = sum(not r.skipped for r in results)
        kept = len(results) - written
        status = f"Exported {written} clip{'s' * (written != 1)} into `{self.project.clips_dir}`"
        if kept:
            status += f" ({kept} unchanged, kept)"
        return status + ".", self.exported_rows()


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def _seconds(value) -> float:
    return float(value) if isinstance(value, (int, float)) else parse_time(str(value))


def build(ctx: AppContext) -> None:
    ClipsTab(ctx).build()
