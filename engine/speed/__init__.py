"""Speed and memory tools for the Wan transformer, used by training and generate (and knowing neither).

`float8`: float8 base weights. `blocks`: the block runner, checkpointing, block swap, compile. `inference`: the fast
generation path. Reads and writes nothing on disk.

- float8 base weights: frozen block Linears stored as float8 e4m3 with one scale per output row, either computed in
  bf16 after dequantising (`apply_float8_storage`, any device) or with float8 matmuls on Hopper
  (`apply_float8_compute`, `torch._scaled_mm` with row-wise scales). Backward gives only the input gradient (the
  base weights are frozen), so a LoRA upstream trains; LoRA layers themselves are never converted.
- activation checkpointing of the transformer blocks (`enable_checkpointing`): 'full' recomputes the whole block,
  'selective' keeps the self-attention outputs (the expensive part) and recomputes the rest, 'offload' recomputes
  the whole block and keeps its saved input in pinned CPU memory.
- `BlockSwapper`: the frozen weights of N blocks live in pinned CPU memory and are copied to the GPU on a side
  stream one block ahead of use (forward and backward), then dropped again.
- `compile_blocks`: regional `torch.compile` of the block body (one graph shared by all blocks).
- `apply_fast_inference`: what the generation path applies (float8 matmuls where the card has them, compiled blocks).

Every tool works after peft has wrapped the Linears: peft's `lora.Linear` keeps the original Linear as
`base_layer`, and that is what gets converted or swapped. Order when combining: float8 first, then LoRA (any time),
then checkpointing, block swap and compile. On a CPU every path runs (the swapper's copies become plain tensor
swaps), so the CPU tests exercise the same logic as the GPU.
"""
