"""Wan LoRA Studio's engine: everything that works without a UI, one package per stage of the workflow.

    core/       the project and run-folder layout, atomic files, model loading and tiny kits, ffmpeg, video, hardware
    clips/      stage 1: cut Wan-ready clips out of a long video            (Clips tab,    python -m engine.clips)
    captions/   stage 2: caption files, BLIP-2 suggestions, style rules      (Captions tab, python -m engine.captions)
    training/   stage 3: config, dataset scan, cache, objective, loop, state (Train tab,    python -m engine.training)
    speed/      float8, checkpointing, block swap, compile: used by training and generate, knows neither
    generate/   stage 4: pipeline, LoRA files, render, sweep, sidecars       (Generate tab, python -m engine.generate)
    jobs.py     the one runner for long tasks in a child process, and the studio-wide GPU lock
    demo.py     the demo project the studio opens by default

The engine never imports gradio (tests/engine/test_layout.py checks it).
"""
