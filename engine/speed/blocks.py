"""The per-block runner of the transformer and what wraps each block: activation checkpointing (full, selective:
keep attention, offloaded to CPU memory), block swap (frozen weights in CPU memory until the block runs), the
attention order, and regional compile."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

CheckpointMode = Literal["full", "selective", "offload"]


CHECKPOINT_MODES: tuple[str, ...] = ("full", "selective", "offload")


class AccelError(RuntimeError):
    """A speed/memory option that cannot be applied, with what to change."""


# ---------------------------------------------------------------------------------------------- block runner

def _blocks(transformer: nn.Module) -> nn.ModuleList:
    model = transformer
    # peft's PeftModel / LoraModel wrap the diffusers model: look through them.
    for attr in ("base_model", "model"):
        if not hasattr(model, "blocks") and hasattr(model, attr):
            model = getattr(model, attr)
    if not hasattr(model, "blocks"):
        raise AccelError(f"{type(transformer).__name__} has no `blocks`: expected a diffusers WanTransformer3DModel.")
    return model.blocks


def _attention_order():
    """SDPA backends, fastest first on Hopper: cuDNN attention ran at 573 TFLOP/s forward and 556 backward on an H100
    at 32,760 tokens where PyTorch's default (flash) ran at 372 and 316 (bench/RESULTS.md). Others stay as fallbacks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


def _run_block(forward: Callable, block: nn.Module, hidden_states, encoder_hidden_states, temb, rotary_emb):
    """The block's own forward: its instance `forward` is the runner, so the runner passes the class's function in
    (looked up inside a compiled graph, `type(block).forward` is a graph break)."""
    return forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)


