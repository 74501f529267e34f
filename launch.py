"""Start Wan LoRA Studio: `python launch.py [--project DIR] [--model WAN] [--captioner BLIP2] [--port N]`.

With no --project it opens the demo project (generated sample video, tiny models), creating it on first launch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from engine.core.quiet import quiet_known_noise

quiet_known_noise()  # before the imports below bring in torch, DeepSpeed and transformers

from engine.core.hardware import describe_device
from engine.core.layout import Project, jobs_dir, studio_home, tiny_models_dir
from engine.core.models import ModelChoice, ModelFolderError, check_blip2_folder, check_wan_folder, ensure_tiny_kits
from engine.demo import ensure_demo_project
from engine.jobs import JobRunner

ASSETS = Path(__file__).resolve().parent / "assets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Wan LoRA Studio: clips -> captions -> LoRA training -> I2V tests")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--project", help="project folder (created if missing); default: the demo project")
    parser.add_argument("--model", help="Wan 2.1 I2V 14B or Wan 2.2 I2V A14B diffusers folder or hub id (the family "
                                        "is read from the folder); default: the project's, else the tiny demo model")
    parser.add_argument("--captioner", help="BLIP-2 folder or hub id; default: the tiny demo captioner")
    parser.add_argument("--video-captioner", help="Qwen2.5-VL folder or hub id for the Captions tab's video-language "
                                                  "captioner; default: the project's, else the tiny demo one")
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="another name this studio may be reached by (a reverse proxy's, or this machine's on the "
                             "network with --host 0.0.0.0); requests naming any other host are refused")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Project, ModelChoice]:
    """The project and models to open, building the demo project and tiny kits when none are given."""
    if args.project:
        project = Project.open(args.project)
        settings = project.settings()
        chosen = (args.model or settings.wan_model, args.captioner or settings.captioner_model,
                  args.video_captioner or settings.video_captioner_model)
        kits = ensure_tiny_kits(tiny_models_dir(studio_home())) if not all(chosen) else None
    else:
        project, kits = ensure_demo_project()
    settings = project.settings()
    wan = args.model or settings.wan_model or kits.wan
    if args.model and args.model != settings.wan_model:  # the project remembers the model (and so the family)
        project.save_settings(replace(settings, wan_model=args.model))
    models = ModelChoice(
        wan=wan, wan22=kits.wan22 if kits else "",
        captioner=args.captioner or settings.captioner_model or kits.captioner,
        video_captioner=args.video_captioner or settings.video_captioner_model or kits.video_captioner,
    )
    check_wan_folder(models.wan)
    check_blip2_folder(models.captioner)
    return project, models


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        project, models = resolve(args)
    except (ModelFolderError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from studio.app import allowed_hosts, build, host_check, serve
    from studio.context import AppContext

    ctx = AppContext(project=project, models=models, device_description=describe_device(),
                     jobs=JobRunner(jobs_dir(studio_home())))
    app = build(ctx)
    app.queue(default_concurrency_limit=4)
    print(f"Wan LoRA Studio: project {project.root}", flush=True)
    hosts = allowed_hosts(args.host, args.allow_host, share=args.share)
    if args.share:  # Gradio's own launcher makes the share link (its start-up checks need a network anyway)
        app.launch(server_name=args.host, server_port=args.port, share=True, allowed_paths=[str(project.root)],
                   show_error=True, css_paths=[ASSETS / "studio.css"], app_kwargs={"middleware": [host_check(hosts)]})
    else:
        try:
            serve(app, args.host, args.port, hosts, allowed_paths=[str(project.root)],
                  css_paths=[ASSETS / "studio.css"])
        except OSError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
