"""engine.speed on tiny Wan transformers with a peft LoRA: float8 weights, checkpointing, block swap, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.speed.blocks import (
    _SDPA_OPS,
    AccelError,
    BlockSwapper,
    _frozen_tensors,
    _keep_self_attention,
    compile_blocks,
    enable_checkpointing,
    offloaded_activation_bytes,
)
from engine.speed.float8 import Float8Linear, apply_float8_compute, apply_float8_storage, quantize_rowwise
from engine.speed.inference import apply_fast_inference

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.0.proj", "ffn.net.2"]


def _tiny_transformer(num_layers: int = 3, seed: int = 0):
    """A small WanTransformer3DModel with the image cross-attention, dims multiples of 16 (float8 matmul shapes)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=36, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=16, added_kv_proj_dim=32, rope_max_seq_len=64,
    ).float()


def _with_lora(transformer, seed: int = 1):
    """Freeze the base, add a rank-4 LoRA on every block Linear (as the trainer does) with non-zero B."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
            p.requires_grad_(True)
    return transformer


def _batch(seed: int = 2, frames: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 36, frames, 8, 8, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 512, 32, generator=gen),
        encoder_hidden_states_image=torch.randn(1, 5, 16, generator=gen),
    )


def _loss_and_grads(transformer, batch):
    transformer.zero_grad(set_to_none=True)
    out = transformer(**batch, return_dict=False)[0]
    target = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_same_grads(expected, actual, rtol=1e-4, atol=1e-6):
    assert expected.keys() == actual.keys()
    assert len(expected) > 0
    for name in expected:
        assert actual[name] is not None, name
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=atol, msg=name)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def _gradient_error(actual, expected):
    """Relative error of all LoRA gradients taken as one vector (single small tensors are noisy at float8)."""
    names = sorted(expected)
    return _relative_error(torch.cat([actual[n].flatten() for n in names]),
                           torch.cat([expected[n].flatten() for n in names]))


@pytest.fixture(scope="module")
def reference():
    model = _with_lora(_tiny_transformer())
    loss, grads = _loss_and_grads(model, _batch())
    return model, loss, grads


# ---------------------------------------------------------------------------------------------- float8

def test_quantize_rowwise_round_trip():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    q, scale = quantize_rowwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = q.float() * scale[:, None]
    per_row = ((back - w).norm(dim=1) / w.norm(dim=1))
    assert per_row.max() < 0.05  # e4m3 keeps 3 mantissa bits: a few percent, in every row


def test_float8_storage_after_peft_keeps_lora_and_loss(reference):
    model, loss, grads = reference
    f8 = copy.deepcopy(model)
    report = apply_float8_storage(f8, compute_dtype=torch.float32)
    assert report.mode == "storage" and report.converted == 3 * 12  # 12 base Linears per block
    assert report.bytes_after < report.bytes_before / 3
    for name, module in f8.named_modules():
        if name.endswith("base_layer") and ".blocks." in f".{name}":
            assert isinstance(module, Float8Linear), name
            assert module.weight.dtype == torch.float8_e4m3fn and not module.weight.requires_grad
        if "lora_A" in name and isinstance(module, nn.Linear):
            assert module.weight.dtype == torch.float32 and module.weight.requires_grad
    loss8, grads8 = _loss_and_grads(f8, _batch())
    assert abs(loss8 - loss) / loss < 0.02
    print("float8 storage: loss", (abs(loss8 - loss) / loss).item(), "grad", _gradient_error(grads8, grads))
    assert _gradient_error(grads8, grads) < 0.08


def test_float8_before_peft_gives_lora_the_compute_dtype():
    from peft import LoraConfig

    model = _tiny_transformer(num_layers=1).to(torch.bfloat16)
    model.requires_grad_(False)
    apply_float8_storage(model, compute_dtype=torch.bfloat16)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)  # not float8: peft reads `compute_dtype`
    out = model(**{k: v.to(torch.bfloat16) for k, v in _batch().items()}, return_dict=False)[0]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("float8_backward", [False, True])
def test_float8_compute_matches_storage_on_cpu(reference, float8_backward):
    model, loss, grads = reference
    storage, compute = copy.deepcopy(model), copy.deepcopy(model)
    apply_float8_storage(storage, compute_dtype=torch.float32)
    report = apply_float8_compute(compute, compute_dtype=torch.float32, float8_backward=float8_backward,
                                        require_float8_device=False)
    assert report.mode == "compute"
    assert all(m.scaled_mm and m.float8_backward == float8_backward
               for m in compute.modules() if isinstance(m, Float8Linear))
    loss_s, grads_s = _loss_and_grads(storage, _batch())
    loss_c, grads_c = _loss_and_grads(compute, _batch())
    assert abs(loss_c - loss_s) / loss_s < 0.02
    print("float8 compute: loss", (abs(loss_c - loss_s) / loss_s).item(), "grad", _gradient_error(grads_c, grads_s))
    assert _gradient_error(grads_c, grads_s) < 0.05


def test_float8_compute_falls_back_with_a_message_on_cpu():
    model = _tiny_transformer(num_layers=1)
    report = apply_float8_compute(model, compute_dtype=torch.float32)
    assert report.mode == "storage" and "float8 matmuls unavailable" in report.message
    assert all(not m.scaled_mm for m in model.modules() if isinstance(m, Float8Linear))


# ---------------------------------------------------------------------------------------------- checkpointing

@pytest.mark.parametrize("mode", ["full", "selective", "offload"])
def test_checkpoint_modes_give_the_same_gradients(reference, mode):
    model, loss, grads = reference
    ckpt = copy.deepcopy(model)
    enable_checkpointing(ckpt, mode)
    loss_c, grads_c = _loss_and_grads(ckpt, _batch())
    torch.testing.assert_close(loss_c, loss)
    _assert_same_grads(grads, grads_c)
    assert offloaded_activation_bytes(ckpt) == 0  # every stash was consumed by the backward pass


def test_offload_holds_block_inputs_on_host_until_backward(reference):
    model, _, _ = reference
    ckpt = copy.deepcopy(model)
    enable_checkpointing(ckpt, "offload")
    out = ckpt(**_batch(), return_dict=False)[0]
    tokens = 3 * 4 * 4
    assert offloaded_activation_bytes(ckpt) == 3 * tokens * 32 * 4  # 3 blocks x [1, tokens, 32] float32
    out.square().mean().backward()
    assert offloaded_activation_bytes(ckpt) == 0


def test_checkpointing_rejects_unknown_mode(reference):
    with pytest.raises(AccelError, match="unsloth"):
        enable_checkpointing(copy.deepcopy(reference[0]), "unsloth")


def test_selective_policy_saves_self_attention_only():
    from torch.utils.checkpoint import CheckpointPolicy

    op = next(iter(_SDPA_OPS))
    q, k_self, k_cross = torch.empty(1, 2, 48, 16), torch.empty(1, 2, 48, 16), torch.empty(1, 2, 517, 16)
    assert _keep_self_attention(None, op, q, k_self, k_self) == CheckpointPolicy.MUST_SAVE
    assert _keep_self_attention(None, op, q, k_cross, k_cross) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _keep_self_attention(None, torch.ops.aten.mm.default, q, q) == CheckpointPolicy.PREFER_RECOMPUTE


# ---------------------------------------------------------------------------------------------- block swap

@pytest.mark.parametrize("mode", ["offload", "full", "selective"])
def test_block_swap_gives_the_same_gradients(reference, mode):
    model, loss, grads = reference
    swapped = copy.deepcopy(model)
    enable_checkpointing(swapped, mode)
    swapper = BlockSwapper(swapped, blocks_to_swap=2, device="cpu")
    assert all(p.numel() == 0 for p in _frozen_tensors(swapped.blocks[0]))  # really moved out
    assert swapper.host_bytes > 0
    for step in range(2):  # the second step starts from the state the first one left
        loss_s, grads_s = _loss_and_grads(swapped, _batch())
        torch.testing.assert_close(loss_s, loss)
        _assert_same_grads(grads, grads_s)
    # step 1: forward loads 0 and 1, backward reloads 1 and 0; step 2 finds 0 still resident: 4 + 3 loads
    assert swapper.loads == 7
    assert swapper.resident <= {0, 1}
    assert all(p.numel() == 0 for p in _frozen_tensors(swapped.blocks[1]))


def test_block_swap_in_inference(reference):
    model, _, _ = reference
    swapped = copy.deepcopy(model)
    swapper = BlockSwapper(swapped, blocks_to_swap=3, device="cpu")
    with torch.no_grad():
        expected = model(**_batch(), return_dict=False)[0]
        for _ in range(2):
            torch.testing.assert_close(swapped(**_batch(), return_dict=False)[0], expected)
    assert swapper.resident == {2}


def test_block_swap_rejects_too_many_blocks(reference):
    with pytest.raises(AccelError, match="between 0 and 3"):
        BlockSwapper(copy.deepcopy(reference[0]), blocks_to_swap=4, device="cpu")


# ---------------------------------------------------------------------------------------------- compile

# aot_eager runs the autograd tracing that inductor uses (where the selective policy applies); eager is cheaper.
@pytest.mark.parametrize("mode,backend", [("selective", "aot_eager"), ("offload", "eager")])
def test_compiled_blocks_give_the_same_gradients(reference, mode, backend):
    model, loss, grads = reference
    compiled = copy.deepcopy(model)
    enable_checkpointing(compiled, mode)
    compile_blocks(compiled, backend=backend)
    torch._dynamo.reset()
    loss_c, grads_c = _loss_and_grads(compiled, _batch())
    torch.testing.assert_close(loss_c, loss)
    _assert_same_grads(grads, grads_c)


def test_fast_inference_lora_strength_changes_do_not_recompile():
    """Compiled blocks with a LoRA loaded afterwards: same output as eager, and new strengths never recompile."""
    from peft import LoraConfig
    from torch._dynamo.utils import counters

    eager, fast = _tiny_transformer(num_layers=2, seed=3), _tiny_transformer(num_layers=2, seed=3)
    report = apply_fast_inference(fast, compile_backend="eager")
    assert report.compiled and report.float8 is None and "float8 off" in report.notes[0]  # CPU: no float8 matmuls
    torch._dynamo.reset()
    counters.clear()
    for model in (eager, fast):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS), adapter_name="style")
        torch.manual_seed(5)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape) * 0.3
    with torch.no_grad():
        fast.set_adapters(["style"], [1.0])
        fast(**_batch(), return_dict=False)  # compiles
        assert not counters["graph_break"], dict(counters["graph_break"])  # each block is one whole graph
        frames_before = counters["stats"]["unique_graphs"]
        outputs = {}
        for strength in (0.0, 0.5, 1.5):
            for model in (eager, fast):
                model.set_adapters(["style"], [strength])
            outputs[strength] = fast(**_batch(), return_dict=False)[0]
            torch.testing.assert_close(outputs[strength], eager(**_batch(), return_dict=False)[0])
    assert counters["stats"]["unique_graphs"] == frames_before  # no new graphs for new strengths
    assert not torch.allclose(outputs[0.0], outputs[1.5])  # the strength really changes the output


def test_fast_inference_converts_a_freshly_loaded_transformer(monkeypatch):
    """from_pretrained leaves weights trainable; the fast path must still pack every block Linear into float8."""
    import engine.speed.float8 as float8
    import engine.speed.inference as fast_inference

    for module in (float8, fast_inference):
        monkeypatch.setattr(module, "float8_compute_support", lambda device=None: (True, ""))
    model, fast = _tiny_transformer(num_layers=2, seed=4), _tiny_transformer(num_layers=2, seed=4)
    assert all(p.requires_grad for p in fast.parameters())
    report = apply_fast_inference(fast, compile_backend="eager")
    torch._dynamo.reset()
    assert report.float8 is not None and report.float8.mode == "compute" and report.float8.converted == 2 * 12
    with torch.no_grad():
        out, expected = fast(**_batch(), return_dict=False)[0], model(**_batch(), return_dict=False)[0]
    assert _relative_error(out, expected) < 0.05
