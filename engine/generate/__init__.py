"""Stage 4, generate: image-to-video with Wan 2.1 I2V and LoRAs at adjustable strengths (the Generate tab).

- `request`: what to render and its checks. `pipeline`: the loaded pipeline and the LoRAs applied to it.
- `render`: denoise, decode, video + sidecar, reproduce. `sweep`: strength/epoch sweeps and comparison videos.
- `lora_files`: LoRA files in every format the field uses, accelerator LoRAs included. `comfyui`: workflow export.
- `draft`: Draft mode, renders through a step-distillation LoRA (4 steps, no guidance), then "render in full".

The pipeline stays loaded between generations (`PipelineCache`), each LoRA file is loaded once as a named peft
adapter, and strengths change through `set_adapters`, so trying another strength never reloads the 14B model.
Every video gets a JSON sidecar of the same name holding every parameter (seed included) and a hash of its frames,
so `reproduce(sidecar)` can render it again and say whether it came out identical.

Reads: the model folder, LoRA files, start images. Writes: outputs/<name>.mp4 + <name>.json sidecars.

Command line (the reference workflow's strength-test script):
    python -m engine.generate --model PATH --image IMG --prompt TEXT [--lora FILE --strength S]...
                              [--strengths 0,0.5,1] [--frames N --steps N --guidance G --seed N --height H --width W]
                              [--scheduler unipc|euler|lcm --flow-shift S] [--draft ACCELERATOR_LORA] --out DIR
    python -m engine.generate --render-in-full outputs/draft-....json [--out DIR]
    python -m engine.generate --reproduce outputs/gen-....json [--out DIR]
    python -m engine.generate.lora_files info FILE | convert IN OUT --format NAME
"""
