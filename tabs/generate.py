"""Generate tab: image-to-video with the project's LoRAs at adjustable strengths, sweeps in a synchronised grid,
an outputs gallery whose settings can be sent back to the form, and ComfyUI workflow export.

Thin UI over engine.generate. The pipeline stays loaded between generations (Unload frees it); changing a LoRA or a
strength never reloads the base model. Every video lands in the project's outputs/ with a JSON sidecar.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from urllib.parse import quote

import gradio as gr
from gradio.context import Context

from engine.core.families import Wan22I2V, family_of
from engine.core.files import atomic_path, file_sha256, read_text
from engine.core.layout import RunLayout, saved_lora_of
from engine.core.models import ModelFolderError
from engine.core.motion import MOTION_UNIT, MOTION_UNIT_SHORT
from engine.core.video import frame_at, probe_video
from engine.generate.comfyui import export_comfyui_workflow
from engine.generate.draft import DraftSettings, full_request
from engine.generate.lora_files import LoraFileError, LoraMismatchError
from engine.generate.pipeline import PipelineCache, PipelineOptions, memory_advice
from engine.generate.render import (
    changed_inputs,
    motion_readout,
    new_output_path,
    options_from_sidecar,
    read_sidecar,
    render_video,
)
from engine.generate.request import (
    SCHEDULERS,
    STRENGTH_MAX,
    STRENGTH_MIN,
    STRENGTH_RULE,
    WAN_NEGATIVE_PROMPT,
    WAN_NEGATIVE_PROMPT_GLOSS,
    GenerationCancelled,
    GenerationError,
    GenerationRequest,
    expand_lora_choice,
    check_strength,
    lora_file,
    lora_rows_of,
    open_image,
    output_size,
)
from engine.generate.sweep import DEFAULT_SWEEP_STRENGTHS, lora_label, render_sweep
from engine.jobs import GpuBusyError
from engine.tasks import TaskStopped
from studio.context import AppContext
from studio.progress import report_to, session_of, waiting_note

TITLE = "Generate"
MAX_LORAS = 3
NO_LORA = ("(none)", "")
PEOPLE_ERRORS = (GenerationError, LoraFileError, LoraMismatchError, ModelFolderError, GpuBusyError, TaskStopped,
                 OSError)
DRAFT_NOTE = (
    "**A draft previews motion, not final quality.** Drafts render through an accelerator (step-distillation) LoRA "
    "you have, such as lightx2v's Wan 2.1 I2V 480p step-distill LoRA (nothing is downloaded): 4 steps without "
    "guidance, about 20x fewer transformer passes. Choose a draft under Outputs and press **Render in full** for the "
    "full-quality video with the same seed and LoRA strengths.")
SETTING_NAMES = {"cpu_offload": "CPU offload (under Memory)", "vae_tiling": "VAE tiling (under Memory)",
                 "frames": "frames", "size": "size"}


def lora_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """The project's LoRAs: every run's epochs (newest run first; a Wan 2.2 run's epoch is its pair of expert
    files), then uploaded files."""
    choices = [NO_LORA]
    for run_dir in reversed(ctx.project.list_runs()):
        run = RunLayout(run_dir)
        choices += [(f"{run.name} / epoch{epoch}" + (" (high+low pair)" if path.is_dir() else ""), str(path))
                    for epoch, path in run.loras()]
    uploads = ctx.project.loras_dir
    if uploads.is_dir():
        choices += [(f"uploaded / {p.name}", str(p)) for p in sorted(uploads.glob("*.safetensors"))]
    return choices


def run_epochs(lora_path: str | None) -> list[tuple[str, str]]:
    """The epochs of the run a LoRA belongs to (runs/<run>/epochN/ or stepS/adapter_model.safetensors, or a Wan 2.2
    run's epochN pair folder), for epoch sweeps; [] for a LoRA that is not a run's."""
    if not lora_path:
        return []
    path = Path(lora_path)
    saved = saved_lora_of(path)
    run = saved[0] if saved else RunLayout(path.parent) if path.is_dir() and path.name.startswith("epoch") else None
    return [(f"epoch{epoch}", str(p)) for epoch, p in run.loras()] if run else []


def parse_strengths(text: str) -> list[float]:
    try:
        values = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError as err:
        raise GenerationError(f"Sweep strengths must be numbers separated by commas, not {text!r}.") from err
    if not values:
        raise GenerationError("Give at least one sweep strength, e.g. 0, 0.5, 1.0, 1.5.")
    return [check_strength(v, "Sweep strength") for v in values]


def _lora_name(entry: dict) -> str:
    """A sidecar LoRA entry's short name, with its expert unless the name says it (a pair's file does)."""
    label, expert = lora_label(entry["path"]), entry.get("expert")
    return f"{label} ({expert})" if expert and expert not in label else label


def file_url(path: Path) -> str:
    """A URL Gradio serves (the project folder is in launch's allowed_paths)."""
    return "/gradio_api/file=" + quote(str(path))


def grid_html(videos: list[Path], labels: list[str], motion: list[float]) -> str:
    """Sweep results as a grid of <video> elements (muted, looping) with their label and motion readout."""
    cells = "".join(
        f'<figure class="generate-cell" style="margin:0">'
        f'<video src="{html.escape(file_url(v))}" autoplay muted loop playsinline preload="auto" '
        f'style="width:100%;display:block"></video>'
        f'<figcaption><b>{html.escape(label)}</b><br>motion {m:.2f} {MOTION_UNIT_SHORT}</figcaption></figure>'
        for v, label, m in zip(videos, labels, motion))
    columns = min(4, max(1, len(videos)))
    return (f'<div id="generate-grid" style="display:grid;grid-template-columns:repeat({columns},1fr);gap:8px">'
            f"{cells}</div>")


PLAY_TOGETHER_JS = """() => {
  const videos = document.querySelectorAll('#generate-grid video');
  videos.forEach(v => { v.pause(); v.currentTime = 0; });
  videos.forEach(v => v.play());
}"""


class GenerateTab:
    def __init__(self, ctx: AppContext):
        self.ctx = ctx
        self.cache = PipelineCache()
        self.tasks = ctx.jobs.tasks

    # ------------------------------------------------------------ helpers over the engine

    @property
    def model(self) -> str:
        return self.ctx.wan_model()

    @property
    def two_experts(self) -> bool:
        return len(family_of(self.model).experts) > 1

    def keep_image(self, image_path: str | None) -> str:
        """Copy the start image into outputs/inputs/ (named by content) so sidecars point at a file that stays."""
        if not image_path:
            raise GenerationError("No start image: upload one, or pick a frame from a clip.")
        source = Path(image_path)
        digest = file_sha256(source)[:16]
        kept = self.ctx.project.output_inputs_dir / f"{digest}{source.suffix.lower() or '.png'}"
        if not kept.exists():
            with atomic_path(kept) as tmp:
                shutil.copyfile(source, tmp)
        return str(kept)

    def read_form(self, data: dict) -> tuple[GenerationRequest, PipelineOptions]:
        """The form's values (passed by component, not by position) as a request and pipeline options."""
        loras = [entry for path, strength, low in self.lora_rows if data[path]
                 for entry in expand_lora_choice(data[path], 1.0 if data[strength] is None else data[strength],
                                                 1.0 if data[low] is None else data[low], self.two_experts)]
        prompt = (data[self.prompt] or "").strip()
        if not prompt:
            raise GenerationError("Write a prompt first: the motion and style you want, with your LoRA's trigger "
                                  "word if it has one (Wan follows the text as much as the image).")
        seed = None if data[self.seed_mode] == "random" else int(data[self.seed] or 0)
        request = GenerationRequest(
            image=self.keep_image(data[self.image]), prompt=prompt,
            negative_prompt=data[self.negative_prompt] or "", seed=seed, steps=int(data[self.steps]),
            guidance=float(data[self.guidance]), frames=int(data[self.frames]),
            height=int(data[self.height]) or None, width=int(data[self.width]) or None, fps=float(data[self.fps]),
            pixel_budget=self.pixel_budget(), loras=loras, scheduler=data[self.scheduler],
            flow_shift=float(data[self.flow_shift]) or None)
        options = PipelineOptions(model=self.model, cpu_offload=bool(data[self.cpu_offload]),
                                  vae_tiling=bool(data[self.vae_tiling]), fast=bool(data[self.fast]))
        return request, options

    def read_draft(self, data: dict) -> DraftSettings | None:
        """Draft settings when Draft is on; the accelerator file is checked and remembered in the project."""
        if not data[self.draft]:
            return None
        path = (data[self.draft_lora] or "").strip()
        if not path:
            raise GenerationError("Draft is on but no accelerator LoRA file is given: enter its path under Draft.")
        lora_file(path)
        settings = self.ctx.project.settings()
        if settings.draft_lora != path:
            settings.draft_lora = path
            self.ctx.project.save_settings(settings)
        return DraftSettings(lora=path, strength=float(data[self.draft_strength]), steps=int(data[self.draft_steps]),
                             flow_shift=float(data[self.draft_shift]))

    def outputs(self) -> list[tuple[str, str]]:
        """Generated videos with sidecars, newest first (single videos and sweep comparisons)."""
        videos = [p for p in self.ctx.project.outputs_dir.glob("*.mp4") if p.with_suffix(".json").exists()]
        return [(p.name, str(p)) for p in sorted(videos, key=lambda p: p.stat().st_mtime, reverse=True)]

    # ------------------------------------------------------------ layout

    def build(self) -> None:
        with gr.Row():
            with gr.Column(scale=5):
                self.build_inputs()
            with gr.Column(scale=6):
                self.build_results()
        with gr.Accordion("Outputs", open=True):
            self.build_gallery()
        self.ctx.ui["generate.lora"] = self.lora_rows[0][0]  # the Train tab's "Open in Generate" fills this
        self.wire()

    def build_inputs(self) -> None:
        with gr.Accordion("Draft", open=True):
            gr.Markdown(DRAFT_NOTE, elem_id="generate-draft-note")
            remembered = self.ctx.project.settings().draft_lora
            with gr.Row():
                self.draft = gr.Checkbox(label="Draft", value=bool(remembered), scale=1)
                self.draft_lora = gr.Textbox(label="Accelerator LoRA file", value=remembered, scale=4,
                                             placeholder="/path/to/wan2.1_i2v_480p_step_distill_lora.safetensors")
            with gr.Row():
                self.draft_steps = gr.Number(value=4, precision=0, label="Draft steps")
                self.draft_shift = gr.Number(value=5.0, label="Draft flow shift")
                self.draft_strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Accelerator strength")
        self.image = gr.Image(label="Start image", type="filepath", sources=["upload", "clipboard"], height=260,
                              elem_id="generate-image")
        with gr.Accordion("Pick a frame from a project clip", open=False):
            with gr.Row():
                self.clip = gr.Dropdown([], label="Clip", interactive=True)
                self.clip_time = gr.Slider(0, 10, value=0, step=1 / 16, label="Time (s)")
            self.use_frame = gr.Button("Use this frame")
        self.prompt = gr.Textbox(label="Prompt", lines=2, placeholder="motion and style, comma-separated phrases")
        self.negative_prompt = gr.Textbox(label="Negative prompt", value=WAN_NEGATIVE_PROMPT, lines=2,
                                          info="Wan's default is in Chinese, as its authors wrote it; in English: "
                                               f"{WAN_NEGATIVE_PROMPT_GLOSS}.")
        with gr.Row():
            self.seed_mode = gr.Radio(["random", "fixed"], value="random", label="Seed mode")
            self.seed = gr.Number(value=42, precision=0, label="Seed", info="the seed used is shown here afterwards")
        with gr.Row():
            self.steps = gr.Slider(1, 100, value=30, step=1, label="Steps")
            self.guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
        with gr.Row():
            self.scheduler = gr.Dropdown(list(SCHEDULERS), value="unipc", label="Sampler",
                                         info="unipc: the model's own; lcm/euler: for step-distilled LoRAs")
            self.flow_shift = gr.Number(value=0, label="Flow shift (0 = the model's)")
        with gr.Row():
            self.frames = gr.Slider(5, 161, value=self.ctx.project.settings().clip_frames, step=4, label="Frames",
                                    info="4k+1; 81 = 5.06 s at 16 fps")
            self.fps = gr.Number(value=16, label="FPS", info="Wan's native rate")
        with gr.Accordion("Size", open=False):
            with gr.Row():
                self.height = gr.Number(value=0, precision=0, label="Height (0 = from image)")
                self.width = gr.Number(value=0, precision=0, label="Width (0 = from image)")
        self.size_note = gr.Markdown(self.on_size_inputs(None, 0, 0, 0, 16), elem_id="generate-size")
        gr.Markdown(f"**LoRAs**: {STRENGTH_RULE}; stacked LoRAs each keep their own strength; with Wan 2.2 each "
                    "expert's LoRA has its own strength: a pair's high-noise file at the first, its low-noise file at "
                    "the second.")
        self.lora_rows: list[tuple[gr.Dropdown, gr.Number, gr.Number]] = []
        two = self.two_experts
        for i in range(MAX_LORAS):
            with gr.Row(visible=True):
                choice = gr.Dropdown([NO_LORA], value="", label=f"LoRA {i + 1}", allow_custom_value=True,
                                     interactive=True, scale=3)
                # number boxes, not sliders: a slider clamps a typed 5 to 2 without a word; here the one rule
                # (check_strength) answers every out-of-range value the same way, as the sweep box does
                strength = gr.Number(value=1.0, step=0.05, scale=2, info=f"{STRENGTH_MIN:g} to {STRENGTH_MAX:g}",
                                     label=f"High-noise strength {i + 1}" if two else f"Strength {i + 1}")
                low = gr.Number(value=1.0, step=0.05, scale=2, visible=two, info=f"{STRENGTH_MIN:g} to {STRENGTH_MAX:g}",
                                label=f"Low-noise strength {i + 1}")
            self.lora_rows.append((choice, strength, low))
        self.upload = gr.UploadButton("Add a LoRA file (.safetensors: diffusion-pipe/ComfyUI, diffusers or musubi)",
                                      file_types=[".safetensors"], type="filepath", size="sm",
                                      elem_id="generate-lora-upload")
        with gr.Accordion("Memory", open=False):
            with gr.Row():
                self.cpu_offload = gr.Checkbox(label="CPU offload (24 GB cards)", value=False)
                self.vae_tiling = gr.Checkbox(label="VAE tiling", value=False)
                self.fast = gr.Checkbox(label="Fast mode (float8 matmuls + compiled blocks; GPU, reloads the model)",
                                        value=False)
            with gr.Row():
                self.unload = gr.Button("Unload model")
                self.model_status = gr.Markdown("no model loaded", elem_id="generate-model-status")
        with gr.Accordion("Sweep", open=True):
            self.sweep_strengths = gr.Textbox(label="Sweep strengths (LoRA 1)",
                                              value=", ".join(f"{s:g}" for s in DEFAULT_SWEEP_STRENGTHS))
            self.sweep_expert = gr.Radio([(e.label, e.name) for e in Wan22I2V.experts], value="high_noise",
                                         label="Sweep the strength of (Wan 2.2)", visible=two)
            self.sweep_epochs = gr.CheckboxGroup([], label="Sweep epochs (of LoRA 1's run)")
            self.sweep = gr.Button("Run sweep")

    def build_results(self) -> None:
        with gr.Row():
            self.generate = gr.Button("Generate", variant="primary")
            self.stop = gr.Button("Stop", variant="stop")
        self.status = gr.Markdown("", elem_id="generate-status")
        self.video = gr.Video(label="Result", height=360, autoplay=True, loop=True)
        self.details = gr.Markdown("", elem_id="generate-details")
        self.grid = gr.HTML("", elem_id="generate-grid-box")
        self.play_together = gr.Button("Play grid together", size="sm")
        self.comparison = gr.Video(label="Comparison video (all variants side by side)", loop=True,
                                   elem_id="generate-comparison")

    def build_gallery(self) -> None:
        with gr.Row():
            self.output_choice = gr.Dropdown([], label="Output", interactive=True, scale=4)
            self.refresh_outputs = gr.Button("Refresh", scale=1)
        with gr.Row():
            self.output_video = gr.Video(label="Output preview", height=280, loop=True)
            self.output_details = gr.Markdown("", elem_id="generate-output-details")
        with gr.Row():
            self.send_back = gr.Button("Send settings to the form")
            self.render_full = gr.Button("Render in full", variant="primary")
            self.export_comfy = gr.Button("Export ComfyUI workflow")
        self.comfy_file = gr.File(label="ComfyUI workflow (API format)", interactive=False, height=90,
                                  elem_id="generate-comfy-file")

    # ------------------------------------------------------------ handlers

    def form_inputs(self) -> set:
        return {self.image, self.prompt, self.negative_prompt, self.seed_mode, self.seed, self.steps, self.guidance,
                self.frames, self.height, self.width, self.fps, self.cpu_offload, self.vae_tiling, self.fast,
                self.scheduler, self.flow_shift, self.draft, self.draft_lora, self.draft_steps, self.draft_shift,
                self.draft_strength,
                *[c for row in self.lora_rows for c in row]}

    def on_model_family(self):
        """On page load: the strength sliders and the sweep choice of the project's model family (Wan 2.2: one
        strength per expert)."""
        two = self.two_experts
        updates = []
        for i, (_, strength, low) in enumerate(self.lora_rows):
            updates += [gr.update(label=f"High-noise strength {i + 1}" if two else f"Strength {i + 1}"),
                        gr.update(visible=two)]
        return [*updates, gr.update(visible=two)]

    def refresh(self):
        choices = lora_choices(self.ctx)
        clips = [p.name for p in self.ctx.project.list_clips()]
        return ([gr.update(choices=choices) for _ in self.lora_rows]
                + [gr.update(choices=clips, value=clips[0] if clips else None),
                   gr.update(choices=self.outputs()), self.cache.describe()])

    def reread(self, first_lora: str | None, clip: str | None):
        """LoRAs (new epochs), clips, outputs and LoRA 1's epochs as the disk has them now; choices made stay."""
        choices = lora_choices(self.ctx)
        clips = [p.name for p in self.ctx.project.list_clips()]
        return ([gr.update(choices=choices) for _ in self.lora_rows]
                + [gr.update(choices=clips, value=clip if clip in clips else (clips[0] if clips else None)),
                   gr.update(choices=self.outputs()), self.cache.describe(),
                   gr.update(choices=run_epochs(first_lora))])

    def on_generate(self, data: dict, request: gr.Request = None, progress=gr.Progress()):
        options = None
        try:
            request_, options = self.read_form(data)
            draft = self.read_draft(data)
            with self.tasks.run("generation", "generating a draft" if draft else "generating a video",
                                session_of(request), gpu=True, on_wait=waiting_note(progress)) as task:
                report = report_to(task, progress)
                pipe = self.cache.get(options, on_progress=lambda f, m: report(0.0, m))
                out = render_video(pipe, request_, new_output_path(self.ctx.project.outputs_dir,
                                                                   "draft" if draft else "gen"),
                                   on_progress=report, should_stop=task.should_stop, model=options.model,
                                   draft=draft)
        except GenerationCancelled:
            return {self.status: "Stopped: nothing was written."}
        except PEOPLE_ERRORS as err:
            return self.refused(str(err))
        except RuntimeError as err:
            return self.refused(self.runtime_message(err, options))
        sidecar = read_sidecar(out)
        return {self.video: str(out), self.details: self.describe(sidecar), self.seed: sidecar["request"]["seed"],
                self.status: f"Wrote {'draft ' if draft else ''}`{out.name}`.",
                self.output_choice: gr.update(choices=self.outputs()),
                self.model_status: self.cache.describe()}

    def on_sweep(self, data: dict, request: gr.Request = None, progress=gr.Progress()):
        options = None
        try:
            request_, options = self.read_form(data)
            strengths = parse_strengths(data[self.sweep_strengths])
            epochs = data[self.sweep_epochs] or None
            draft = self.read_draft(data)
            swept = 0
            if self.two_experts and request_.loras:  # the chosen expert's entry of LoRA 1
                expert = data[self.sweep_expert]
                swept = next((i for i, entry in enumerate(request_.loras) if entry[2:3] == (expert,)), 0)
                epochs = [str(Path(e) / Wan22I2V.lora_file_name(Wan22I2V.expert(expert))) if Path(e).is_dir() else e
                          for e in epochs or []] or None
            count = len(epochs) if epochs else len(strengths)
            with self.tasks.run("sweep", f"generating a {'draft ' if draft else ''}sweep of {count} variants",
                                session_of(request), gpu=True, on_wait=waiting_note(progress)) as task:
                report = report_to(task, progress)
                pipe = self.cache.get(options, on_progress=lambda f, m: report(0.0, m))
                result = render_sweep(pipe, request_, self.ctx.project.outputs_dir, strengths=strengths,
                                      lora_files=epochs, model=options.model, draft=draft, swept=swept,
                                      name="draft-sweep" if draft else None, on_progress=report,
                                      should_stop=task.should_stop)
        except GenerationCancelled:
            return {self.status: "Sweep stopped: the variants finished so far are in the outputs.",
                    self.output_choice: gr.update(choices=self.outputs())}
        except PEOPLE_ERRORS as err:
            return self.refused(str(err))
        except RuntimeError as err:
            return self.refused(self.runtime_message(err, options))
        seed = read_sidecar(result.videos[0])["request"]["seed"]
        readout = "\n".join(f"| {label} | {m:.3f} |" for label, m in zip(result.labels, result.motion))
        return {self.grid: grid_html(result.videos, result.labels, result.motion),
                self.comparison: str(result.comparison), self.seed: seed,
                self.details: f"Seed {seed} for every variant.\n\n| Variant | Motion ({MOTION_UNIT}) |\n|---|---|\n"
                              f"{readout}",
                self.status: f"Sweep of {len(result.videos)} variants written; comparison `{result.comparison.name}`.",
                self.output_choice: gr.update(choices=self.outputs()), self.model_status: self.cache.describe()}

    def refused(self, message: str) -> dict:
        """A person's error: said in the status line and a toast, the other outputs left as they were (raising
        gr.Error would mark every output with an error badge)."""
        gr.Warning(message)
        return {self.status: f"**Not generated:** {html.escape(message)}"}

    @staticmethod
    def runtime_message(err: RuntimeError, options: PipelineOptions | None) -> str:
        if options is not None and "out of memory" in str(err).lower():
            return memory_advice(options, SETTING_NAMES)
        return f"Generation failed: {err}"

    @staticmethod
    def describe(sidecar: dict) -> str:
        request, scheduler = sidecar["request"], sidecar.get("scheduler", {})
        loras = ", ".join(f"{_lora_name(e)} @ {e['strength']:g}" for e in sidecar.get("loras", [])) or "none"
        lines = [f"**Seed** {request['seed']} · **size** {request['width']}x{request['height']} · "
                 f"**frames** {request['frames']} · **steps** {request['steps']} · "
                 f"**guidance** {request['guidance']} · **sampler** {request.get('scheduler', 'unipc')}, "
                 f"flow shift {scheduler.get('flow_shift', scheduler.get('shift'))}",
                 f"**LoRAs** {loras}",
                 f"**Motion** {motion_readout(sidecar)} · **time** {sidecar.get('seconds', 0):.1f} s "
                 f"({sidecar.get('seconds_per_step', 0):.2f} s/step)"]
        if "draft" in sidecar:
            lines.insert(0, "**Draft**: previews motion, not final quality (Render in full for the final video)")
        lines += [f"*{note}*" for note in sidecar.get("adjustments", [])]
        return "\n\n".join(lines)

    def on_render_full(self, path: str | None, request: gr.Request = None, progress=gr.Progress()):
        """Render the chosen draft again at full quality: same image, prompt, seed and LoRA strengths."""
        if not path or "request" not in _json(path):
            raise gr.Error("Choose a draft (a single video, not a sweep comparison) in Outputs first.")
        sidecar = read_sidecar(path)
        options = options_from_sidecar(path)
        try:
            request_ = full_request(sidecar)
            with self.tasks.run("generation", "rendering a draft in full", session_of(request), gpu=True,
                                on_wait=waiting_note(progress)) as task:
                report = report_to(task, progress)
                pipe = self.cache.get(options, on_progress=lambda f, m: report(0.0, m))
                out = render_video(pipe, request_, new_output_path(self.ctx.project.outputs_dir, "full"),
                                   on_progress=report, should_stop=task.should_stop, model=options.model,
                                   extra={"full_of": sidecar["video"]})
        except GenerationCancelled:
            return {self.status: "Stopped: nothing was written."}
        except PEOPLE_ERRORS as err:
            return self.refused(str(err))
        except RuntimeError as err:
            return self.refused(self.runtime_message(err, options))
        return {self.video: str(out), self.details: self.describe(read_sidecar(out)),
                self.status: f"Wrote `{out.name}`, the full-quality render of draft `{sidecar['video']}`.",
                self.output_choice: gr.update(choices=self.outputs()), self.model_status: self.cache.describe()}

    def on_stop(self, request: gr.Request = None):
        """Stop this page's generation or sweep (another page's runs on: the job list stops any)."""
        if not self.tasks.stop_owned(session_of(request), ("generation", "sweep")):
            return "This page is not generating (the job list at the top stops other pages' work)."
        return "Stopping after the current step..."

    def on_unload(self):
        with self.tasks.hold_gpu_idle() as idle:
            if not idle:
                raise gr.Error("A GPU task is running (generation or captioning); stop it first.")
            self.cache.unload()
        return self.cache.describe()

    def on_upload(self, path: str | None):
        if not path:
            return [gr.skip() for _ in self.lora_rows] + [None]
        try:  # a different file of the same name is kept beside the first, not written over it
            target = self.ctx.project.add_upload(path, self.ctx.project.loras_dir)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if target.name != Path(path).name:
            gr.Info(f"Another {Path(path).name} is in the project already: this one is kept as {target.name}.")
        choices = lora_choices(self.ctx)
        first = gr.update(choices=choices, value=str(target))
        return [first] + [gr.update(choices=choices) for _ in self.lora_rows[1:]] + [None]

    def on_lora_change(self, path: str | None):
        epochs = run_epochs(path)
        return gr.update(choices=epochs, value=[])

    def on_clip_change(self, clip: str | None):
        if not clip:
            return gr.update()
        try:
            info = probe_video(self.ctx.project.clip_file(clip))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        return gr.update(maximum=max(info.duration - 1 / 16, 0.0625), value=0)

    def on_use_frame(self, clip: str | None, t: float):
        if not clip:
            raise gr.Error("Choose a clip first.")
        from PIL import Image

        try:
            frame = frame_at(self.ctx.project.clip_file(clip), float(t))
        except ValueError as err:
            raise gr.Error(str(err)) from None
        path = self.ctx.project.cache.frames_dir / f"{Path(clip).stem}-{float(t):.3f}s.png"
        with atomic_path(path) as tmp:
            Image.fromarray(frame).save(tmp)
        return str(path)

    def pixel_budget(self) -> int:
        """The project's clip size sets the output's pixel count (832x480 = Wan 480p; the demo's clips are small)."""
        settings = self.ctx.project.settings()
        return settings.clip_width * settings.clip_height

    def on_size_inputs(self, image: str | None, height, width, frames, fps) -> str:
        settings = self.ctx.project.settings()
        if not image:
            return f"Size: from the image's aspect at {settings.clip_width}x{settings.clip_height} pixels."
        try:
            size = open_image(image).size
        except GenerationError as err:
            return str(err)
        h, w = output_size(size, int(height or 0), int(width or 0), self.pixel_budget())
        seconds = int(frames) / float(fps or 16)
        return (f"Output **{w}x{h}**, {int(frames)} frames = {seconds:.2f} s at {float(fps or 16):g} fps "
                f"(image {size[0]}x{size[1]}).")

    def on_output_select(self, path: str | None):
        if not path or not Path(path).exists():
            return None, ""
        data = _json(path)
        if "request" in data:
            return path, self.describe(data)
        rows = "\n".join(f"| {v['label']} | {v['video']} | {v['motion']:.3f} |" for v in data.get("variants", []))
        unit = MOTION_UNIT_SHORT if data.get("motion_unit") == MOTION_UNIT else "px/frame"
        return path, (f"Sweep comparison, seed {data.get('seed')}\n\n| Variant | Video | Motion ({unit}) |\n"
                      "|---|---|---|\n"
                      f"{rows}")

    def on_send_back(self, path: str | None):
        if not path or "request" not in _json(path):
            raise gr.Error("Choose a single generated video (not a sweep comparison) in Outputs first.")
        sidecar = read_sidecar(path)
        # a draft's settings are its full-quality ones, with Draft on: the form then makes the same draft again
        draft = "draft" in sidecar
        request = full_request(sidecar) if draft else GenerationRequest.from_dict(sidecar["request"])
        problems = changed_inputs(sidecar)
        status = f"Settings of `{Path(path).name}` loaded." + (
            f" Note: its inputs differ now: {'; '.join(problems)}." if problems else "")
        values = {self.image: request.image, self.prompt: request.prompt, self.negative_prompt: request.negative_prompt,
                  self.seed_mode: "fixed", self.seed: request.seed, self.steps: request.steps,
                  self.guidance: request.guidance, self.frames: request.frames, self.height: request.height,
                  self.width: request.width, self.fps: request.fps, self.scheduler: request.scheduler,
                  self.flow_shift: request.flow_shift or 0, self.draft: draft, self.status: status}
        choices = lora_choices(self.ctx)
        rows = lora_rows_of(request.loras)
        for i, (choice, strength, low) in enumerate(self.lora_rows):
            path, high_value, low_value = rows[i] if i < len(rows) else ("", 1.0, 1.0)
            values[choice] = gr.update(choices=choices, value=path)
            values[strength], values[low] = high_value, low_value
        return values

    def on_export_comfy(self, path: str | None):
        if not path or "request" not in _json(path):
            raise gr.Error("Choose a single generated video (not a sweep comparison) in Outputs first.")
        try:
            return str(export_comfyui_workflow(path))
        except GenerationError as err:
            raise gr.Error(str(err)) from err

    # ------------------------------------------------------------ wiring

    def wire(self) -> None:
        lora_dropdowns = [row[0] for row in self.lora_rows]
        Context.root_block.load(self.refresh, None, [*lora_dropdowns, self.clip, self.output_choice,
                                                     self.model_status])
        form = self.form_inputs()
        results = [self.video, self.details, self.seed, self.status, self.output_choice, self.model_status]
        # No queue limit here: a second Generate reaches its handler and waits there for the GPU, saying for what
        # (engine.tasks), instead of sitting silently in Gradio's queue. Progress shows in the status line only.
        self.generate.click(self.on_generate, form, results, show_progress_on=[self.status])
        Context.root_block.load(self.on_model_family, None,
                                [*[c for row in self.lora_rows for c in row[1:]], self.sweep_expert])
        self.sweep.click(self.on_sweep, form | {self.sweep_strengths, self.sweep_epochs, self.sweep_expert},
                         [self.grid, self.comparison, self.seed, self.details, self.status, self.output_choice,
                          self.model_status], show_progress_on=[self.status])
        self.stop.click(self.on_stop, None, [self.status], concurrency_limit=None)
        self.ctx.refreshers[TITLE] = (self.reread, [lora_dropdowns[0], self.clip],
                                      [*lora_dropdowns, self.clip, self.output_choice, self.model_status,
                                       self.sweep_epochs])
        self.unload.click(self.on_unload, None, [self.model_status])
        self.upload.upload(self.on_upload, [self.upload], [*lora_dropdowns, self.upload])
        lora_dropdowns[0].change(self.on_lora_change, [lora_dropdowns[0]], [self.sweep_epochs])
        self.clip.change(self.on_clip_change, [self.clip], [self.clip_time])
        self.use_frame.click(self.on_use_frame, [self.clip, self.clip_time], [self.image])
        size_inputs = [self.image, self.height, self.width, self.frames, self.fps]
        for component in size_inputs:
            component.change(self.on_size_inputs, size_inputs, [self.size_note])
        self.play_together.click(None, None, None, js=PLAY_TOGETHER_JS)
        self.refresh_outputs.click(lambda: gr.update(choices=self.outputs()), None, [self.output_choice])
        self.output_choice.change(self.on_output_select, [self.output_choice], [self.output_video, self.output_details])
        self.send_back.click(self.on_send_back, [self.output_choice],
                             [self.image, self.prompt, self.negative_prompt, self.seed_mode, self.seed, self.steps,
                              self.guidance, self.frames, self.height, self.width, self.fps, self.scheduler,
                              self.flow_shift, self.draft, self.status, *[c for row in self.lora_rows for c in row]])
        self.export_comfy.click(self.on_export_comfy, [self.output_choice], [self.comfy_file])
        self.render_full.click(self.on_render_full, [self.output_choice],
                               [self.video, self.details, self.status, self.output_choice, self.model_status],
                               show_progress_on=[self.status])


def _json(path: str | Path) -> dict:
    import json

    try:
        return json.loads(read_text(Path(path).with_suffix(".json")))
    except (OSError, ValueError):
        return {}


def build(ctx: AppContext) -> None:
    ctx.ui["generate"] = GenerateTab(ctx)
    ctx.ui["generate"].build()
