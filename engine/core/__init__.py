"""Core: what every stage shares.

- `layout`: the project folder and every path in it (sources/, clips/, cache/, runs/<run>/, outputs/, uploads);
  the one module that joins those names.
- `files`: atomic writes and JSON lines. `progress`: the on_progress / should_stop callback types.
- `models`: loaders for Wan I2V and BLIP-2 folders (safetensors only) and the tiny random-weight kits
  (`python -m engine.core.models make-tiny --out DIR`, `python -m engine.core.models check PATH`).
- `video`: probing and frame-exact reading of videos, preview proxies. `ffmpeg`: the bundled encoder.
- `hardware`: the GPUs this machine has.

Reads and writes: project.json, the tiny kits under the studio home's models/, preview proxies under cache/.
"""
