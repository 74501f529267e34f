"""Model families: what differs between Wan 2.1 I2V 14B and Wan 2.2 I2V A14B, stated once per family.

A family is one declarative class: its diffusers pipeline parts, whether the image conditions through a CLIP image
encoder, its experts (the transformers, each owning a range of noise levels t in [0, 1], t = 1 pure noise), the
boundary between them, and its sampling defaults. Everything else (caching, training, generation) asks the family
instead of branching on a version. The family of a folder is read from the folder itself (`family_of`).

Facts, from the sources named:
- Wan 2.2 I2V A14B in diffusers (`Wan-AI/Wan2.2-I2V-A14B-Diffusers`, diffusers 0.42 pipeline_wan_i2v.py):
  `transformer` is the high-noise expert, `transformer_2` the low-noise one; `model_index.json` holds
  `boundary_ratio`; the pipeline uses `transformer` for timesteps >= boundary_ratio * 1000 and `transformer_2` below;
  there is no `image_encoder` (the transformer has `image_dim` None): the image conditions through the latent only.
- Wan 2.2's own configs (Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py): boundary 0.900, sample_shift 5.0,
  guidance (3.5, 3.5). Wan 2.1 I2V 480p: flow shift 3.0, guidance 5.0.
- diffusion-pipe trains one expert per run, selected by `[model] transformer_path` and restricted to its noise
  range by `[model] min_t` / `max_t` (models/wan/wan.py: the t distribution is sliced after the shift).
- Names of LoRA pairs in the ecosystem: Wan 2.2's folders `high_noise_model` / `low_noise_model`, and ComfyUI's
  repackaged pairs `*_high_noise.safetensors` / `*_low_noise.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

NUM_TRAIN_TIMESTEPS = 1000  # diffusers' Wan schedulers: model timestep = t * 1000


@dataclass(frozen=True)
class Expert:
    """One transformer of a family: its diffusers subfolder and the noise levels t it owns, [low, high)."""

    name: str  # 'transformer' (Wan 2.1's only one), 'high_noise' or 'low_noise'
    subfolder: str  # diffusers component: 'transformer' or 'transformer_2'
    label: str  # for people: "high-noise expert (early steps)"

    def owns(self, t: float, boundary: float | None) -> bool:
        """Whether noise level `t` (0..1) belongs to this expert, as WanImageToVideoPipeline switches."""
        low, high = self.t_range(boundary)
        return low <= t < high or (high == 1.0 and t == 1.0)

    def t_range(self, boundary: float | None) -> tuple[float, float]:
        if self.name == "high_noise":
            return float(boundary), 1.0
        if self.name == "low_noise":
            return 0.0, float(boundary)
        return 0.0, 1.0


class ModelFamily:
    """The base of the families: class attributes only, read through the subclasses."""

    key: str  # stored in project.json and run TOMLs ([studio] model_family)
    title: str  # for people
    hub_id: str  # the diffusers repo users download
    components: dict[str, tuple[str, ...]]  # subfolder -> files that must be there (globs)
    image_encoder: bool  # the image conditions through a CLIP image encoder as well as the latent
    experts: tuple[Expert, ...]
    default_boundary: float | None  # used when model_index.json has no boundary_ratio
    flow_shift: float  # the scheduler's shift at 480p
    guidance: float  # classifier-free guidance the authors sample with
    training_shift: float  # the presets' [model] shift of the sampled t

    @classmethod
    def expert(cls, name: str) -> Expert:
        for expert in cls.experts:
            if expert.name == name:
                return expert
        names = ", ".join(e.name for e in cls.experts)
        raise ValueError(f"{cls.title} has no expert {name!r}; its experts: {names}.")

    @classmethod
    def boundary(cls, source: str | Path | None = None) -> float | None:
        """The boundary ratio: from the folder's model_index.json when it has one, else the family's default."""
        index = read_model_index(source) if source is not None else {}
        value = index.get("boundary_ratio")
        return float(value) if value is not None else cls.default_boundary

    @classmethod
    def expert_for(cls, t: float, boundary: float | None) -> Expert:
        """The expert that owns noise level t."""
        return next(e for e in cls.experts if e.owns(t, boundary))

    @classmethod
    def lora_file_name(cls, expert: Expert) -> str:
        """The file name an epoch's LoRA for this expert gets (diffusion-pipe's name for a single transformer)."""
        return "adapter_model.safetensors" if len(cls.experts) == 1 else f"{expert.name}_model.safetensors"


_WAN_COMMON = {
    "vae": ("config.json", "*.safetensors"),
    "text_encoder": ("config.json", "*.safetensors"),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}


class Wan21I2V(ModelFamily):
    """Wan 2.1 I2V 14B 480p: one transformer, CLIP image context beside the latent condition."""

    key = "wan2.1-i2v"
    title = "Wan 2.1 I2V 14B"
    hub_id = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
    components = {"transformer": ("config.json", "*.safetensors"), **_WAN_COMMON,
                  "image_encoder": ("config.json", "*.safetensors"), "image_processor": ("preprocessor_config.json",)}
    image_encoder = True
    experts = (Expert("transformer", "transformer", "transformer"),)
    default_boundary = None
    flow_shift = 3.0
    guidance = 5.0
    training_shift = 1.0  # logit-normal t as the Wan authors and diffusion-pipe train


class Wan22I2V(ModelFamily):
    """Wan 2.2 I2V A14B: a high-noise and a low-noise expert switched at a boundary; the image conditions through
    the latent only."""

    key = "wan2.2-i2v-a14b"
    title = "Wan 2.2 I2V A14B"
    hub_id = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    components = {"transformer": ("config.json", "*.safetensors"), "transformer_2": ("config.json", "*.safetensors"),
                  **_WAN_COMMON}
    image_encoder = False
    experts = (Expert("high_noise", "transformer", "high-noise expert (early steps)"),
               Expert("low_noise", "transformer_2", "low-noise expert (late steps)"))
    default_boundary = 0.9
    flow_shift = 5.0
    guidance = 3.5
    # Its sampling shift: noise levels are trained as often as generation visits them, so the high-noise expert
    # gets 28 % of the steps (unshifted, t >= 0.9 would be drawn 1.4 % of the time and it would barely train).
    training_shift = 5.0


FAMILIES: dict[str, type[ModelFamily]] = {f.key: f for f in (Wan21I2V, Wan22I2V)}
DEFAULT_FAMILY = Wan21I2V


def read_model_index(source: str | Path) -> dict:
    """model_index.json of a local pipeline folder, {} for a hub id or a folder without one."""
    path = Path(source).expanduser() / "model_index.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def family_of(source: str | Path) -> type[ModelFamily]:
    """The family of a pipeline folder (a `transformer_2` in model_index.json means Wan 2.2), or of a hub id by name."""
    index = read_model_index(source)
    if index:
        two_experts = (index.get("transformer_2") or [None])[0] is not None
        return Wan22I2V if two_experts else Wan21I2V
    return Wan22I2V if "wan2.2" in str(source).lower() else Wan21I2V


def family_by_key(key: str) -> type[ModelFamily]:
    if key not in FAMILIES:
        raise ValueError(f"Unknown model family {key!r}; known: {', '.join(FAMILIES)}.")
    return FAMILIES[key]
