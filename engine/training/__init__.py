"""Stage 3, training: a Wan 2.1 I2V LoRA from captioned clips (the Train tab; `python -m engine.training`).

Settings: `schema` (the dataclasses), `config` (diffusion-pipe TOML in and out), `interop` (what the studio does
with diffusion-pipe's keys, the export for diffusion-pipe), `form` (the Train tab's form), `presets` (per GPU size).
Data: `dataset` (scan clips and captions, buckets, frame reading), `cache` (latents and embeddings on disk).
Training: `objective` (flow matching), `model` (peft LoRA + low-memory modes), `optim`, `loop` (the Trainer), `state`
(resume states), `parallel` (DeepSpeed data parallel), `stages` (validate -> cache -> train), `events` (the trainer
-> UI contract), `runs` (a run folder read back).

Determinism: each micro-batch draws its timestep and noise from a generator seeded by (seed, global micro-batch
index), and the data order is a function of (seed, epoch), so a run resumed from a saved state continues exactly
as the uninterrupted run would have; and 2 ranks with gradient accumulation k see the same micro-batches, noise and
averaged gradient as 1 rank with 2k.

Multi-GPU: `deepspeed --num_gpus N --module engine.training --config run.toml` (or torchrun) trains data-parallel;
rank 0 alone writes files and events.

Reads: clips/ and their captions, the model folder. Writes: cache/latents, cache/text, runs/<run>/ (run.toml,
dataset.toml, metrics.jsonl, tb/, state/stepS/, epochN/adapter_model.safetensors, samples/).
"""
