"""LoRA files: what we save names real Wan modules, every format round-trips, and bad files are refused clearly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine.generate.lora_files import (
    ADAPTER_CONFIG_FILE,
    FORMATS,
    PEFT_TARGET_MODULES,
    LoraFileError,
    LoraMismatchError,
    check_keys_match_model,
    load_lora,
    parse_lora_state,
    save_lora,
    save_lora_file,
    to_original_module,
    wan_module_names,
)

RANK, ALPHA = 4, 8.0  # alpha != rank so every format has to carry the scale correctly


def random_peft_lora(transformer, seed: int = 0, rank: int = RANK, alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """A peft LoRA on a copy of `transformer` with random non-zero lora_B; returns peft's state dict."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    transformer = copy.deepcopy(transformer)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=PEFT_TARGET_MODULES,
                                       init_lora_weights=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return get_peft_model_state_dict(transformer)


def make_lora_dir(tiny_wan: str, out_dir, seed: int = 0, **metadata) -> "object":
    """Save a random LoRA for the tiny transformer with save_lora; returns the .safetensors path."""
    from engine.core.models import load_wan_transformer

    transformer = load_wan_transformer(tiny_wan, torch.float32)
    return save_lora(random_peft_lora(transformer, seed), out_dir, rank=RANK, alpha=ALPHA,
                     metadata={"base_model": tiny_wan, **metadata})


@pytest.fixture(scope="module")
def transformer(tiny_models):
    from engine.core.models import load_wan_transformer

    return load_wan_transformer(tiny_models.wan, torch.float32)


@pytest.fixture(scope="module")
def peft_state(transformer):
    return random_peft_lora(transformer)


