"""The engine is a library: it never imports gradio, directly or through another engine module."""

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def test_no_engine_source_imports_gradio():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "gradio" or n.startswith("gradio.") for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"engine imports gradio at {offenders}"


def test_importing_every_engine_module_leaves_gradio_unloaded():
    modules = sorted(".".join(p.relative_to(ENGINE.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in ENGINE.rglob("*.py"))
    assert "engine.core.models" in modules and "engine.training.__main__" in modules
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ENGINE.parent, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


# Folder names of the project outside runs/ (and of the studio home): only engine/core/layout.py joins them to a path.
LAYOUT_NAMES = {"sources", "clips", "cache", "outputs", "loras", "inputs", ".captions", "history", "originals",
                "latents", "text", "analysis", "previews", "cuts", "timestamps", "generate-frames", "models", "jobs",
                "demo", "caption_style.toml", "suggestions.jsonl"}


def test_only_the_layout_module_joins_project_folder_names():
    repo = ENGINE.parent
    sources = [*ENGINE.rglob("*.py"), *(repo / "tabs").rglob("*.py"), *(repo / "studio").rglob("*.py"),
               repo / "launch.py"]
    offenders = []
    for path in sources:
        if path == ENGINE / "core" / "layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant)
                    and node.right.value in LAYOUT_NAMES):
                offenders.append(f"{path.relative_to(repo)}:{node.lineno} / {node.right.value!r}")
    assert not offenders, f"paths joined outside engine/core/layout.py: {offenders}"


def test_layout_paths(tmp_path, monkeypatch):
    from engine.core.layout import Project, cache_dir_for_run, caption_file, studio_home

    project = Project.open(tmp_path / "p é")
    assert project.loras_dir == project.root / "loras" and project.output_inputs_dir.parent == project.outputs_dir
    assert project.cache.cut_list_file("film.mkv") == project.cache_dir / "cuts" / "film.mkv.txt"
    assert caption_file(project.clips_dir / "a b.mp4") == project.clips_dir / "a b.txt"
    assert cache_dir_for_run(project.run_dir("r")) == project.cache_dir  # a project's runs share its cache
    assert cache_dir_for_run(tmp_path / "loose run") == tmp_path / "loose run" / "cache"
    monkeypatch.delenv("WAN_STUDIO_HOME", raising=False)
    assert studio_home() == ENGINE.parent / "workspace"  # the repository's workspace/, as the README says


# File and folder names inside runs/<run>/: only engine/core/layout.py (RunLayout) joins them to a path.
RUN_LAYOUT_NAMES = {"run.toml", "dataset.toml", "metrics.jsonl", "tb", "state", "samples", "first_frame.png",
                    "job.json", "job.log", "job-exit.json", "stop-request.json", "adapter_model.safetensors"}
RUN_LAYOUT_PREFIXES = ("epoch", "step", "state.before-", "sample start")


def test_only_the_layout_module_joins_run_folder_names():
    repo = ENGINE.parent
    sources = [*ENGINE.rglob("*.py"), *(repo / "tabs").rglob("*.py"), *(repo / "studio").rglob("*.py")]
    own_format = ENGINE / "training" / "state.py"  # the resume-state format, inside state/: stepS/ and its files
    offenders = []
    for path in sources:
        if path in (ENGINE / "core" / "layout.py", own_format):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
                continue
            right = node.right
            if isinstance(right, ast.Constant) and right.value in RUN_LAYOUT_NAMES:
                offenders.append(f"{path.relative_to(repo)}:{node.lineno} / {right.value!r}")
            elif (isinstance(right, ast.JoinedStr) and right.values and isinstance(right.values[0], ast.Constant)
                  and str(right.values[0].value).startswith(RUN_LAYOUT_PREFIXES)):
                offenders.append(f"{path.relative_to(repo)}:{node.lineno} / f{right.values[0].value!r}...")
    assert not offenders, f"run-folder paths joined outside engine/core/layout.py: {offenders}"


def test_run_layout(tmp_path):
    from engine.core.layout import Project, RunLayout, saved_lora_of

    project = Project.open(tmp_path / "p é")
    run = project.run("r 1")
    assert run.root == project.runs_dir / "r 1" and run.cache_dir == project.cache_dir
    assert run.run_toml.parent == run.root and run.metrics_file.name == "metrics.jsonl"
    assert run.sample_file(3) == run.samples_dir / "epoch3.mp4"
    for folder in ("epoch1", "epoch2", "epoch10", "step40", "epochs-notes"):
        (run.root / folder).mkdir(parents=True)
        (run.root / folder / "adapter_model.safetensors").write_bytes(b"x")
    assert [(epoch, path.parent.name) for epoch, path in run.loras()] == [(1, "epoch1"), (2, "epoch2"),
                                                                         (10, "epoch10")]  # numbers, not text order
    assert saved_lora_of(run.step_dir(40) / "adapter_model.safetensors") == (run, "step", 40)
    assert saved_lora_of(run.root / "epochs-notes" / "adapter_model.safetensors") is None
    assert saved_lora_of(project.loras_dir / "style.safetensors") is None
    assert RunLayout(tmp_path / "loose").cache_dir == tmp_path / "loose" / "cache"
