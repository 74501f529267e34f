"""The flow-matching objective as Wan I2V is trained: timestep sampling, the loss, per-micro-batch RNG and batching."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.core.families import NUM_TRAIN_TIMESTEPS

TEXT_TOKENS = 512  # Wan's attention splits image from text context at 512 text tokens




@dataclass(frozen=True)
class TimestepSampling:
    """How flow-matching noise levels t in (0, 1) are drawn: logit-normal or uniform, then optionally shifted."""

    method: str = "logit_normal"
    shift: float = 1.0

    @classmethod
    def from_run_config(cls, run_cfg) -> TimestepSampling:
        return cls(run_cfg.model.timestep_sample_method, float(run_cfg.model.shift))

    def sample(self, n: int, generator: torch.Generator, t_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """n values of t (float32, on the generator's device), restricted to `t_range` when it is not (0, 1).

        A restricted draw is the distribution sliced to the range (as diffusion-pipe's min_t / max_t), drawn exactly
        through its quantile function; the full range keeps the direct draw.
        """
        if tuple(t_range) != (0.0, 1.0):
            low, high = (self.cdf(x) for x in t_range)
            u = low + (high - low) * torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
            return self.quantile(u).float()
        if self.method == "logit_normal":
            t = torch.sigmoid(torch.randn(n, generator=generator, device=generator.device))
        elif self.method == "uniform":
            t = torch.rand(n, generator=generator, device=generator.device)
        else:
            raise ValueError(f"timestep_sample_method {self.method!r}: use 'logit_normal' or 'uniform'.")
        if self.shift != 1.0:
            t = t * self.shift / (1 + (self.shift - 1) * t)
        return t

    def cdf(self, t: float) -> float:
        """P(T <= t) of the (shifted) distribution."""
        t = min(max(float(t), 0.0), 1.0)
        x = t / (self.shift - (self.shift - 1) * t)  # the shift undone
        if self.method == "uniform":
            return x
        if x <= 0.0 or x >= 1.0:
            return x
        return float(torch.special.ndtr(torch.logit(torch.tensor(x, dtype=torch.float64))))

    def quantile(self, u: torch.Tensor) -> torch.Tensor:
        """The t with P(T <= t) = u (u float64 in [0, 1])."""
        x = u if self.method == "uniform" else torch.sigmoid(torch.special.ndtri(u))
        return x * self.shift / (1 + (self.shift - 1) * x)


def flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, timesteps_cfg: TimestepSampling,
                       generator: torch.Generator, autocast_dtype: torch.dtype | None = None,
                       t_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """MSE between the model's velocity and (noise - latents) at a random t, for one batch of cached items.

    x_t = (1 - t) x + t n, model input cat([x_t, mask + condition latents]) on channels, timestep t * 1000, text
    context padded to 512 tokens, CLIP context as `encoder_hidden_states_image` (when cached: Wan 2.1). `t_range`
    restricts t to one expert's noise levels (see TimestepSampling.sample). t and the noise come from
    `generator` (its device), so a seeded generator reproduces a step exactly. Autocast to bf16 on a GPU.
    """
    latents = batch["latents"].float()
    device = latents.device
    if autocast_dtype is None:
        autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = timesteps_cfg.sample(latents.shape[0], generator, t_range).to(device)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
    t_b = t.view(-1, 1, 1, 1, 1)
    noisy = (1 - t_b) * latents + t_b * noise
    text = batch["text_embeds"]
    if text.shape[1] != TEXT_TOKENS:
        raise ValueError(f"text_embeds must be padded to {TEXT_TOKENS} tokens, got {text.shape[1]}.")
    model_input = torch.cat([noisy, batch["condition"].float()], dim=1)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
        prediction = model(hidden_states=model_input, timestep=t * NUM_TRAIN_TIMESTEPS, encoder_hidden_states=text,
                           encoder_hidden_states_image=batch.get("image_embeds"), return_dict=False)[0]
    return F.mse_loss(prediction.float(), noise - latents)


def micro_batch_generator(seed: int, global_index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for one micro-batch's t and noise: a function of (seed, global micro-batch index) only."""
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{global_index}".encode()).digest()[:8], "little") >> 1
    return torch.Generator(device=device).manual_seed(mixed)


def stack_items(samples: list[dict[str, torch.Tensor]], device: torch.device) -> dict[str, torch.Tensor]:
    """CachedDataset.load results of one bucket -> a batch with a leading dimension, on `device`."""
    return {key: torch.stack([s[key] for s in samples]).to(device) for key in samples[0]}