def test_saved_keys_name_real_modules_under_original_wan_names(transformer, peft_state, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from safetensors.torch import load_file

    file = save_lora(peft_state, tmp_path / "epoch1", rank=RANK, alpha=ALPHA,
                     metadata={"base_model": "tiny", "steps": 12, "dataset": "abc123"})
    saved = load_file(file)
    # The tiny transformer's module tree, translated to the original Wan names.
    original_modules = set()
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("blocks."):
            try:
                original_modules.add(to_original_module(name))
            except KeyError:
                pass
    assert len(original_modules) == 2 * len(wan_module_names())  # 2 blocks x 12 Linears
    for key in saved:
        match = re.fullmatch(r"diffusion_model\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", key)
        assert match, key
        assert match.group(1) in original_modules, key
    assert {re.sub(r"\.(lora_[AB]\.weight|alpha)$", "", k)[len("diffusion_model."):] for k in saved} == original_modules
    # diffusers' own converter maps our file back onto exactly the modules peft adapted.
    converted = _convert_non_diffusers_wan_lora_to_diffusers(dict(saved))
    assert set(converted) == {f"transformer.{k}" for k in peft_state}


def test_save_writes_config_and_metadata(peft_state, tmp_path):
    from safetensors import safe_open

    file = save_lora(peft_state, tmp_path / "epoch2", rank=RANK, alpha=ALPHA,
                     metadata={"base_model": "/models/wan", "steps": 40, "dataset_fingerprint": "f00d"})
    assert file.name == "adapter_model.safetensors"
    config = json.loads((file.parent / ADAPTER_CONFIG_FILE).read_text())
    assert config["r"] == RANK and config["lora_alpha"] == RANK  # the tensors carry alpha/rank already
    assert set(config["target_modules"]) == set(wan_module_names())
    assert config["base_model_name_or_path"] == "/models/wan"
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    assert meta["steps"] == "40" and meta["dataset_fingerprint"] == "f00d" and meta["rank"] == str(RANK)
    assert meta["alpha"] == f"{ALPHA:g}" and meta["alpha_baked"] == "true"
    assert not list(file.parent.glob(".*"))  # no temporary files left behind


def test_save_accepts_peft_prefixes_and_adapter_names(peft_state, tmp_path):
    wrapped = {f"base_model.model.{k.replace('.weight', '.default.weight')}": v for k, v in peft_state.items()}
    a = load_lora(save_lora(wrapped, tmp_path / "a", rank=RANK, alpha=ALPHA))
    b = load_lora(save_lora(peft_state, tmp_path / "b", rank=RANK, alpha=ALPHA))
    assert a.modules.keys() == b.modules.keys()
    assert all(torch.equal(a.modules[n].up, b.modules[n].up) for n in a.modules)
    with pytest.raises(ValueError, match="rank=8"):
        save_lora(peft_state, tmp_path / "c", rank=8, alpha=8)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(peft_state, tmp_path, fmt):
    original = parse_lora_state(peft_state, default_alpha=ALPHA)
    file = save_lora_file(original, tmp_path / f"lora-{fmt}.safetensors", fmt, metadata={"note": "x"})
    back = load_lora(file)
    assert back.source_format == fmt
    expected = original.to_diffusers_peft()
    got = back.to_diffusers_peft()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    # diffusion-pipe's and diffusers' formats fold alpha/rank into lora_B; the others store alpha
    assert back.rank == RANK and back.alpha == (RANK if fmt in ("diffusion-pipe", "diffusers") else ALPHA)


def comfy_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight change per LoRA key base as ComfyUI's LoRA adapter computes it: up @ down * alpha/rank, where a module
    without a `.alpha` key gets alpha/rank = 1."""
    deltas = {}
    for key, up in state.items():
        match = re.fullmatch(r"(.+)\.(lora_up|lora_B)\.weight", key)
        if match:
            base = match.group(1)
            down = state[f"{base}.{'lora_down' if match.group(2) == 'lora_up' else 'lora_A'}.weight"]
            scale = float(state[f"{base}.alpha"]) / down.shape[0] if f"{base}.alpha" in state else 1.0
            deltas[base] = up.float() @ down.float() * scale
    return deltas


@pytest.mark.parametrize("fmt", ["diffusion-pipe", "comfy-down-up", "musubi"])
def test_comfyui_applies_the_trained_change_from_every_format_it_reads(peft_state, fmt):
    weights = parse_lora_state(peft_state, default_alpha=ALPHA)
    deltas = comfy_deltas(weights.state_dict(fmt))
    assert len(deltas) == len(weights.modules)
    for name, m in weights.modules.items():
        original = to_original_module(name)
        base = "lora_unet_" + original.replace(".", "_") if fmt == "musubi" else f"diffusion_model.{original}"
        torch.testing.assert_close(deltas[base], m.up @ m.down * (ALPHA / RANK))


def test_diffusion_pipe_layout_holds_only_what_diffusion_pipe_loads(peft_state, tmp_path):
    """diffusion-pipe's init_from_existing maps every key to a lora_A/lora_B parameter (an `.alpha` key stops it)
    and trains with alpha = rank, so our alpha/rank must already be in lora_B."""
    from safetensors.torch import load_file

    saved = load_file(save_lora(peft_state, tmp_path / "epoch1", rank=RANK, alpha=ALPHA))
    for key in saved:
        assert re.fullmatch(r"diffusion_model\.blocks\.\d+\.[\w.]+\.lora_[AB]\.weight", key), key
    for key, down in peft_state.items():
        if ".lora_A." in key:
            module = key.removesuffix(".lora_A.weight")
            base = f"diffusion_model.{to_original_module(module)}"
            torch.testing.assert_close(saved[f"{base}.lora_B.weight"] @ saved[f"{base}.lora_A.weight"],
                                       peft_state[f"{module}.lora_B.weight"] @ down * (ALPHA / RANK))


def test_diffusers_pipeline_file_keeps_its_alpha(peft_state, tmp_path):
    """diffusers' pipeline save_lora_weights keeps the adapter config in the header under `transformer.` keys."""
    from diffusers import WanImageToVideoPipeline
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PEFT_TARGET_MODULES).to_dict()
    WanImageToVideoPipeline.save_lora_weights(tmp_path, transformer_lora_layers=peft_state,
                                              transformer_lora_adapter_metadata=config)
    back = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert back.source_format == "diffusers" and back.alpha == ALPHA
    expected = parse_lora_state(peft_state, default_alpha=ALPHA).to_diffusers_peft()
    got = back.to_diffusers_peft()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_musubi_and_comfy_key_names(peft_state):
    weights = parse_lora_state(peft_state, default_alpha=ALPHA)
    musubi = weights.state_dict("musubi")
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in musubi
    assert "lora_unet_blocks_1_cross_attn_k_img.alpha" in musubi
    comfy = weights.state_dict("comfy-down-up")
    assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in comfy
    assert float(comfy["diffusion_model.blocks.0.self_attn.o.alpha"]) == ALPHA


