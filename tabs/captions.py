"""Captions tab: the clip playing beside its caption, BLIP-2 suggestions, pure-style tools, find & replace, export.

Thin UI over engine.captions: every edit is saved to the caption file (with history) as soon as the editor loses
focus, so a page reload or a restart shows exactly what is on disk.
"""

from __future__ import annotations

import html
import threading
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import gradio as gr
from gradio.context import Context

from engine.captions.captioners import (
    Blip2Captioner,
    CaptionerOutOfMemory,
    CaptionerSettings,
    suggest_captions,
)
from engine.captions.store import (
    CaptionStore,
    apply_style_to_clips,
    export_captions,
    find_replace_in_clips,
    import_captions,
)
from engine.captions.style import (
    CaptionChange,
    StyleRules,
    banned_words_by_caption,
    find_banned_words,
    format_replacement_lines,
    load_style_rules,
    parse_replacement_lines,
    preview_style,
    save_style_rules,
    word_diff,
)
from engine.captions.text import CaptionError
from engine.captions.tokens import TokenCounter
from engine.captions.vlm import DEFAULT_INSTRUCTION, MEMORY_MODES, VideoLanguageCaptioner
from engine.core.hardware import default_device
from engine.core.models import ModelFolderError
from engine.jobs import GpuBusyError
from engine.tasks import TaskStopped
from studio.context import AppContext
from studio.progress import report_to, session_of, waiting_note

TITLE = "Captions"
TABLE_HEADERS = ["Clip", "Status", "Tokens", "Caption"]
CAPTIONER_KINDS = ("BLIP-2 (captions a few frames)", "Video-language model (watches the clip)")
TABLE_WIDTHS = ["24%", "16%", "16%", "44%"]  # long clip names wrap instead of squeezing the caption


class CaptionerHolder:
    """The captioners (BLIP-2 and, when chosen, a video-language model), each loaded on first use and kept until
    Unload (never reloaded per click)."""

    def __init__(self, source: str):
        self.source = source
        self.captioners: dict[tuple, object] = {}

    def get(self, batch_size: int, video: VideoSettings | None = None):
        """BLIP-2 with `batch_size` frames per pass, or the video-language model of `video`."""
        key = ("video", video.source, video.memory_mode) if video else ("image", self.source)
        if key not in self.captioners:
            self.captioners[key] = (
                VideoLanguageCaptioner(video.source, default_device(), memory_mode=video.memory_mode) if video
                else Blip2Captioner(self.source, device=default_device(), batch_size=batch_size))
        captioner = self.captioners[key]
        if video:
            captioner.instruction, captioner.video_fps = video.instruction, video.fps
        else:
            captioner.batch_size = batch_size
        return captioner

    def unload(self) -> bool:
        loaded = [c for c in self.captioners.values() if c.loaded]
        for captioner in loaded:
            captioner.unload()
        return bool(loaded)


@dataclass(frozen=True)
class VideoSettings:
    """The video-language captioner's settings as the form holds them."""

    source: str
    instruction: str
    fps: float
    memory_mode: str


class TokenCounterHolder:
    """The Wan tokenizer, loaded once; None (with the reason) when the Wan folder has no usable tokenizer."""

    def __init__(self, wan_source: str):
        self.wan_source = wan_source
        self._counter: TokenCounter | None = None
        self.problem = ""

    def get(self) -> TokenCounter | None:
        if self._counter is None and not self.problem:
            try:
                self._counter = TokenCounter.for_wan_model(self.wan_source)
            except (ModelFolderError, OSError, ValueError) as err:
                self.problem = f"Token counts unavailable: {err}"
        return self._counter


def _diff_html(change: CaptionChange) -> str:
    parts = []
    for op, text in word_diff(change.before, change.after):
        escaped = html.escape(text)
        parts.append({"=": escaped, "-": f"<del>{escaped}</del>", "+": f"<ins>{escaped}</ins>"}[op])
    return "".join(parts)


def banned_html(captions: dict[str, str], changes: list[CaptionChange], rules: StyleRules) -> str:
    """The captions that would still hold a banned word after the rules are applied, named with the words."""
    found = banned_words_by_caption({**captions, **{c.clip: c.after for c in changes}}, rules.banned_words)
    if not found:
        return ""
    items = "".join(f"<li>{html.escape(clip)}: <b>{html.escape(', '.join(words))}</b></li>"
                    for clip, words in found.items())
    return f"<div class='caption-banned'><p>Banned words still in {len(found)} caption(s):</p><ul>{items}</ul></div>"


