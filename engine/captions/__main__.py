"""`python -m engine.captions`: suggest, apply-style, find-replace, export, import, undo, check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from engine.captions.captioners import CaptionerOutOfMemory, CaptionerSettings, suggest_captions
from engine.captions.store import (
    CaptionStore,
    apply_style_to_clips,
    export_captions,
    find_replace_in_clips,
    import_captions,
)
from engine.captions.style import CaptionChange, StyleRules, find_banned_words, load_style_rules
from engine.captions.text import CaptionError
from engine.captions.tokens import TokenCounter
from engine.captions.vlm import DEFAULT_INSTRUCTION, DEFAULT_VIDEO_FPS, MEMORY_MODES, open_captioner
from engine.core.layout import Project
from engine.core.models import BLIP2_HUB_ID

# ---------------------------------------------------------------------------------------------- command line

def _project_setting(clips_dir: Path, key: str):
    """A setting of the project whose clips/ folder CLIPS_DIR is (a model it chose, ...), else ''."""
    project = Project.of_clips_dir(clips_dir)
    return getattr(project.settings(), key) if project else ""


def _print_changes(changes: Sequence[CaptionChange], verb: str) -> None:
    for change in changes:
        print(f"{change.clip}: {change.diff}")
    print(f"{len(changes)} caption(s) {verb}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.captions", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("suggest", help="caption clips with BLIP-2 or a video-language model (Qwen2.5-VL); only clips "
                                       "without a caption unless --overwrite")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("--model", help=f"BLIP-2 or Qwen2.5-VL folder or hub id (default: the project's captioner, else "
                                   f"{BLIP2_HUB_ID})")
    p.add_argument("--overwrite", action="store_true", help="also replace existing captions (old text kept in history)")
    p.add_argument("--frames", type=int, default=3, help="frames captioned per clip and merged (default 3)")
    p.add_argument("--prompt", default="", help="text the captioner continues, e.g. 'a video of'")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8, help="frames per forward pass (lower it on out-of-memory)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--instruction", help="video captioner: what the model is asked (default: the project's, else a "
                                         "pure-style instruction)")
    p.add_argument("--video-fps", type=float, help=f"video captioner: frames per second it watches (default "
                                                   f"{DEFAULT_VIDEO_FPS:g})")
    p.add_argument("--memory-mode", choices=MEMORY_MODES, default="auto",
                   help="video captioner: auto (bf16 on GPU), bf16, 8bit or 4bit (bitsandbytes, CUDA)")
    p.add_argument("--rules", type=Path, help="pure-style rules (TOML/JSON) each video caption passes through "
                                              "(default: the project's, when CLIPS_DIR is a project's clips/)")
    p = sub.add_parser("apply-style", help="apply pure-style rules (TOML/JSON) to every caption")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("--rules", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true", help="print the changes without saving them")
    p = sub.add_parser("find-replace", help="find and replace across all captions")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("find")
    p.add_argument("replace")
    p.add_argument("--regex", action="store_true")
    p.add_argument("--case-sensitive", action="store_true")
    p.add_argument("--whole-word", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("export", help="write all captions to a .jsonl or .csv file")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("import", help="set captions from a .jsonl or .csv file (columns clip, caption)")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("source", type=Path)
    p.add_argument("--keep-existing", action="store_true", help="only fill clips that have no caption")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("undo", help="revert the latest change to one clip's caption")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("clip")
    p = sub.add_parser("check", help="list caption status, banned words and token counts")
    p.add_argument("clips_dir", type=Path)
    p.add_argument("--rules", type=Path, help="style rules whose banned words to check")
    p.add_argument("--wan", help="Wan I2V folder whose tokenizer counts tokens (default: the project's model)")
    args = parser.parse_args(argv)

    try:
        store = CaptionStore(args.clips_dir)
        if args.command == "suggest":
            settings = CaptionerSettings(frames_per_clip=args.frames, prompt=args.prompt, batch_size=args.batch_size)
            settings.validate()
            model = args.model or _project_setting(store.clips_dir, "captioner_model") or BLIP2_HUB_ID
            video = {"instruction": args.instruction or _project_setting(store.clips_dir, "caption_instruction")
                     or DEFAULT_INSTRUCTION, "video_fps": args.video_fps or DEFAULT_VIDEO_FPS,
                     "memory_mode": args.memory_mode, "max_new_tokens": args.max_new_tokens}
            captioner = open_captioner(model, args.device, video=video, blip2={
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size})
            rules = None
            if getattr(captioner, "reads_video", False):
                project = Project.of_clips_dir(store.clips_dir)
                rules_file = args.rules or (project.style_rules_file if project else None)
                rules = load_style_rules(rules_file) if rules_file and rules_file.is_file() else None

            def progress(fraction: float, message: str) -> None:
                print(f"[{fraction:4.0%}] {message}", file=sys.stderr, flush=True)

            report = suggest_captions(store, captioner, overwrite=args.overwrite, write_captions=True,
                                      settings=settings, rules=rules, on_progress=progress)
            for clip, text in report.suggested.items():
                print(f"{clip}: {text}")
            for clip, why in report.failed.items():
                print(f"skipped {clip}: {why}", file=sys.stderr)
            print(f"{len(report.written)} caption(s) written, {len(report.skipped)} clip(s) already captioned "
                  f"(use --overwrite to replace), {len(report.failed)} failed")
            return 1 if report.failed else 0
        if args.command == "apply-style":
            changes, unreadable = apply_style_to_clips(store, load_style_rules(args.rules), dry_run=args.dry_run)
            _print_changes(changes, "would change" if args.dry_run else "changed")
            for clip in unreadable:
                print(f"skipped {clip}: caption file is not UTF-8", file=sys.stderr)
            return 0
        if args.command == "find-replace":
            changes = find_replace_in_clips(store, args.find, args.replace, regex=args.regex,
                                            case_sensitive=args.case_sensitive, whole_word=args.whole_word,
                                            dry_run=args.dry_run)
            _print_changes(changes, "would change" if args.dry_run else "changed")
            return 0
        if args.command == "export":
            count, unreadable = export_captions(store, args.out)
            print(f"{count} caption(s) written to {args.out}")
            for clip in unreadable:
                print(f"left out {clip}: caption file is not UTF-8", file=sys.stderr)
            return 0
        if args.command == "import":
            report = import_captions(store, args.source, keep_existing=args.keep_existing, dry_run=args.dry_run)
            _print_changes(report.changes, "would change" if args.dry_run else "changed")
            for clip in report.kept_existing:
                print(f"kept existing caption of {clip}", file=sys.stderr)
            for clip in report.unknown_clips:
                print(f"no clip named {clip} in {store.clips_dir}", file=sys.stderr)
            for clip in report.unreadable:
                print(f"skipped {clip}: caption file is not UTF-8", file=sys.stderr)
            return 0
        if args.command == "undo":
            restored = store.undo(args.clip)
            print("nothing to undo" if restored is None else f"{Path(args.clip).name}: {restored or '(no caption)'}")
            return 0
        # check
        rules = load_style_rules(args.rules) if args.rules else StyleRules()
        wan = args.wan or _project_setting(store.clips_dir, "wan_model")
        counter = TokenCounter.for_wan_model(wan, rules.token_limit) if wan else None
        for info in store.overview():
            notes = []
            if counter and info.text:
                count = counter.count(info.text)
                notes.append(count.warning or f"{count.tokens} tokens")
            banned = find_banned_words(info.text, rules.banned_words)
            if banned:
                notes.append("banned: " + ", ".join(banned))
            print(f"{info.clip}\t{info.status}\t{'; '.join(notes)}")
        return 0
    except (CaptionError, CaptionerOutOfMemory, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
