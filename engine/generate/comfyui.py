"""ComfyUI API-format workflow export of a generated video's settings."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from engine.core.files import atomic_write_json
from engine.core.layout import ADAPTER_FILE
from engine.generate.render import read_sidecar, sidecar_path
from engine.generate.request import WAN_480P_SCHEDULER, GenerationError, GenerationRequest

# ---------------------------------------------------------------------------------------------- ComfyUI export

# diffusers scheduler class -> ComfyUI KSampler sampler_name (with scheduler "simple": sigmas evenly spaced in t)
COMFY_SAMPLERS = {"UniPCMultistepScheduler": "uni_pc_bh2", "FlowMatchEulerDiscreteScheduler": "euler",
                  "FlowMatchLCMScheduler": "lcm"}

@dataclass(frozen=True)
class ComfyModelFiles:
    """File names inside ComfyUI's models/ folders (the Comfy-Org repackaged Wan 2.1 names by default)."""

    diffusion_model: str = "wan2.1_i2v_480p_14B_bf16.safetensors"
    text_encoder: str = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    clip_vision: str = "clip_vision_h.safetensors"
    vae: str = "wan_2.1_vae.safetensors"  # Wan 2.2 A14B uses the Wan 2.1 VAE too
    # Wan 2.2 I2V A14B: the Comfy-Org repackaged experts
    high_noise_model: str = "wan2.2_i2v_high_noise_14B_fp16.safetensors"
    low_noise_model: str = "wan2.2_i2v_low_noise_14B_fp16.safetensors"


def comfy_lora_name(path: str | Path) -> str:
    """The name to copy a LoRA under in ComfyUI/models/loras: runs/<run>/epoch3/adapter_model.safetensors ->
    <run>_epoch3.safetensors (so epochs do not overwrite each other)."""
    path = Path(path)
    if path.name == ADAPTER_FILE:
        return f"{path.parent.parent.name}_{path.parent.name}.safetensors"
    if path.stem.endswith("_noise_model") and path.parent.name.startswith("epoch"):  # a Wan 2.2 pair's file
        return f"{path.parent.parent.name}_{path.parent.name}_{path.stem.removesuffix('_model')}.safetensors"
    return path.name


def boundary_step(scheduler: dict, steps: int, boundary_ratio: float) -> int:
    """The first step the low-noise expert runs, as WanImageToVideoPipeline switches: the count of timesteps
    >= boundary_ratio * 1000 in the recorded scheduler's schedule for `steps` steps."""
    from diffusers import UniPCMultistepScheduler

    config = {k: v for k, v in scheduler.items() if k != "class"}
    sampler = UniPCMultistepScheduler.from_config(config)
    sampler.set_timesteps(steps)
    return int((sampler.timesteps >= boundary_ratio * sampler.config.num_train_timesteps).sum())


def comfyui_workflow(request: GenerationRequest, files: ComfyModelFiles = ComfyModelFiles(),
                     scheduler: dict | None = None, boundary_ratio: float | None = None) -> dict:
    """An API-format ComfyUI workflow (node id -> {class_type, inputs}) for the same image, prompt, LoRAs at the
    same strengths, size, frames, steps, guidance, seed and sampling (`scheduler`: a sidecar's record of the
    diffusers scheduler). ComfyUI draws its noise differently, so the video is alike in settings, not identical
    in pixels. With `boundary_ratio` (Wan 2.2) it is the two-expert graph: a model loader and a LoRA chain per
    expert and two KSamplerAdvanced split at the boundary step, the high-noise one handing over its leftover noise."""
    if boundary_ratio is not None:
        return _two_expert_workflow(request, files, scheduler, boundary_ratio)
    scheduler = scheduler or WAN_480P_SCHEDULER
    if scheduler.get("class") not in COMFY_SAMPLERS:
        raise GenerationError(f"ComfyUI export knows the {', '.join(COMFY_SAMPLERS)} schedulers; this video used "
                              f"{scheduler.get('class')}.")
    # ComfyUI's "uni_pc" is UniPC's bh1 variant, "uni_pc_bh2" the bh2 one; the flow-match schedulers call it shift.
    sampler_name = COMFY_SAMPLERS[scheduler["class"]]
    if sampler_name == "uni_pc_bh2" and scheduler.get("solver_type") == "bh1":
        sampler_name = "uni_pc"
    shift = float(scheduler["flow_shift"] if "flow_shift" in scheduler else scheduler["shift"])
    nodes: dict[str, dict] = {}
    add = partial(_add_node, nodes)

    unet = add("UNETLoader", unet_name=files.diffusion_model, weight_dtype="default")
    model = [unet, 0]
    for path, strength, *_ in request.loras:
        name = comfy_lora_name(path)
        model = [add("LoraLoaderModelOnly", title=f"LoRA: copy {path} to models/loras/{name}", model=model,
                     lora_name=name, strength_model=float(strength)), 0]
    # ModelSamplingSD3 shifts sigmas as diffusers' flow_shift does: s*t / (1 + (s-1)*t).
    model = [add("ModelSamplingSD3", model=model, shift=shift), 0]
    clip = add("CLIPLoader", clip_name=files.text_encoder, type="wan", device="default")
    positive = add("CLIPTextEncode", clip=[clip, 0], text=request.prompt)
    negative = add("CLIPTextEncode", clip=[clip, 0], text=request.negative_prompt)
    vae = add("VAELoader", vae_name=files.vae)
    image = add("LoadImage", title=f"Start image: copy {request.image} to ComfyUI's input folder",
                image=Path(request.image).name)
    vision = add("CLIPVisionLoader", clip_name=files.clip_vision)
    # diffusers' CLIPImageProcessor (as Wan's own code) resizes the short side and crops the centre; "none" would
    # squash the whole frame into the square instead.
    vision_out = add("CLIPVisionEncode", clip_vision=[vision, 0], image=[image, 0], crop="center")
    i2v = add("WanImageToVideo", positive=[positive, 0], negative=[negative, 0], vae=[vae, 0],
              clip_vision_output=[vision_out, 0], start_image=[image, 0], width=request.width,
              height=request.height, length=request.frames, batch_size=1)
    # diffusers skips guidance at <= 1 (the prompt alone), which is cfg 1 in ComfyUI; its cfg 0 would be the
    # negative prompt alone.
    sampler = add("KSampler", model=model, positive=[i2v, 0], negative=[i2v, 1], latent_image=[i2v, 2],
                  seed=int(request.seed or 0), steps=request.steps, cfg=max(float(request.guidance), 1.0),
                  sampler_name=sampler_name, scheduler="simple", denoise=1.0)
    decoded = add("VAEDecode", samples=[sampler, 0], vae=[vae, 0])
    video = add("CreateVideo", images=[decoded, 0], fps=request.fps)
    add("SaveVideo", video=[video, 0], filename_prefix="video/wan_lora_studio", format="auto", codec="auto")
    return nodes