def _sdpa_ops() -> set:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _keep_self_attention(ctx, op, *args, **kwargs):
    """Selective checkpoint policy: save self-attention results (quadratic cost); recompute everything else.

    Cross-attention (keys from 769 context tokens) is cheap to recompute and not worth its memory.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _SDPA_OPS and args[0].shape[-2] == args[1].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_SDPA_OPS = _sdpa_ops()


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_self_attention)


def _run_block_ordered(forward: Callable, block: nn.Module, hidden_states, encoder_hidden_states, temb, rotary_emb):
    with _attention_order():
        return _run_block(forward, block, hidden_states, encoder_hidden_states, temb, rotary_emb)


def _selective(body: Callable) -> Callable:
    def run(forward, block, hidden_states, encoder_hidden_states, temb, rotary_emb):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(body, forward, block, hidden_states, encoder_hidden_states, temb, rotary_emb,
                          use_reentrant=False, context_fn=_selective_context)
    return run


class _RecomputedBlock(torch.autograd.Function):
    """Runs a block without keeping activations; backward reruns it from its saved input (on GPU or CPU).

    `anchor` is a tensor that requires grad, so the output requires grad even when the block's input does not
    (the first block): the LoRA inside still gets its gradients.
    """

    @staticmethod
    def forward(ctx, runner, anchor, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin):
        ctx.runner = runner
        ctx.autocast = _autocast_state(hidden_states.device.type)
        with torch.no_grad():
            out = runner.body(runner.block_forward, runner.block, hidden_states, encoder_hidden_states, temb,
                              (rope_cos, rope_sin))
        if runner.offloader is not None:
            ctx.stash = runner.offloader.stash(hidden_states)
            ctx.save_for_backward(encoder_hidden_states, temb, rope_cos, rope_sin)
        else:
            ctx.stash = None
            ctx.save_for_backward(hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        runner = ctx.runner
        saved = list(ctx.saved_tensors)
        hidden_states = runner.offloader.fetch(ctx.stash) if ctx.stash is not None else saved.pop(0)
        ctx.stash = None
        # the block input always takes a gradient here, so the compiled body sees one variant for every block
        needs = (True, *ctx.needs_input_grad[3:])
        inputs = [t.detach().requires_grad_(need) for t, need in zip([hidden_states, *saved], needs)]
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled), _attention_order():
            x, ehs, temb, cos, sin = inputs
            out = runner.body(runner.block_forward, runner.block, x, ehs, temb, (cos, sin))
        torch.autograd.backward(out, grad_out)
        grads = [t.grad if need else None for t, need in zip(inputs, ctx.needs_input_grad[2:])]
        return (None, None, *grads)


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _BlockRunner:
    """Installed as a block's `forward`: swap hooks, checkpoint mode and the (possibly compiled) block body."""

    def __init__(self, block: nn.Module, index: int):
        self.block, self.index = block, index
        self.block_forward = type(block).forward
        self.checkpoint: str | None = None
        self.offloader: _ActivationOffloader | None = None
        self.swapper: BlockSwapper | None = None
        self.compile_options: dict | None = None
        self.inference_lora = False  # LoRA strengths as tensors: changing them never recompiles
        self.body: Callable = _run_block
        self.selective_body: Callable = _run_block_selective_eager
        self._anchor = None

    def rebuild(self) -> None:
        """Recompile (or not) after a change of checkpoint mode or compile options."""
        if self.compile_options is None:
            self.body, self.selective_body = _run_block, _run_block_selective_eager
        else:
            self.body = _compiled(_run_block, self.compile_options)
            self.selective_body = _compiled(_run_block_selective, self.compile_options)

    def __call__(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        with _attention_order():  # compiled graphs take the backend chosen while they are traced
            return self._call(hidden_states, encoder_hidden_states, temb, rotary_emb)

    def _call(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        if self.swapper is not None:
            self.swapper.before_block(self.index, backward=False)
        if self.inference_lora and self.compile_options is not None:
            _prepare_lora_layers(self.block)
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.block.parameters())
        if not training or self.checkpoint is None:
            out = self.body(self.block_forward, self.block, hidden_states, encoder_hidden_states, temb, rotary_emb)
        elif self.checkpoint == "selective":
            if not hidden_states.requires_grad:  # first block: same compiled variant as the others
                hidden_states = hidden_states.detach().requires_grad_()
            out = self.selective_body(self.block_forward, self.block, hidden_states, encoder_hidden_states, temb,
                                      rotary_emb)
        else:
            cos, sin = rotary_emb
            out = _RecomputedBlock.apply(self, self._grad_anchor(hidden_states.device), hidden_states,
                                         encoder_hidden_states, temb, cos, sin)
        if self.swapper is not None and out.requires_grad:
            index, swapper = self.index, self.swapper
            out.register_hook(lambda grad: swapper.before_block(index, backward=True))
        return out

    def _grad_anchor(self, device: torch.device) -> torch.Tensor:
        if self._anchor is None or self._anchor.device != device:
            self._anchor = torch.zeros((), device=device, requires_grad=True)
        return self._anchor


def _plain_lora_linear(module: nn.Module) -> bool:
    """A peft LoRA Linear without DoRA, LoRA bias or transposed weights: the kind traced into the graph."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (type(module) is LoraLinear and not any(module.use_dora.values()) and not module.fan_in_fan_out
            and not any(getattr(module, "lora_bias", {}).values()))


def _lora_forward_in_graph(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA Linear forward for inference, reading each adapter's strength from a 0-d tensor.

    peft keeps strengths as Python floats, which a compiled graph would bake in (a new strength = a recompile);
    a tensor is an input of the graph instead, so strength changes cost nothing and the LoRA add is fused.
    """
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    strengths = self.__dict__["_accel_strengths"]
    for name in self.active_adapters:
        if name not in self.lora_A.keys():
            continue
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        update = lora_b(lora_a(x.to(lora_a.weight.dtype)))
        result = result + (update * strengths[name]).to(result.dtype)
    return result


def _prepare_lora_layers(block: nn.Module) -> None:
    """Give every LoRA layer of `block` the tensor-strength forward (other LoRA kinds run outside the graph) and
    copy peft's current strengths into the tensors. LoRA layers appear whenever an adapter is loaded, so this runs
    before every call (a walk over the block's modules, no GPU sync)."""
    for module in block.modules():
        if not hasattr(module, "lora_A"):
            continue
        if "_accel_strengths" not in module.__dict__:
            if _plain_lora_linear(module):
                module.__dict__["_accel_strengths"] = {}
                module.__dict__["_accel_values"] = {}
                module.forward = types.MethodType(_lora_forward_in_graph, module)
            else:
                module.forward = torch.compiler.disable(module.forward, recursive=False)
                module.__dict__["_accel_strengths"] = None
        strengths = module.__dict__["_accel_strengths"]
        if strengths is None:
            continue
        values = module.__dict__["_accel_values"]
        for name in module.active_adapters:
            if name in module.lora_A.keys() and values.get(name) != module.scaling[name]:
                if name not in strengths:
                    strengths[name] = torch.zeros((), device=module.lora_A[name].weight.device)
                strengths[name].fill_(module.scaling[name])
                values[name] = module.scaling[name]


def _compiled(fn: Callable, options: dict) -> Callable:
    """One compiled function per (body, options), shared by all blocks so the graph is compiled once."""
    key = (fn, tuple(sorted(options.items())))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, **options)
    return _COMPILED[key]