def test_diffusers_load_lora_weights_accepts_every_format_alike(tiny_models, peft_state, tmp_path):
    """diffusers' WanImageToVideoPipeline loads our files; the output changes and is the same for every format."""
    from engine.core.models import load_wan_pipeline

    pipe = load_wan_pipeline(tiny_models.wan, torch.float32)
    weights = parse_lora_state(peft_state, default_alpha=ALPHA)
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 36, 3, 4, 6), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 512, 32), encoder_hidden_states_image=torch.randn(1, 17, 8),
                  return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        outputs = {}
        for fmt in FORMATS:
            file = save_lora_file(weights, tmp_path / f"{fmt}.safetensors", fmt)
            name = fmt.replace("-", "_")
            pipe.load_lora_weights(str(file), adapter_name=name)
            pipe.set_adapters(name, 1.0)
            outputs[fmt] = pipe.transformer(**inputs)[0]
    assert (outputs["diffusion-pipe"] - base).abs().max() > 1e-3
    for fmt in FORMATS:
        torch.testing.assert_close(outputs[fmt], outputs["diffusion-pipe"], rtol=1e-4, atol=1e-5)


def test_lora_for_another_model_is_rejected_naming_keys(transformer, peft_state):
    check_keys_match_model(parse_lora_state(peft_state), transformer)  # fits: no error
    check_keys_match_model(list(peft_state), transformer)
    # More blocks than the model has (e.g. a 14B LoRA on a smaller model).
    deeper = dict(peft_state)
    deeper["blocks.7.attn1.to_q.lora_A.weight"] = peft_state["blocks.0.attn1.to_q.lora_A.weight"]
    deeper["blocks.7.attn1.to_q.lora_B.weight"] = peft_state["blocks.0.attn1.to_q.lora_B.weight"]
    with pytest.raises(LoraMismatchError, match=r"blocks\.7\.self_attn\.q"):
        check_keys_match_model(deeper, transformer)
    # Same names, other width (e.g. a Wan 1.3B LoRA on the 14B model).
    wider = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in peft_state.items()}
    with pytest.raises(LoraMismatchError, match=r"other shapes: blocks\.0\.self_attn\.q"):
        check_keys_match_model(wider, transformer)


def test_lora_of_another_family_is_refused_naming_keys(tmp_path):
    from safetensors.torch import save_file

    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, str(sdxl))
    with pytest.raises(LoraFileError, match="lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"):
        load_lora(sdxl)


def test_corrupt_missing_and_pickled_files_are_refused(peft_state, tmp_path):
    file = save_lora(peft_state, tmp_path / "good", rank=RANK, alpha=ALPHA)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(LoraFileError, match="broken.safetensors.*corrupt"):
        load_lora(broken)
    with pytest.raises(LoraFileError, match="not found"):
        load_lora(tmp_path / "nothing.safetensors")
    pickled = tmp_path / "lora.pt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(LoraFileError, match="only .safetensors"):
        load_lora(pickled)
    assert load_lora(tmp_path / "good").path == file  # a run's epoch folder works as well as the file


def test_incomplete_pair_is_refused(peft_state):
    half = {k: v for k, v in peft_state.items() if k != "blocks.1.ffn.net.2.lora_B.weight"}
    with pytest.raises(LoraFileError, match=r"blocks\.1\.ffn\.2 has no lora_B"):
        parse_lora_state(half)