def changes_html(changes: list[CaptionChange], verb: str) -> str:
    if not changes:
        return f"<p>No caption {verb}.</p>"
    rows = "".join(f"<tr><td>{html.escape(c.clip)}</td><td>{_diff_html(c)}</td></tr>" for c in changes)
    return (f"<p>{len(changes)} caption(s) {verb}:</p><table class='caption-diff'><tr><th>Clip</th><th>Change</th>"
            f"</tr>{rows}</table>")


class CaptionsTab:
    """The Captions tab: handlers are methods that take the widgets' values and return their new values, so tests
    call them directly on a project (no browser). Style-rule handlers take the four rule fields last:
    trigger, replacement table, banned words, normalise."""

    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.store = CaptionStore(ctx.project.clips_dir)
        self.captioner = CaptionerHolder(ctx.models.captioner)
        self.tokens = TokenCounterHolder(ctx.models.wan)
        self.save_lock = threading.Lock()  # blur and navigation may both save the same caption at once
        self.rules_file = ctx.project.style_rules_file
        self.tasks = ctx.jobs.tasks

    # ------------------------------------------------------------ helpers over the engine

    @property
    def base_rules(self) -> StyleRules:
        """The style rules saved in the project (Apply and Save rules write them), read from disk each time."""
        try:
            return load_style_rules(self.rules_file) if self.rules_file.exists() else StyleRules()
        except CaptionError as err:
            gr.Warning(f"{self.rules_file.name} is not readable, so no style rules are in use: {err}")
            return StyleRules()

    def table_rows(self) -> list[list[str]]:
        """One row per clip: name, status (with any banned words of the saved rules), tokens, caption."""
        counter = self.tokens.get()
        banned_words = self.base_rules.banned_words
        rows = []
        for info in self.store.overview():
            status = info.status + (" (suggestion waiting)" if info.suggestion and info.status == "edited" else "")
            banned = find_banned_words(info.text, banned_words)
            if banned:
                status += " · banned: " + ", ".join(banned)
            count = counter.count(info.text).tokens if counter and info.text else ""
            preview = info.text if len(info.text) <= 70 else info.text[:67] + "..."
            rows.append([info.clip, status, count, preview])
        return rows

    def caption_notes(self, text: str, rules: StyleRules) -> str:
        notes = []
        counter = self.tokens.get()
        if counter is not None:
            count = counter.count(text)
            notes.append(f"**Warning:** {count.warning}" if count.warning else f"{count.tokens} / {count.limit} tokens")
        elif self.tokens.problem:
            notes.append(self.tokens.problem)
        banned = find_banned_words(text, rules.banned_words)
        if banned:
            notes.append("**Banned words:** " + ", ".join(banned))
        return " · ".join(notes)

    def rules_from_ui(self, trigger: str, replacements: str, banned: str, normalize: bool) -> StyleRules:
        words = [w.strip() for w in (banned or "").replace("\n", ",").split(",") if w.strip()]
        base = self.base_rules
        try:
            table = parse_replacement_lines(replacements or "")
            rules = StyleRules(trigger=(trigger or "").strip(), replacements=table, banned_words=words,
                               normalize=bool(normalize), category_order=base.category_order,
                               category_words=base.category_words, token_limit=base.token_limit)
            rules.validate()
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        return rules

    def video_settings(self, kind: str, source: str, instruction: str, fps, memory_mode: str) -> VideoSettings | None:
        """The video captioner's settings when the form chose it, else None (BLIP-2)."""
        if kind != CAPTIONER_KINDS[1]:
            return None
        if not (source or "").strip():
            raise gr.Error("Give the video-language model: a Qwen2.5-VL folder or hub id.")
        return VideoSettings(source.strip(), (instruction or "").strip() or DEFAULT_INSTRUCTION, float(fps),
                             memory_mode)

    def run_suggest(self, clips: list[str] | None, overwrite: bool, frames: int, prompt: str, batch_size: int,
                    video: VideoSettings | None, progress, owner: str = ""):
        """Suggest captions as a GPU task of this page's session: it waits (saying for what) while another GPU task
        runs, and is refused while a training run holds the GPU."""
        settings = CaptionerSettings(frames_per_clip=int(frames), prompt=(prompt or "").strip(),
                                     batch_size=int(batch_size))
        description = "captioning " + (clips[0] if clips and len(clips) == 1 else "clips")
        try:
            settings.validate()
            with self.tasks.run("captioning", description, owner, gpu=True, on_wait=waiting_note(progress)) as task:
                model = self.captioner.get(settings.batch_size, video)
                report_to(task, progress)(0.0, f"loading {model.name}" if not model.loaded else "captioning")
                # The video captioner's answers pass the project's pure-style rules, as saved on disk.
                rules = load_style_rules(self.rules_file) if video and self.rules_file.is_file() else None
                return suggest_captions(self.store, model, clips=clips, overwrite=overwrite, settings=settings,
                                        rules=rules, on_progress=report_to(task, progress),
                                        should_stop=task.should_stop)
        # VideoCaptionerError is a CaptionError
        except (CaptionError, ModelFolderError, CaptionerOutOfMemory, GpuBusyError, TaskStopped) as err:
            raise gr.Error(str(err)) from err

    def save_video_settings(self, kind: str, source: str, instruction: str, fps):
        """Keep the captioner choice and the video captioner's model, instruction and frame rate with the project
        (project.json)."""
        settings = self.ctx.project.settings()
        instruction = (instruction or "").strip()
        self.ctx.project.save_settings(replace(
            settings, caption_with_video=kind == CAPTIONER_KINDS[1], video_captioner_model=(source or "").strip(),
            caption_video_fps=float(fps),
            caption_instruction="" if instruction == DEFAULT_INSTRUCTION else instruction))
        return "Captioner settings saved with the project."

    def captioner_settings(self):
        """The captioner choice and the video captioner's settings as project.json has them (a page load)."""
        saved = self.ctx.project.settings()
        return (CAPTIONER_KINDS[1] if saved.caption_with_video else CAPTIONER_KINDS[0],
                saved.video_captioner_model or self.ctx.models.video_captioner,
                saved.caption_instruction or DEFAULT_INSTRUCTION, saved.caption_video_fps)

    # ------------------------------------------------------------ layout

    def build(self) -> None:
        store, base_rules = self.store, self.base_rules
        names = store.list_clips()
        gr.Markdown(f"Captions are `name.txt` beside each clip in `{store.clips_dir}`; every save is kept in history.")
        with gr.Row():
            with gr.Column(scale=2):
                self.table = gr.Dataframe(value=self.table_rows(), headers=TABLE_HEADERS, interactive=False,
                                          label="Clips", wrap=True, max_height=420, elem_id="caption-clip-table",
                                          column_widths=TABLE_WIDTHS)
            with gr.Column(scale=3):
                with gr.Row():
                    previous_button = gr.Button("◀ Previous", scale=0)
                    self.clip = gr.Dropdown(names, value=names[0] if names else None, label="Clip", interactive=True,
                                            scale=3)
                    next_button = gr.Button("Next ▶", scale=0)
                with gr.Row():
                    self.video = gr.Video(label="Clip video", interactive=False, autoplay=True, loop=True, height=320)
                    with gr.Column():
                        self.caption = gr.Textbox(
                            label="Caption", lines=6, max_lines=12,
                            placeholder="comma-separated phrases: subject, action, scene, camera, style")
                        self.replace_unreadable = gr.Checkbox(
                            False, visible=False,
                            label="Replace the non-UTF-8 caption file when saving (its original bytes are kept)")
                        self.save_status = gr.Markdown(elem_id="caption-save-status")
                        with gr.Row():
                            save_button = gr.Button("Save")
                            undo_button = gr.Button("Undo")
                with gr.Group():
                    self.suggestion = gr.Textbox(label="Suggestion", interactive=False, lines=2)
                    with gr.Row():
                        accept_button = gr.Button("Accept", size="sm")
                        append_button = gr.Button("Append", size="sm")
                        ignore_button = gr.Button("Ignore", size="sm")
                with gr.Row():
                    suggest_button = gr.Button("Suggest", variant="primary")
                    suggest_all_button = gr.Button("Suggest all missing")
                    stop_button = gr.Button("Stop", variant="stop")
                    accept_empty_button = gr.Button("Accept suggestions into empty captions")
                    unload_button = gr.Button("Unload captioner")
                with gr.Accordion("Captioner settings", open=False):
                    project = self.ctx.project.settings()
                    self.kind = gr.Radio(list(CAPTIONER_KINDS), value=CAPTIONER_KINDS[int(project.caption_with_video)],
                                         label="Captioner")
                    with gr.Group():
                        gr.Markdown(f"BLIP-2: `{self.ctx.models.captioner}` on {default_device().type.upper()}")
                        self.frames = gr.Slider(1, 8, value=3, step=1,
                                                label="Frames per clip (first, middle, last for 3)")
                        self.prompt = gr.Textbox(label="Prompt prefix (optional)", placeholder="e.g. a video of")
                        self.batch_size = gr.Slider(1, 32, value=8, step=1,
                                                    label="Batch size (frames per forward pass)")
                    with gr.Group():
                        self.vlm_source = gr.Textbox(
                            project.video_captioner_model or self.ctx.models.video_captioner,
                            label="Video-language model (Qwen2.5-VL folder or hub id)")
                        self.instruction = gr.Textbox(
                            project.caption_instruction or DEFAULT_INSTRUCTION, lines=4,
                            label="Instruction (saved with the project; the answer then passes your style rules)")
                        with gr.Row():
                            self.video_fps = gr.Slider(1, 16, value=project.caption_video_fps, step=1,
                                                       label="Frames per second it watches")
                            self.memory_mode = gr.Dropdown(list(MEMORY_MODES), value="auto",
                                                           label="Memory (8bit/4bit: CUDA only)")
                self.suggest_status = gr.Markdown(elem_id="caption-suggest-status")

        with gr.Accordion("Pure-style tools", open=False):
            with gr.Row():
                self.trigger = gr.Textbox(base_rules.trigger, label="Trigger word or prefix (put first)")
                self.banned = gr.Textbox(", ".join(base_rules.banned_words), label="Banned words (comma-separated)")
                self.normalize = gr.Checkbox(base_rules.normalize, label="Normalise: trim, dedupe, order phrases")
            self.replacements = gr.Textbox(
                format_replacement_lines(base_rules.replacements), lines=4, max_lines=20,
                label="Replacement table", info="One 'Name = generic description' per line; whole words, any case.",
                placeholder="Goku = a warrior with spiky black hair\nSon Goku = a warrior with spiky black hair",
            )
            with gr.Row():
                self.style_scope = gr.Radio(["This clip", "All clips"], value="All clips", label="Apply to")
                preview_button = gr.Button("Preview")
                apply_button = gr.Button("Apply", variant="primary")
                save_rules_button = gr.Button("Save rules")
            self.style_result = gr.HTML()

        with gr.Accordion("Find and replace", open=False):
            with gr.Row():
                self.find_text = gr.Textbox(label="Find")
                self.replace_text = gr.Textbox(label="Replace with")
            with gr.Row():
                self.use_regex = gr.Checkbox(False, label="Regular expression")
                self.case_sensitive = gr.Checkbox(False, label="Match case")
                self.whole_word = gr.Checkbox(False, label="Whole words")
                find_preview_button = gr.Button("Preview")
                replace_all_button = gr.Button("Replace all")
            self.find_result = gr.HTML()

        with gr.Accordion("Export and import", open=False):
            with gr.Row():
                self.export_format = gr.Radio([".jsonl", ".csv"], value=".jsonl", label="Format")
                export_button = gr.Button("Export all captions")
                self.export_file = gr.File(label="Exported file", interactive=False)
            with gr.Row():
                self.import_file = gr.File(label="File to import (.jsonl or .csv with clip, caption)",
                                           file_types=[".jsonl", ".csv"], type="filepath")
                self.keep_existing = gr.Checkbox(False, label="Only fill clips without a caption")
                import_button = gr.Button("Import")
            self.transfer_result = gr.HTML()

        # ------------------------------------------------------------ events
        rules = [self.trigger, self.replacements, self.banned, self.normalize]
        clip_view = [self.video, self.caption, self.save_status, self.suggestion, self.replace_unreadable]
        editor = [self.clip, self.caption, self.replace_unreadable, *rules]

        self.clip.change(self.load_clip, [self.clip, *rules], clip_view)
        self.caption.blur(self.save_caption, editor, [self.save_status, self.table])
        save_button.click(self.save_caption, editor, [self.save_status, self.table])
        previous_button.click(self.previous_clip, editor, [self.clip, self.table])
        next_button.click(self.next_clip, editor, [self.clip, self.table])
        self.table.select(select_row, None, self.clip)
        undo_button.click(self.undo, [self.clip, *rules], [self.caption, self.save_status, self.table])

        settings = [self.kind, self.frames, self.prompt, self.batch_size, self.vlm_source, self.instruction,
                    self.video_fps, self.memory_mode]
        saved_settings = [self.kind, self.vlm_source, self.instruction, self.video_fps]
        for field in (self.vlm_source, self.instruction):
            field.blur(self.save_video_settings, saved_settings, self.suggest_status)
        self.video_fps.release(self.save_video_settings, saved_settings, self.suggest_status)
        self.kind.input(self.save_video_settings, saved_settings, self.suggest_status)
        Context.root_block.load(self.captioner_settings, None, saved_settings)
        suggest_outputs = [self.suggestion, self.suggest_status, self.table]
        suggest_button.click(self.suggest_one, [self.clip, *settings], suggest_outputs,
                             show_progress_on=[self.suggest_status])
        suggest_all_button.click(self.suggest_missing, [self.clip, *settings], suggest_outputs,
                                 show_progress_on=[self.suggest_status])
        stop_button.click(self.stop_suggest, None, self.suggest_status, concurrency_limit=None)
        unload_button.click(self.unload, None, self.suggest_status)
        accept_empty_button.click(self.accept_where_empty, None, [self.suggest_status, self.table]).then(
            self.load_clip, [self.clip, *rules], clip_view)
        resolved = [self.caption, self.suggestion, self.save_status, self.table]
        accept_button.click(self.accept, [self.clip, *rules], resolved)
        append_button.click(self.append, [self.clip, *rules], resolved)
        ignore_button.click(self.ignore, [self.clip, *rules], resolved)

        preview_button.click(self.style_preview, [self.style_scope, self.clip, *rules], self.style_result)
        apply_button.click(self.style_apply, [self.style_scope, self.clip, *rules],
                           [self.style_result, self.caption, self.table])
        save_rules_button.click(self.save_rules, rules, self.style_result)

        find = [self.find_text, self.replace_text, self.use_regex, self.case_sensitive, self.whole_word, self.clip]
        find_preview_button.click(self.find_preview, find, [self.find_result, self.caption, self.table])
        replace_all_button.click(self.replace_all, find, [self.find_result, self.caption, self.table])

        export_button.click(self.export, self.export_format, [self.export_file, self.transfer_result])
        import_button.click(self.import_file_into_clips, [self.import_file, self.keep_existing, self.clip],
                            [self.transfer_result, self.caption, self.table])

        # A page load re-reads clips, captions and the saved style rules from disk: new clips from the Clips tab,
        # edits and rules saved before a reload.
        Context.root_block.load(self.refresh, [self.clip], [self.clip, self.table, *clip_view, *rules])
        # Selecting the tab, or a job ending (an export, a suggestion on another page), re-reads the lists; the
        # editor keeps what is being typed unless its clip is gone.
        self.ctx.refreshers[TITLE] = (self.reread, [self.clip, *rules], [self.clip, self.table, *clip_view])

    # ------------------------------------------------------------ handlers (thin)

    def refresh(self, clip: str | None):
        """A page load: the clip list, the table, the editor and the saved style rules, all from disk."""
        names = self.store.list_clips()
        clip = clip if clip in names else (names[0] if names else None)
        saved = self.base_rules
        rules = (saved.trigger, format_replacement_lines(saved.replacements), ", ".join(saved.banned_words),
                 saved.normalize)
        return (gr.update(choices=names, value=clip), self.table_rows(), *self.load_clip(clip, *rules), *rules)

    def reread(self, clip: str | None, *rules):
        """The clip list and table as the disk has them now; the editor is reloaded only if its clip is gone."""
        names = self.store.list_clips()
        if clip in names:
            return (gr.update(choices=names), self.table_rows(), *[gr.skip()] * 5)
        clip = names[0] if names else None
        return (gr.update(choices=names, value=clip), self.table_rows(), *self.load_clip(clip, *rules))

    def load_clip(self, clip: str | None, *rules):
        """Everything the editor shows for one clip, read from disk: video, caption, status, suggestion, and the
        'replace the unreadable file' switch."""
        store = self.store
        if not clip or clip not in store.list_clips():
            message = "No clip selected." if not clip else f"{clip} is no longer in {store.clips_dir}."
            return None, gr.update(value="", interactive=False), message, "", gr.update(visible=False)
        current = store.read(clip)
        suggestion = store.suggestion(clip)
        notes = self.caption_notes(current.text, self.rules_from_ui(*rules))
        status = (f"**{html.escape(current.message)}**" if not current.readable
                  else f"Loaded {html.escape(clip)}. {notes}")
        return (str(store.clip_path(clip)), gr.update(value=current.text, interactive=True), status,
                suggestion.text if suggestion else "", gr.update(visible=not current.readable, value=False))

    def save_caption(self, clip: str | None, text: str, replace_unreadable: bool, *rules):
        """Save the editor's text as the clip's caption (with history): the status line and the clip table."""
        if not clip:
            return gr.update(), gr.update()
        try:
            with self.save_lock:
                changed = self.store.save(clip, text or "", source="human",
                                          replace_unreadable=bool(replace_unreadable))
        except CaptionError as err:
            return f"**Not saved:** {html.escape(str(err))}", gr.update()
        stamp = datetime.now().strftime("%H:%M:%S")
        notes = self.caption_notes(text or "", self.rules_from_ui(*rules))
        if not changed:
            return f"Saved (no changes). {notes}", gr.update()
        return f"Saved at {stamp}. {notes}", self.table_rows()

    def step(self, clip: str | None, text: str, replace_unreadable: bool, offset: int, *rules):
        """Save the caption being edited, then move `offset` clips along the list."""
        if clip:
            self.save_caption(clip, text, replace_unreadable, *rules)
        names = self.store.list_clips()
        if not names:
            return gr.update(choices=[], value=None), self.table_rows()
        index = names.index(clip) + offset if clip in names else 0
        return gr.update(choices=names, value=names[max(0, min(index, len(names) - 1))]), self.table_rows()

    def previous_clip(self, clip: str | None, text: str, replace_unreadable: bool, *rules):
        return self.step(clip, text, replace_unreadable, -1, *rules)

    def next_clip(self, clip: str | None, text: str, replace_unreadable: bool, *rules):
        return self.step(clip, text, replace_unreadable, 1, *rules)

    def suggest_one(self, clip: str | None, kind: str, frames, prompt, batch_size, vlm_source: str, instruction: str,
                    video_fps, memory_mode: str, request: gr.Request = None,
                    progress=gr.Progress()):
        if not clip:
            raise gr.Error("Select a clip first.")
        video = self.video_settings(kind, vlm_source, instruction, video_fps, memory_mode)
        report = self.run_suggest([clip], True, frames, prompt, batch_size, video, progress, session_of(request))
        if clip in report.failed:
            raise gr.Error(f"{clip}: {report.failed[clip]}")
        return (report.suggested.get(clip, ""), f"Suggestion for {clip} ready: accept, append or ignore it.",
                self.table_rows())

    def suggest_missing(self, clip: str | None, kind: str, frames, prompt, batch_size, vlm_source: str,
                        instruction: str, video_fps, memory_mode: str, request: gr.Request = None,
                        progress=gr.Progress()):
        video = self.video_settings(kind, vlm_source, instruction, video_fps, memory_mode)
        report = self.run_suggest(None, False, frames, prompt, batch_size, video, progress, session_of(request))
        lines = [f"{len(report.suggested)} suggestion(s) made, {len(report.skipped)} clip(s) already captioned"
                 + (" — stopped early." if report.stopped else ".")]
        lines += [f"- skipped **{html.escape(c)}**: {html.escape(why)}" for c, why in report.failed.items()]
        pending = self.store.suggestion(clip) if clip else None
        return pending.text if pending else "", "\n".join(lines), self.table_rows()

    def stop_suggest(self, request: gr.Request = None):
        """Stop this page's captioning (another page's runs on: stop that one in the job list)."""
        if not self.tasks.stop_owned(session_of(request), ("captioning",)):
            return "This page is not captioning."
        return "Stopping after the current batch..."

    def unload(self):
        with self.tasks.hold_gpu_idle() as idle:  # never pull the model from under a running suggestion
            if not idle:
                raise gr.Error("A GPU task is running (captioning or generation); stop it first, then unload.")
            return ("Captioner unloaded; its memory is free." if self.captioner.unload()
                    else "The captioner is not loaded.")

    def resolve(self, action: str, clip: str | None, *rules):
        """Accept, append or ignore the clip's pending suggestion: caption, suggestion, status, table."""
        if not clip:
            raise gr.Error("Select a clip first.")
        try:
            with self.save_lock:
                text = self.store.resolve_suggestion(clip, action)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        notes = self.caption_notes(text, self.rules_from_ui(*rules))
        done = {"accept": "accepted", "append": "appended", "ignore": "ignored"}[action]
        return text, "", f"Suggestion {done}; saved. {notes}", self.table_rows()

    def accept(self, clip: str | None, *rules):
        return self.resolve("accept", clip, *rules)

    def append(self, clip: str | None, *rules):
        return self.resolve("append", clip, *rules)

    def ignore(self, clip: str | None, *rules):
        return self.resolve("ignore", clip, *rules)

    def accept_where_empty(self):
        with self.save_lock:
            accepted = self.store.accept_suggestions_where_empty()
        return f"{len(accepted)} suggestion(s) accepted into empty captions.", self.table_rows()

    def undo(self, clip: str | None, *rules):
        if not clip:
            raise gr.Error("Select a clip first.")
        try:
            with self.save_lock:
                restored = self.store.undo(clip)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        if restored is None:
            return gr.update(), "Nothing to undo.", gr.update()
        return restored, f"Undone. {self.caption_notes(restored, self.rules_from_ui(*rules))}", self.table_rows()

    def style_preview(self, scope: str, clip: str | None, *rules):
        style = self.rules_from_ui(*rules)
        clips = [clip] if scope == "This clip" and clip else None
        captions, unreadable = self.store.readable_captions(clips)
        changes = preview_style({c: t for c, t in captions.items() if t}, style)
        note = f"<p>Left alone (not UTF-8): {html.escape(', '.join(unreadable))}</p>" if unreadable else ""
        return changes_html(changes, "would change") + note + banned_html(captions, changes, style)

    def style_apply(self, scope: str, clip: str | None, *rules):
        style = self.rules_from_ui(*rules)
        save_style_rules(style, self.rules_file)
        with self.save_lock:
            changes, _ = apply_style_to_clips(self.store, style,
                                              clips=[clip] if scope == "This clip" and clip else None)
        current = self.store.read(clip).text if clip else ""
        return changes_html(changes, "changed (undo reverts each)"), current, self.table_rows()

    def save_rules(self, *rules):
        save_style_rules(self.rules_from_ui(*rules), self.rules_file)
        return f"Rules saved to `{self.rules_file}`."

    def find_replace(self, find: str, replace: str, regex: bool, case_sensitive: bool, whole_word: bool, apply: bool,
                     clip: str | None):
        try:
            with self.save_lock:
                changes = find_replace_in_clips(self.store, find or "", replace or "", regex=regex,
                                                case_sensitive=case_sensitive, whole_word=whole_word,
                                                dry_run=not apply)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        current = self.store.read(clip).text if clip and apply else gr.update()
        return changes_html(changes, "changed" if apply else "would change"), current, self.table_rows()

    def find_preview(self, find: str, replace: str, regex: bool, case_sensitive: bool, whole_word: bool,
                     clip: str | None):
        return self.find_replace(find, replace, regex, case_sensitive, whole_word, False, clip)

    def replace_all(self, find: str, replace: str, regex: bool, case_sensitive: bool, whole_word: bool,
                    clip: str | None):
        return self.find_replace(find, replace, regex, case_sensitive, whole_word, True, clip)

    def export(self, fmt: str):
        out = self.ctx.project.captions_export_file(fmt)
        count, unreadable = export_captions(self.store, out)
        note = f" Left out (not UTF-8): {', '.join(unreadable)}." if unreadable else ""
        return str(out), f"{count} caption(s) exported to `{out}`.{note}"

    def import_file_into_clips(self, path: str | None, keep_existing: bool, clip: str | None):
        if not path:
            raise gr.Error("Choose a .jsonl or .csv file to import.")
        try:
            with self.save_lock:
                report = import_captions(self.store, Path(path), keep_existing=keep_existing)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        notes = []
        if report.kept_existing:
            notes.append(f"<p>Kept existing captions: {html.escape(', '.join(report.kept_existing))}</p>")
        if report.unknown_clips:
            notes.append(f"<p>No such clip: {html.escape(', '.join(report.unknown_clips))}</p>")
        current = self.store.read(clip).text if clip else gr.update()
        return changes_html(report.changes, "imported") + "".join(notes), current, self.table_rows()


def select_row(evt: gr.SelectData):
    """Clicking a row of the clip table selects that clip."""
    return gr.update(value=evt.row_value[0]) if evt.row_value else gr.update()


def build(ctx: AppContext) -> None:
    CaptionsTab(ctx).build()