def _runners(transformer: nn.Module) -> list[_BlockRunner]:
    """The runner of each block, installing one on first use."""
    runners = []
    for index, block in enumerate(_blocks(transformer)):
        runner = block.__dict__.get("forward")
        if not isinstance(runner, _BlockRunner):
            runner = _BlockRunner(block, index)
            block.forward = runner
        runners.append(runner)
    return runners


# ---------------------------------------------------------------------------------------------- compile

def compile_blocks(transformer: nn.Module, *, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool = False) -> None:
    """Regional torch.compile: the block body is compiled once and shared by all blocks.

    Composes with checkpointing (for 'selective' the checkpoint itself is compiled, so the save policy applies
    inside the graph) and with block swap (swap hooks stay outside the compiled code).
    """
    options = {"backend": backend, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    for runner in _runners(transformer):
        runner.compile_options = options
        runner.rebuild()


# Compiled, the attention backend is fixed when the graph (recompute included) is traced inside the runner's
# context. Eager, the recompute runs later in backward and must choose the same backend as the forward did, or the
# saved attention results are not found: so the body enters the context itself.
_run_block_selective = _selective(_run_block)


_run_block_selective_eager = _selective(_run_block_ordered)


_COMPILED: dict[tuple, Callable] = {}


# ---------------------------------------------------------------------------------------------- checkpointing

class _Stash:
    __slots__ = ("host", "copied", "device_copy", "ready", "previous")

    def __init__(self, host, copied, previous):
        self.host, self.copied, self.previous = host, copied, previous
        self.device_copy = self.ready = None


class _ActivationOffloader:
    """Keeps checkpointed block inputs in pinned CPU memory; brings the next one back one block ahead in backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last: _Stash | None = None
        self.host_bytes = 0

    def stash(self, tensor: torch.Tensor) -> _Stash:
        if self.stream is None:
            entry = _Stash(tensor.detach().clone(), None, self.last)
        else:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(tensor.detach(), non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.stream)
            tensor.record_stream(self.stream)
            entry = _Stash(host, copied, self.last)
        self.host_bytes += entry.host.numel() * entry.host.element_size()
        self.last = entry
        return entry

    def _bring_back(self, entry: _Stash) -> None:
        if entry.device_copy is not None or entry.host is None:
            return
        if self.stream is None:
            entry.device_copy = entry.host
            return
        with torch.cuda.stream(self.stream):  # after its own device->host copy: same stream
            entry.device_copy = entry.host.to(self.device, non_blocking=True)
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def fetch(self, entry: _Stash) -> torch.Tensor:
        self._bring_back(entry)
        if entry.previous is not None:
            self._bring_back(entry.previous)  # the block before runs its backward next
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            entry.device_copy.record_stream(torch.cuda.current_stream(self.device))
        tensor = entry.device_copy
        self.host_bytes -= entry.host.numel() * entry.host.element_size()
        entry.host = entry.device_copy = entry.previous = None
        if self.last is entry:
            self.last = None
        return tensor


def enable_checkpointing(transformer: nn.Module, mode: CheckpointMode | None) -> None:
    """Activation checkpointing of every block: 'full', 'selective', 'offload', or None to turn it off.

    - 'full': keep only each block's input; recompute the block in backward (least GPU memory of the on-GPU modes).
    - 'selective': also keep the self-attention results, so backward recomputes only the cheap parts
      (about 13 % fewer FLOPs per step at 480x832x81; costs one [tokens x 5120] tensor per block).
    - 'offload': as 'full', with the block inputs in pinned CPU memory (copied on a side stream, brought back one
      block ahead in backward): activations take almost no GPU memory.
    Replaces diffusers' own `gradient_checkpointing` (turned off here so blocks are not checkpointed twice).
    """
    if mode is not None and mode not in CHECKPOINT_MODES:
        raise AccelError(f"Unknown activation checkpointing mode {mode!r}; use one of {', '.join(CHECKPOINT_MODES)}.")
    model = _blocks(transformer)  # validates
    del model
    for module in (transformer, getattr(transformer, "base_model", None), getattr(transformer, "model", None)):
        if module is not None and hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    device = next(p.device for p in transformer.parameters())
    offloader = _ActivationOffloader(device) if mode == "offload" else None
    for runner in _runners(transformer):
        runner.checkpoint = mode
        runner.offloader = offloader


def offloaded_activation_bytes(transformer: nn.Module) -> int:
    """Bytes of block inputs currently held in CPU memory by the 'offload' mode (0 otherwise)."""
    runner = _runners(transformer)[0]
    return runner.offloader.host_bytes if runner.offloader is not None else 0


# ---------------------------------------------------------------------------------------------- block swap

class BlockSwapper:
    """Keeps the frozen weights of `blocks_to_swap` blocks in (pinned) CPU memory and streams them in when needed.

    Before block i runs (forward, or its backward when the gradient of its output arrives) its weights are made
    resident, block i+1 (forward) or i-1 (backward) starts copying on a side CUDA stream, and any other swapped
    block is dropped from the GPU. So at most two swapped blocks occupy GPU memory at a time. Trainable parameters
    (the LoRA) stay on the GPU. In training, swapped blocks need activation checkpointing (their weights are gone
    between forward and backward); `enable_checkpointing` must be on. The first blocks are the swapped ones.
    On a CPU the same hooks run and "loading" points the parameters at the stored tensors.
    """

    def __init__(self, transformer: nn.Module, blocks_to_swap: int, device: torch.device | str):
        blocks = _blocks(transformer)
        if not 0 <= blocks_to_swap <= len(blocks):
            raise AccelError(f"blocks_to_swap must be between 0 and {len(blocks)} (the number of transformer blocks); "
                             f"got {blocks_to_swap}.")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.swapped = set(range(blocks_to_swap))
        self.stores: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.loads = 0
        for index in sorted(self.swapped):
            self.stores[index] = [(t, self._to_host(t)) for t in _frozen_tensors(blocks[index])]
            self._evict(index)
        self.resident: set[int] = set()
        for runner in _runners(transformer):
            runner.swapper = self if blocks_to_swap else None
        if self.cuda:
            torch.cuda.empty_cache()

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().to("cpu", copy=True)
        return host.pin_memory() if self.cuda else host

    @property
    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for store in self.stores.values() for _, h in store)

    def _evict(self, index: int) -> None:
        event = self.ready.pop(index, None)
        if event is not None:  # a prefetch nobody waited for: its copy must finish before the memory is reused
            torch.cuda.current_stream(self.device).wait_event(event)
        for tensor, host in self.stores[index]:
            tensor.data = torch.empty(0, dtype=host.dtype, device=self.device)

    def _load(self, index: int) -> None:
        self.loads += 1
        if not self.cuda:
            for tensor, host in self.stores[index]:
                tensor.data = host
            self.ready[index] = None
            return
        compute = torch.cuda.current_stream(self.device)
        targets = [torch.empty(host.shape, dtype=host.dtype, device=self.device) for _, host in self.stores[index]]
        self.stream.wait_stream(compute)  # the memory may have just been freed by kernels still queued there
        with torch.cuda.stream(self.stream):
            for target, (_, host) in zip(targets, self.stores[index]):
                target.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        for target, (tensor, _) in zip(targets, self.stores[index]):
            tensor.data = target
        self.ready[index] = event

    def before_block(self, index: int, backward: bool) -> None:
        """Make block `index` resident, prefetch the next one in this direction, drop the rest."""
        step = -1 if backward else 1
        wanted = {index, index + step} & self.swapped
        for other in sorted(self.resident - wanted):
            self._evict(other)
            self.resident.discard(other)
        for target in (index, index + step):
            if target in self.swapped and target not in self.resident:
                self._load(target)
                self.resident.add(target)
        event = self.ready.pop(index, None) if index in self.swapped else None
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


def _frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    tensors = [p for p in block.parameters() if not p.requires_grad]
    tensors += [b for b in block.buffers() if b.numel() > 0]
    return tensors
