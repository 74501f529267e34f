"""Every `python -m engine...` command the README names exists, with the subcommands and options it shows."""

from __future__ import annotations

import contextlib
import io
import re
import runpy
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MODULE = re.compile(r"(?:python -m|--module|\s-m)\s+(engine[\w.]*)(.*)")


def readme_commands() -> list[tuple[str, list[str], list[str]]]:
    """(module, subcommands, --options) of each command in the README's code blocks and inline code."""
    text = re.sub(r"\\\n\s*", " ", README.read_text(encoding="utf-8"))  # continued lines
    snippets = [line.split("  #")[0] for line in text.splitlines() if line.startswith("    ")]
    snippets += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", text)]
    commands = []
    for snippet in snippets:
        found = MODULE.search(snippet)
        if found:
            module, rest = found.group(1), found.group(2).split()
            subcommands = rest[0].split("|") if rest and re.fullmatch(r"[a-z][a-z|-]*", rest[0]) else []
            commands.append((module, subcommands, [t.split("=")[0] for t in rest if t.startswith("--")]))
    return commands


def help_text(module: str, argv: list[str]) -> str:
    """What `python -m module *argv --help` prints, run in this process (no interpreter start per command)."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [module, *argv, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = saved
    assert exited.value.code in (0, None), f"python -m {module} {' '.join(argv)} --help failed"
    return out.getvalue()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before it runs as __main__
def test_every_readme_command_exists_with_its_options():
    commands = readme_commands()
    modules = {module for module, _, _ in commands}
    assert {"engine.training", "engine.generate", "engine.generate.lora_files", "engine.training.config",
            "engine.core.models", "engine.clips", "engine.captions"} <= modules
    for module, subcommands, options in commands:
        for sub in subcommands or [None]:
            shown = help_text(module, [sub] if sub else [])
            missing = [option for option in options if option not in shown]
            assert not missing, f"README: `python -m {module} {sub or ''}` has no option {missing}"
