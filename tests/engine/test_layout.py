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