def _add_node(nodes: dict[str, dict], class_type: str, title: str | None = None, **inputs) -> str:
    """Add a node of the API-format graph `nodes` (ids "1", "2", ... in order) and return its id."""
    node_id = str(len(nodes) + 1)
    nodes[node_id] = {"class_type": class_type, "inputs": inputs}
    if title:
        nodes[node_id]["_meta"] = {"title": title}
    return node_id


def _two_expert_workflow(request: GenerationRequest, files: ComfyModelFiles, scheduler: dict | None,
                         boundary_ratio: float) -> dict:
    if not scheduler or scheduler.get("class") != "UniPCMultistepScheduler":
        raise GenerationError("ComfyUI export of a Wan 2.2 video needs its recorded flow UniPC scheduler.")
    nodes: dict[str, dict] = {}
    add = partial(_add_node, nodes)

    models = {}
    for expert, unet_name in (("high_noise", files.high_noise_model), ("low_noise", files.low_noise_model)):
        model = [add("UNETLoader", title=f"{expert} expert", unet_name=unet_name, weight_dtype="default"), 0]
        for path, strength, *tag in request.loras:
            if (tag[0] if tag else "high_noise") != expert:
                continue
            name = comfy_lora_name(path)
            model = [add("LoraLoaderModelOnly", title=f"LoRA ({expert}): copy {path} to models/loras/{name}",
                         model=model, lora_name=name, strength_model=float(strength)), 0]
        models[expert] = [add("ModelSamplingSD3", model=model, shift=float(scheduler["flow_shift"])), 0]
    clip = add("CLIPLoader", clip_name=files.text_encoder, type="wan", device="default")
    positive = add("CLIPTextEncode", clip=[clip, 0], text=request.prompt)
    negative = add("CLIPTextEncode", clip=[clip, 0], text=request.negative_prompt)
    vae = add("VAELoader", vae_name=files.vae)
    image = add("LoadImage", title=f"Start image: copy {request.image} to ComfyUI's input folder",
                image=Path(request.image).name)
    # Wan 2.2 conditions on the image through the latent only: no CLIP vision.
    i2v = add("WanImageToVideo", positive=[positive, 0], negative=[negative, 0], vae=[vae, 0],
              start_image=[image, 0], width=request.width, height=request.height, length=request.frames,
              batch_size=1)
    split = boundary_step(scheduler, request.steps, boundary_ratio)
    common = dict(positive=[i2v, 0], negative=[i2v, 1], noise_seed=int(request.seed or 0), steps=request.steps,
                  cfg=max(float(request.guidance), 1.0),
                  sampler_name="uni_pc_bh2" if scheduler["solver_type"] == "bh2" else "uni_pc", scheduler="simple")
    high = add("KSamplerAdvanced", title="high-noise expert", model=models["high_noise"], latent_image=[i2v, 2],
               add_noise="enable", start_at_step=0, end_at_step=split, return_with_leftover_noise="enable", **common)
    low = add("KSamplerAdvanced", title="low-noise expert", model=models["low_noise"], latent_image=[high, 0],
              add_noise="disable", start_at_step=split, end_at_step=request.steps,
              return_with_leftover_noise="disable", **common)
    decoded = add("VAEDecode", samples=[low, 0], vae=[vae, 0])
    video = add("CreateVideo", images=[decoded, 0], fps=request.fps)
    add("SaveVideo", video=[video, 0], filename_prefix="video/wan_lora_studio", format="auto", codec="auto")
    return nodes


def export_comfyui_workflow(sidecar: str | Path, out_path: str | Path | None = None,
                            files: ComfyModelFiles = ComfyModelFiles()) -> Path:
    """Write the ComfyUI workflow of a generated video (from its sidecar) beside it as <video>.comfyui.json."""
    source = sidecar_path(sidecar) if Path(sidecar).suffix.lower() != ".json" else Path(sidecar)
    data = read_sidecar(source)
    out_path = Path(out_path) if out_path else source.with_name(source.stem + ".comfyui.json")
    workflow = comfyui_workflow(GenerationRequest.from_dict(data["request"]), files, data.get("scheduler"),
                                data.get("boundary_ratio"))
    return atomic_write_json(out_path, workflow)