def test_cli_info_and_convert(peft_state, tmp_path, capsys):
    from engine.generate.lora_files import main

    file = save_lora(peft_state, tmp_path / "e", rank=RANK, alpha=ALPHA, metadata={"steps": 3})
    assert main(["convert", str(file), str(tmp_path / "m.safetensors"), "--format", "musubi"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "musubi" and info["rank"] == RANK and info["metadata"]["steps"] == "3"
    assert main(["info", str(tmp_path / "missing.safetensors")]) == 2
    capsys.readouterr()
    assert main(["info", str(ACCELERATOR)]) == 0
    accelerator = json.loads(capsys.readouterr().out)
    assert accelerator["diffs"] == 42 and "head.head" in accelerator["outside_blocks"]


# ---------------------------------------------------------------------------------------------- accelerator LoRAs

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ACCELERATOR = FIXTURES / "lightx2v_style_r4.safetensors"  # lora_down/up, diff_b, norm diffs, head/time/text LoRAs


def with_alpha(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The same LoRA with an `.alpha` beside every lora_down (alpha != rank: the scale must be applied)."""
    out = dict(state)
    for key in state:
        if key.endswith(".lora_down.weight"):
            out[key.removesuffix(".lora_down.weight") + ".alpha"] = torch.tensor(alpha)
    return out


def test_accelerator_layout_is_read_part_by_part():
    from safetensors.torch import load_file

    state = load_file(ACCELERATOR)
    weights = load_lora(ACCELERATOR)
    assert weights.source_format == "comfy-down-up" and weights.rank == 4 and weights.num_blocks == 2
    assert {"proj_out", "condition_embedder.time_embedder.linear_1", "condition_embedder.text_embedder.linear_2",
            "condition_embedder.time_proj"} <= set(weights.modules)
    # every .diff / .diff_b lands on a parameter, under diffusers' names (the original norm3 is diffusers' norm2)
    assert len(weights.diffs) == sum(k.endswith((".diff", ".diff_b")) for k in state)
    torch.testing.assert_close(weights.diffs["blocks.1.norm2.bias"], state["diffusion_model.blocks.1.norm3.diff_b"])
    torch.testing.assert_close(weights.diffs["blocks.0.attn2.norm_k.weight"],
                               state["diffusion_model.blocks.0.cross_attn.norm_k.diff"])
    torch.testing.assert_close(weights.diffs["proj_out.bias"], state["diffusion_model.head.head.diff_b"])
    # written back in ComfyUI's layout every key comes back (with an alpha per module); other formats refuse
    written = weights.state_dict("comfy-down-up")
    assert {k for k in written if not k.endswith(".alpha")} == set(state)
    with pytest.raises(LoraFileError, match=r"head\.head.*--format comfy-down-up"):
        weights.state_dict("diffusion-pipe")


def underscore_name(key: str, prefix: str) -> str:
    """'diffusion_model.blocks.0.norm3.diff_b' -> prefix + 'blocks_0_norm3.diff_b' (kohya-style module names)."""
    module, part = re.fullmatch(r"diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha|diff|diff_b)",
                                key).groups()
    return f"{prefix}{module.replace('.', '_')}.{part}"


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_unet__", "lycoris_"])
def test_every_underscore_prefix_comfyui_accepts_for_wan_loads(prefix):
    """kohya/musubi `lora_unet_`, Wan-Fun `lora_unet__` and SimpleTuner `lycoris_` names, as ComfyUI maps them."""
    from safetensors.torch import load_file

    state = with_alpha(load_file(ACCELERATOR), 8.0)
    renamed = {underscore_name(k, prefix): v for k, v in state.items()}
    assert f"{prefix}blocks_0_self_attn_q.lora_down.weight" in renamed
    expected, got = parse_lora_state(state), parse_lora_state(renamed)
    assert got.modules.keys() == expected.modules.keys() and got.diffs.keys() == expected.diffs.keys()
    assert all(m.alpha == 8.0 for m in got.modules.values())
    for name, m in got.modules.items():
        torch.testing.assert_close(m.up @ m.down, expected.modules[name].up @ expected.modules[name].down)


def test_a_folder_names_its_lora_file(peft_state, tmp_path):
    from engine.generate.lora_files import resolve_lora_file

    file = save_lora(peft_state, tmp_path / "epoch3", rank=RANK, alpha=ALPHA)
    assert resolve_lora_file(tmp_path / "epoch3") == file  # a diffusion-pipe / studio epoch folder
    single = tmp_path / "download"
    single.mkdir()
    (single / "wan_motion.safetensors").write_bytes(file.read_bytes())
    assert load_lora(single).path == single / "wan_motion.safetensors"
    (single / "other.safetensors").write_bytes(file.read_bytes())
    with pytest.raises(LoraFileError, match=r"2 \.safetensors files and no adapter_model.safetensors"):
        resolve_lora_file(single)
