"""Captions tab: the clip playing beside its caption, BLIP-2 suggestions, pure-style tools, find & replace, export.

Thin UI over engine.captions: every edit is saved to the caption file (with history) as soon as the editor loses
focus, so a page reload or a restart shows exactly what is on disk.
"""

from __future__ import annotations

import html
import threading
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

import gradio as gr
from gradio.context import Context

from engine.captions.captioners import (
    Blip2Captioner,
    CaptionerOutOfMemory,
    CaptionerSettings,
    default_device,
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
from engine.core.models import ModelFolderError
from engine.jobs import GpuBusyError
from studio.context import AppContext

TITLE = "Captions"
STYLE_RULES_FILE = "caption_style.toml"  # in the project folder
TABLE_HEADERS = ["Clip", "Status", "Tokens", "Caption"]


class CaptionerHolder:
    """The captioner, loaded on first use and kept until Unload (never reloaded per click)."""

    def __init__(self, source: str):
        self.source = source
        self.captioner: Blip2Captioner | None = None
        self.stop_requested = threading.Event()

    def get(self, batch_size: int) -> Blip2Captioner:
        if self.captioner is None:
            self.captioner = Blip2Captioner(self.source, device=default_device(), batch_size=batch_size)
        self.captioner.batch_size = batch_size
        return self.captioner

    def unload(self) -> bool:
        if self.captioner is None or not self.captioner.loaded:
            return False
        self.captioner.unload()
        return True


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


def changes_html(changes: list[CaptionChange], verb: str) -> str:
    if not changes:
        return f"<p>No caption {verb}.</p>"
    rows = "".join(f"<tr><td>{html.escape(c.clip)}</td><td>{_diff_html(c)}</td></tr>" for c in changes)
    return (f"<p>{len(changes)} caption(s) {verb}:</p><table class='caption-diff'><tr><th>Clip</th><th>Change</th>"
            f"</tr>{rows}</table>")


def build(ctx: AppContext) -> None:
    store = CaptionStore(ctx.project.clips_dir)
    captioner = CaptionerHolder(ctx.models.captioner)
    tokens = TokenCounterHolder(ctx.models.wan)
    save_lock = threading.Lock()  # blur and navigation may both save the same caption at once
    rules_file = ctx.project.root / STYLE_RULES_FILE
    base_rules = load_style_rules(rules_file) if rules_file.exists() else StyleRules()

    # ------------------------------------------------------------------------------------------ helpers
    def table_rows() -> list[list[str]]:
        counter = tokens.get()
        rows = []
        for info in store.overview():
            status = info.status + (" (suggestion waiting)" if info.suggestion and info.status == "edited" else "")
            count = counter.count(info.text).tokens if counter and info.text else ""
            preview = info.text if len(info.text) <= 70 else info.text[:67] + "..."
            rows.append([info.clip, status, count, preview])
        return rows

    def caption_notes(text: str, rules: StyleRules) -> str:
        notes = []
        counter = tokens.get()
        if counter is not None:
            count = counter.count(text)
            notes.append(f"**Warning:** {count.warning}" if count.warning else f"{count.tokens} / {count.limit} tokens")
        elif tokens.problem:
            notes.append(tokens.problem)
        banned = find_banned_words(text, rules.banned_words)
        if banned:
            notes.append("**Banned words:** " + ", ".join(banned))
        return " · ".join(notes)

    def rules_from_ui(trigger: str, replacements: str, banned: str, normalize: bool) -> StyleRules:
        words = [w.strip() for w in (banned or "").replace("\n", ",").split(",") if w.strip()]
        try:
            table = parse_replacement_lines(replacements or "")
            rules = StyleRules(trigger=(trigger or "").strip(), replacements=table, banned_words=words,
                               normalize=bool(normalize), category_order=base_rules.category_order,
                               category_words=base_rules.category_words, token_limit=base_rules.token_limit)
            rules.validate()
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        return rules

    def load_clip(clip: str | None, trigger, replacements, banned, normalize):
        """Everything the editor shows for one clip, read from disk."""
        if not clip or clip not in store.list_clips():
            message = "No clip selected." if not clip else f"{clip} is no longer in {store.clips_dir}."
            return None, gr.update(value="", interactive=False), message, "", gr.update(visible=False)
        current = store.read(clip)
        suggestion = store.suggestion(clip)
        notes = caption_notes(current.text, rules_from_ui(trigger, replacements, banned, normalize))
        status = (f"**{html.escape(current.message)}**" if not current.readable
                  else f"Loaded {html.escape(clip)}. {notes}")
        return (str(store.clip_path(clip)), gr.update(value=current.text, interactive=True), status,
                suggestion.text if suggestion else "", gr.update(visible=not current.readable, value=False))

    def save_caption(clip: str | None, text: str, replace_unreadable: bool, *rule_inputs):
        if not clip:
            return gr.update(), gr.update()
        try:
            with save_lock:
                changed = store.save(clip, text or "", source="human", replace_unreadable=bool(replace_unreadable))
        except CaptionError as err:
            return f"**Not saved:** {html.escape(str(err))}", gr.update()
        stamp = datetime.now().strftime("%H:%M:%S")
        notes = caption_notes(text or "", rules_from_ui(*rule_inputs))
        if not changed:
            return f"Saved (no changes). {notes}", gr.update()
        return f"Saved at {stamp}. {notes}", table_rows()

    def step(clip: str | None, text: str, replace_unreadable: bool, offset: int, *rule_inputs):
        """Save the caption being edited, then move `offset` clips along the list."""
        if clip:
            save_caption(clip, text, replace_unreadable, *rule_inputs)
        names = store.list_clips()
        if not names:
            return gr.update(choices=[], value=None), table_rows()
        index = names.index(clip) + offset if clip in names else 0
        return gr.update(choices=names, value=names[max(0, min(index, len(names) - 1))]), table_rows()

    @contextmanager
    def gpu(description: str) -> Iterator[None]:
        """The studio's GPU for this task: the in-process lock, and the job runner's slot (training holds it)."""
        if not ctx.gpu_lock.acquire(blocking=False):
            raise gr.Error("Another GPU task of this studio is running (captioning or generation); try again when "
                           "it has finished.")
        try:
            with ExitStack() as stack:
                if ctx.jobs is not None:
                    try:
                        stack.enter_context(ctx.jobs.gpu_slot(description))
                    except GpuBusyError as err:
                        raise gr.Error(str(err)) from err
                yield
        finally:
            ctx.gpu_lock.release()

    def run_suggest(clips: list[str] | None, overwrite: bool, frames: int, prompt: str, batch_size: int,
                    progress: gr.Progress):
        settings = CaptionerSettings(frames_per_clip=int(frames), prompt=(prompt or "").strip(),
                                     batch_size=int(batch_size))
        try:
            settings.validate()
            with gpu("captioning clips"):
                model = captioner.get(settings.batch_size)
                progress(0.0, desc=f"loading {model.name}" if not model.loaded else "captioning")
                captioner.stop_requested.clear()
                return suggest_captions(store, model, clips=clips, overwrite=overwrite, settings=settings,
                                        on_progress=lambda f, m: progress(f, desc=m),
                                        should_stop=captioner.stop_requested.is_set)
        except (CaptionError, ModelFolderError, CaptionerOutOfMemory) as err:
            raise gr.Error(str(err)) from err

    def suggest_one(clip: str | None, frames, prompt, batch_size, progress=gr.Progress()):
        if not clip:
            raise gr.Error("Select a clip first.")
        report = run_suggest([clip], True, frames, prompt, batch_size, progress)
        if clip in report.failed:
            raise gr.Error(f"{clip}: {report.failed[clip]}")
        return report.suggested.get(clip, ""), f"Suggestion for {clip} ready: accept, append or ignore it.", \
            table_rows()

    def suggest_missing(clip: str | None, frames, prompt, batch_size, progress=gr.Progress()):
        report = run_suggest(None, False, frames, prompt, batch_size, progress)
        lines = [f"{len(report.suggested)} suggestion(s) made, {len(report.skipped)} clip(s) already captioned"
                 + (" — stopped early." if report.stopped else ".")]
        lines += [f"- skipped **{html.escape(c)}**: {html.escape(why)}" for c, why in report.failed.items()]
        pending = store.suggestion(clip) if clip else None
        return pending.text if pending else "", "\n".join(lines), table_rows()

    def stop_suggest():
        captioner.stop_requested.set()
        return "Stopping after the current batch..."

    def unload():
        if not ctx.gpu_lock.acquire(blocking=False):  # never pull the model from under a running suggestion
            raise gr.Error("A GPU task is running (captioning or generation); stop it first, then unload.")
        try:
            return "Captioner unloaded; its memory is free." if captioner.unload() else "The captioner is not loaded."
        finally:
            ctx.gpu_lock.release()

    def resolve(action: str):
        def handler(clip: str | None, *rule_inputs):
            if not clip:
                raise gr.Error("Select a clip first.")
            try:
                with save_lock:
                    text = store.resolve_suggestion(clip, action)
            except CaptionError as err:
                raise gr.Error(str(err)) from err
            notes = caption_notes(text, rules_from_ui(*rule_inputs))
            done = {"accept": "accepted", "append": "appended", "ignore": "ignored"}[action]
            return text, "", f"Suggestion {done}; saved. {notes}", table_rows()
        return handler

    def accept_where_empty():
        with save_lock:
            accepted = store.accept_suggestions_where_empty()
        return f"{len(accepted)} suggestion(s) accepted into empty captions.", table_rows()

    def undo(clip: str | None, *rule_inputs):
        if not clip:
            raise gr.Error("Select a clip first.")
        try:
            with save_lock:
                restored = store.undo(clip)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        if restored is None:
            return gr.update(), "Nothing to undo.", gr.update()
        return restored, f"Undone. {caption_notes(restored, rules_from_ui(*rule_inputs))}", table_rows()

    def style_preview(scope: str, clip: str | None, *rule_inputs):
        rules = rules_from_ui(*rule_inputs)
        clips = [clip] if scope == "This clip" and clip else None
        captions, unreadable = store.readable_captions(clips)
        changes = preview_style({c: t for c, t in captions.items() if t}, rules)
        note = f"<p>Left alone (not UTF-8): {html.escape(', '.join(unreadable))}</p>" if unreadable else ""
        return changes_html(changes, "would change") + note

    def style_apply(scope: str, clip: str | None, *rule_inputs):
        rules = rules_from_ui(*rule_inputs)
        save_style_rules(rules, rules_file)
        with save_lock:
            changes, _ = apply_style_to_clips(store, rules, clips=[clip] if scope == "This clip" and clip else None)
        current = store.read(clip).text if clip else ""
        return changes_html(changes, "changed (undo reverts each)"), current, table_rows()

    def save_rules(*rule_inputs):
        save_style_rules(rules_from_ui(*rule_inputs), rules_file)
        return f"Rules saved to `{rules_file}`."

    def find_replace(find: str, replace: str, regex: bool, case_sensitive: bool, whole_word: bool, apply: bool,
                     clip: str | None):
        try:
            with save_lock:
                changes = find_replace_in_clips(store, find or "", replace or "", regex=regex,
                                                case_sensitive=case_sensitive, whole_word=whole_word,
                                                dry_run=not apply)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        current = store.read(clip).text if clip and apply else gr.update()
        return changes_html(changes, "changed" if apply else "would change"), current, table_rows()

    def export(fmt: str):
        out = ctx.project.root / f"captions{fmt}"
        count, unreadable = export_captions(store, out)
        note = f" Left out (not UTF-8): {', '.join(unreadable)}." if unreadable else ""
        return str(out), f"{count} caption(s) exported to `{out}`.{note}"

    def do_import(path: str | None, keep_existing: bool, clip: str | None):
        if not path:
            raise gr.Error("Choose a .jsonl or .csv file to import.")
        try:
            with save_lock:
                report = import_captions(store, Path(path), keep_existing=keep_existing)
        except CaptionError as err:
            raise gr.Error(str(err)) from err
        notes = []
        if report.kept_existing:
            notes.append(f"<p>Kept existing captions: {html.escape(', '.join(report.kept_existing))}</p>")
        if report.unknown_clips:
            notes.append(f"<p>No such clip: {html.escape(', '.join(report.unknown_clips))}</p>")
        current = store.read(clip).text if clip else gr.update()
        return changes_html(report.changes, "imported") + "".join(notes), current, table_rows()

    # ------------------------------------------------------------------------------------------ layout
    names = store.list_clips()
    gr.Markdown(f"Captions are `name.txt` beside each clip in `{store.clips_dir}`; every save is kept in history.")
    with gr.Row():
        with gr.Column(scale=2):
            table = gr.Dataframe(value=table_rows(), headers=TABLE_HEADERS, interactive=False, label="Clips",
                                 wrap=True, max_height=420, elem_id="caption-clip-table")
        with gr.Column(scale=3):
            with gr.Row():
                previous_button = gr.Button("◀ Previous", scale=0)
                clip_choice = gr.Dropdown(names, value=names[0] if names else None, label="Clip", interactive=True,
                                          scale=3)
                next_button = gr.Button("Next ▶", scale=0)
            with gr.Row():
                video = gr.Video(label="Clip video", interactive=False, autoplay=True, loop=True, height=320)
                with gr.Column():
                    caption = gr.Textbox(label="Caption", lines=6, max_lines=12,
                                         placeholder="comma-separated phrases: subject, action, scene, camera, style")
                    replace_unreadable = gr.Checkbox(False, visible=False,
                                                     label="Replace the non-UTF-8 caption file when saving "
                                                           "(its original bytes are kept)")
                    save_status = gr.Markdown(elem_id="caption-save-status")
                    with gr.Row():
                        save_button = gr.Button("Save")
                        undo_button = gr.Button("Undo")
            with gr.Group():
                suggestion = gr.Textbox(label="Suggestion", interactive=False, lines=2)
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
                gr.Markdown(f"Model: `{ctx.models.captioner}` on {default_device().upper()}")
                frames = gr.Slider(1, 8, value=3, step=1, label="Frames per clip (first, middle, last for 3)")
                prompt = gr.Textbox(label="Prompt prefix (optional)", placeholder="e.g. a video of")
                batch_size = gr.Slider(1, 32, value=8, step=1, label="Batch size (frames per forward pass)")
            suggest_status = gr.Markdown(elem_id="caption-suggest-status")

    with gr.Accordion("Pure-style tools", open=False):
        with gr.Row():
            trigger = gr.Textbox(base_rules.trigger, label="Trigger word or prefix (put first)")
            banned = gr.Textbox(", ".join(base_rules.banned_words), label="Banned words (comma-separated)")
            normalize = gr.Checkbox(base_rules.normalize, label="Normalise: trim, dedupe, order phrases")
        replacements = gr.Textbox(
            format_replacement_lines(base_rules.replacements), lines=4, max_lines=20,
            label="Replacement table", info="One 'Name = generic description' per line; whole words, any case.",
            placeholder="Goku = a warrior with spiky black hair\nSon Goku = a warrior with spiky black hair",
        )
        with gr.Row():
            style_scope = gr.Radio(["This clip", "All clips"], value="All clips", label="Apply to")
            preview_button = gr.Button("Preview")
            apply_button = gr.Button("Apply", variant="primary")
            save_rules_button = gr.Button("Save rules")
        style_result = gr.HTML()

    with gr.Accordion("Find and replace", open=False):
        with gr.Row():
            find_text = gr.Textbox(label="Find")
            replace_text = gr.Textbox(label="Replace with")
        with gr.Row():
            use_regex = gr.Checkbox(False, label="Regular expression")
            case_sensitive = gr.Checkbox(False, label="Match case")
            whole_word = gr.Checkbox(False, label="Whole words")
            find_preview_button = gr.Button("Preview")
            replace_all_button = gr.Button("Replace all")
        find_result = gr.HTML()

    with gr.Accordion("Export and import", open=False):
        with gr.Row():
            export_format = gr.Radio([".jsonl", ".csv"], value=".jsonl", label="Format")
            export_button = gr.Button("Export all captions")
            export_file = gr.File(label="Exported file", interactive=False)
        with gr.Row():
            import_file = gr.File(label="File to import (.jsonl or .csv with clip, caption)",
                                  file_types=[".jsonl", ".csv"], type="filepath")
            keep_existing = gr.Checkbox(False, label="Only fill clips without a caption")
            import_button = gr.Button("Import")
        transfer_result = gr.HTML()

    # ------------------------------------------------------------------------------------------ events
    rule_inputs = [trigger, replacements, banned, normalize]
    clip_view = [video, caption, save_status, suggestion, replace_unreadable]

    clip_choice.change(load_clip, [clip_choice, *rule_inputs], clip_view)
    caption.blur(save_caption, [clip_choice, caption, replace_unreadable, *rule_inputs], [save_status, table])
    save_button.click(save_caption, [clip_choice, caption, replace_unreadable, *rule_inputs], [save_status, table])
    previous_button.click(lambda c, t, r, *rules: step(c, t, r, -1, *rules),
                          [clip_choice, caption, replace_unreadable, *rule_inputs], [clip_choice, table])
    next_button.click(lambda c, t, r, *rules: step(c, t, r, 1, *rules),
                      [clip_choice, caption, replace_unreadable, *rule_inputs], [clip_choice, table])
    table.select(_select_row, None, clip_choice)
    undo_button.click(undo, [clip_choice, *rule_inputs], [caption, save_status, table])

    suggest_button.click(suggest_one, [clip_choice, frames, prompt, batch_size], [suggestion, suggest_status, table])
    suggest_all_button.click(suggest_missing, [clip_choice, frames, prompt, batch_size],
                             [suggestion, suggest_status, table])
    stop_button.click(stop_suggest, None, suggest_status, queue=False)
    unload_button.click(unload, None, suggest_status)
    accept_empty_button.click(accept_where_empty, None, [suggest_status, table]).then(
        load_clip, [clip_choice, *rule_inputs], clip_view)
    for button, action in ((accept_button, "accept"), (append_button, "append"), (ignore_button, "ignore")):
        button.click(resolve(action), [clip_choice, *rule_inputs], [caption, suggestion, save_status, table])

    preview_button.click(style_preview, [style_scope, clip_choice, *rule_inputs], style_result)
    apply_button.click(style_apply, [style_scope, clip_choice, *rule_inputs], [style_result, caption, table])
    save_rules_button.click(save_rules, rule_inputs, style_result)

    find_inputs = [find_text, replace_text, use_regex, case_sensitive, whole_word]
    find_preview_button.click(lambda *a: find_replace(*a[:5], False, a[5]), [*find_inputs, clip_choice],
                              [find_result, caption, table])
    replace_all_button.click(lambda *a: find_replace(*a[:5], True, a[5]), [*find_inputs, clip_choice],
                             [find_result, caption, table])

    export_button.click(export, export_format, [export_file, transfer_result])
    import_button.click(do_import, [import_file, keep_existing, clip_choice], [transfer_result, caption, table])

    # A page load re-reads clips and captions from disk: new clips from the Clips tab, edits saved before a reload.
    def refresh(clip: str | None, *rule_inputs):
        names = store.list_clips()
        clip = clip if clip in names else (names[0] if names else None)
        return (gr.update(choices=names, value=clip), table_rows(), *load_clip(clip, *rule_inputs))

    Context.root_block.load(refresh, [clip_choice, *rule_inputs], [clip_choice, table, *clip_view])


def _select_row(evt: gr.SelectData):
    """Clicking a row of the clip table selects that clip."""
    return gr.update(value=evt.row_value[0]) if evt.row_value else gr.update()
