"""Wan LoRA Studio engine: everything that works without a UI (never imports gradio)."""
