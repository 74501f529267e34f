"""Where one fast transformer pass spends its time at 480x832x81 on the 14B I2V architecture, and the rates of its parts.

    python bench/generate_breakdown.py           # one H100: part rates, then a profiled fast pass with the LoRA
    python bench/generate_breakdown.py --tiny    # the same code on the tiny kit, on the CPU (no rates)

Part rates: cuDNN attention with the layout diffusers hands it (batch, tokens, heads, dim viewed as heads-first) and
contiguous; float8 matmuls with row-wise and tensor-wise scales at each block Linear's shape, q/k/v fused into one;
the row-wise activation quantisation; a rank-32 LoRA's two matmuls and its add. The pass profile groups GPU kernels
(attention, matmuls, fused Triton kernels, other) and compares their busy time with the pass's wall time (gaps are
host overhead). Also times a pass with the guidance batch (2) against two single passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate_step import LORA_RANK, build_pipeline, velocity_inputs, write_lora  # noqa: E402
from train_step import _time_cuda, video_tokens  # noqa: E402

GIB = 1024**3


def part_rates(tokens: int) -> list[tuple[str, float, str]]:
    """(part, milliseconds, note) for the pieces of one block at `tokens` tokens."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from engine.speed.float8 import FLOAT8_DTYPE, _quantize_rows

    rows: list[tuple[str, float, str]] = []
    d, ffn, heads = 5120, 13824, 40
    attn_flops = 4 * tokens * tokens * d
    for batch in (1, 2):
        bshd = [torch.randn(batch, tokens, heads, d // heads, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        layouts = {"as diffusers passes it (BSHD viewed BHSD)": [t.transpose(1, 2) for t in bshd],
                   "contiguous BHSD": [t.transpose(1, 2).contiguous() for t in bshd]}
        for backend_name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            for layout, (q, k, v) in layouts.items():
                if backend_name == "flash" and layout.startswith("contiguous"):
                    continue
                with sdpa_kernel([backend]):
                    s = _time_cuda(lambda: F.scaled_dot_product_attention(q, k, v), 5)
                rows.append((f"self-attention {backend_name}, batch {batch}, {layout}", s * 1e3,
                             f"{batch * attn_flops / s / 1e12:.0f} TFLOP/s"))
        del bshd, layouts
    torch.cuda.empty_cache()

    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    quantize = torch.compile(lambda t: _quantize_rows(t.float()))
    s = _time_cuda(lambda: quantize(x))
    rows.append(("row-wise float8 quantisation of a [tokens, 5120] activation (compiled)", s * 1e3,
                 f"{3 * x.numel() / s / 1e9:.0f} GB/s (2 B in, 1 B out)"))
    for name, k, n in (("q/k/v/o or cross q/o (5120->5120)", d, d), ("q,k,v fused (5120->15360)", d, 3 * d),
                       ("FFN up (5120->13824)", d, ffn), ("FFN down (13824->5120)", ffn, d)):
        a = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        flops = 2 * tokens * k * n
        s = _time_cuda(lambda: a @ w.t())
        rows.append((f"bf16 matmul {name}", s * 1e3, f"{flops / s / 1e12:.0f} TFLOP/s"))
        a8, w8 = a.to(FLOAT8_DTYPE), w.to(FLOAT8_DTYPE)
        row_a, row_w = torch.ones(tokens, 1, device="cuda"), torch.ones(1, n, device="cuda")
        one = torch.ones((), device="cuda")
        s = _time_cuda(lambda: torch._scaled_mm(a8, w8.t(), scale_a=row_a, scale_b=row_w, out_dtype=torch.bfloat16))
        rows.append((f"float8 matmul row-wise {name}", s * 1e3, f"{flops / s / 1e12:.0f} TFLOP/s"))
        s = _time_cuda(lambda: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        rows.append((f"float8 matmul tensor-wise {name}", s * 1e3, f"{flops / s / 1e12:.0f} TFLOP/s"))
        del a, w, a8, w8
    lora_a = torch.randn(LORA_RANK, d, device="cuda", dtype=torch.bfloat16)
    lora_b = torch.randn(d, LORA_RANK, device="cuda", dtype=torch.bfloat16)
    base = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    s = _time_cuda(lambda: base + (x @ lora_a.t()) @ lora_b.t() * 0.5)
    rows.append(("rank-32 LoRA on a 5120->5120 Linear: x@A, @B, scale, add (eager)", s * 1e3, "memory-bound"))
    s = _time_cuda(lambda: torch.addmm(base, x @ lora_a.t(), lora_b.t(), alpha=0.5))
    rows.append(("the same as x@A then addmm(out, h, B, alpha)", s * 1e3, "memory-bound"))
    return rows


def kernel_groups(prof) -> tuple[dict[str, float], float, list[tuple[str, float, int]]]:
    """Seconds per kernel group, busy seconds (union of kernel intervals) and the top kernels."""
    from torch.autograd import DeviceType

    groups: dict[str, float] = defaultdict(float)
    per_name: dict[str, list[float]] = defaultdict(list)
    intervals = []
    for event in prof.events():
        if event.device_type != DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        intervals.append((start, end))
        name = event.name
        per_name[name].append((end - start) / 1e6)
        lower = name.lower()
        if any(key in lower for key in ("fmha", "flash", "cudnn", "attn", "sdpa")):
            group = "attention"
        elif any(key in lower for key in ("gemm", "nvjet", "cutlass", "xmma", "gemv", "f8f8", "scaled_mm")):
            group = "matmul"
        elif "triton" in lower:
            group = "fused Triton (Inductor)"
        elif "memcpy" in lower or "memset" in lower:
            group = "copies"
        else:
            group = "other kernels"
        groups[group] += (end - start) / 1e6
    busy, last_end = 0.0, None
    for start, end in sorted(intervals):
        if last_end is None or start >= last_end:
            busy += end - start
            last_end = end
        elif end > last_end:
            busy += end - last_end
            last_end = end
    top = sorted(((name, sum(t), len(t)) for name, t in per_name.items()), key=lambda r: -r[1])[:25]
    return dict(groups), busy / 1e6, top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--no-rates", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    args = parser.parse_args(argv)

    from engine.generate.pipeline import apply_loras
    from engine.speed.inference import prepare_pipeline_for_inference

    device = "cpu" if args.tiny else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    frames, height, width = (9, 32, 32) if args.tiny else (81, 480, 832)
    tokens = video_tokens(frames, height, width)
    results: dict = {"config": {"frames": frames, "height": height, "width": width, "tokens": tokens}}
    if not args.tiny and not args.no_rates:
        rates = part_rates(tokens)
        results["part_rates"] = rates
        print("\n| part | ms | rate |\n|---|---|---|")
        for name, ms, note in rates:
            print(f"| {name} | {ms:.2f} | {note} |")
        print(flush=True)

    work = Path(tempfile.mkdtemp(prefix="genbreak-"))
    pipe = build_pipeline(args.tiny, device, work / "kits").to(device)
    lora = write_lora(pipe.transformer, work / "lora", 4 if args.tiny else LORA_RANK)
    prepare_pipeline_for_inference(pipe, **({"compile_backend": "aot_eager"} if args.tiny else {}))
    apply_loras(pipe, [(str(lora), 1.0)])
    x = velocity_inputs(pipe, frames, height, width, device, args.tiny)[0]

    def one_pass(inputs):
        with torch.inference_mode():
            out = pipe.transformer(**inputs, return_dict=False)[0]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    def wall(inputs, repeats=3) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            one_pass(inputs)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    started = time.perf_counter()
    one_pass(x)
    results["first_pass_s (compiles)"] = time.perf_counter() - started
    import torch._dynamo.utils as dynamo_utils

    results["dynamo_counters"] = {k: dict(v) for k, v in dynamo_utils.counters.items() if k in ("stats", "graph_break")}
    results["pass_s with LoRA"] = wall(x)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        one_pass(x)
        profiled_wall = time.perf_counter() - started
    if torch.cuda.is_available():
        groups, busy, top = kernel_groups(prof)
        results.update({"profiled_pass_s": profiled_wall, "kernel_busy_s": busy, "kernel_groups_s": groups,
                        "top_kernels": top})
    (args.out / "generate_breakdown_profile.txt").write_text(
        prof.key_averages().table(sort_by="cuda_time_total" if torch.cuda.is_available() else "cpu_time_total",
                                  row_limit=40, max_name_column_width=90))

    batch2 = {key: torch.cat([value, value]) for key, value in x.items()}
    one_pass(batch2)  # compiles the batch-2 shape
    results["pass_s batch 2 (both guidance branches at once)"] = wall(batch2)
    apply_loras(pipe, [])
    results["pass_s no LoRA"] = wall(x)
    if torch.cuda.is_available():
        results["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GIB
    (args.out / "generate_breakdown.json").write_text(json.dumps(results, indent=1, default=str))

    print("\n| measure | value |\n|---|---|")
    for key, value in results.items():
        if key in ("part_rates", "top_kernels", "kernel_groups_s", "config"):
            continue
        print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if "kernel_groups_s" in results:
        print("\n| kernel group | s per pass |\n|---|---|")
        for group, seconds in sorted(results["kernel_groups_s"].items(), key=lambda r: -r[1]):
            print(f"| {group} | {seconds:.3f} |")
        print("\n| kernel | s per pass | calls |\n|---|---|---|")
        for name, seconds, calls in results["top_kernels"]:
            print(f"| {name[:110]} | {seconds:.4f} | {calls} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
