"""What LoRA adapters cost a stack of Llama-2-7B decoder layers (or vision blocks), forward + backward and forward.

An adapted layer computes no base-weight gradient, a third of its products, but adds rank-``r`` products that each
read or write a full activation: bandwidth, not FLOPs. This script times that on ``--layers`` layers of the 7B's
shape (or, ``--stack vision``, SigLIP-so400m blocks, the larger of OpenVLA-OFT's two vision towers), bf16,
``--batch`` x ``--tokens`` tokens, SDPA attention, each row in the same run:

- ``full``: every weight trainable (full fine-tuning's forward + backward);
- ``frozen``: every weight frozen, no adapter, the input's gradient only: the floor any LoRA can reach;
- ``lora``: :func:`srpo_rl.lora.add_lora` at rank ``--rank`` on every linear layer (the library's forward: two
  custom ops, forward and backward, each accumulating the adapter's product in place into the base one, opaque to
  Inductor);
- ``lora_sum``: the library's previous forward: in place eager, a plain sum compiled, which Inductor rewrites as an
  out-of-place ``addmm`` that copies the base product first where the sum feeds q, k and v (the 7B's profile: 343
  copies, 3 % of its kernels);
- ``lora_outplace``: the same adapters, the sum by an out-of-place ``addmm`` (the library's first forward);
- ``lora_inplace``: the same adapters, the sum in place (``addmm_``) compiled too.

A hand-written backward as a ``torch.autograd.Function`` (the input's gradient accumulated in place) ran 1.01x the
in-place forward eager on an H100 (``docs/gpu_lora_overhead_llama_inplace_h100.json``, its ``lora_fn`` rows), too
little for its code; as the custom ops of the library's form, opaque to Inductor, it also removes the compiled
sum's copies: 1.02x compiled, 1.01x eager (``docs/gpu_lora_overhead_llama_op_h100.json``, where ``lora`` is the
form now called ``lora_sum`` and ``lora_op`` the library's).

Each in training (forward + backward of a fixed random output gradient) and in inference (``no_grad`` forward at
each of ``--infer-batches``, replayed from a CUDA graph as the rollout's policy runs), eager and, with
``--compile``, each layer compiled as :meth:`~srpo_rl.models.openvla_oft.OpenVLAOFT.compile_blocks` compiles the
7B's blocks. ``--profile`` adds, per row, the CUDA kernels that took the most time in one forward + backward and
one forward (``torch.profiler``).

    python benchmarks/lora_overhead.py --compile --profile   # CUDA, the 7B's layer shape
    python benchmarks/lora_overhead.py --tiny                # a small layer on the CPU (checks the script)

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from _common import command, machine, top_kernels, versions

from srpo_rl.lora import add_lora
from srpo_rl.models.openvla_oft_vision import SIGLIP_SO400M, Block, VisionTowerConfig

VARIANTS = ("full", "frozen", "lora", "lora_sum", "lora_outplace", "lora_inplace")


def lora_outplace_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer with the adapter's sum by an out-of-place ``addmm`` (copies the base product first)."""
    base = F.linear(x, self.weight, self.bias)
    down = F.linear(x, self.lora_A.to(x.dtype))
    up = (self.lora_B * self.lora_scaling).to(x.dtype)
    return torch.addmm(base.flatten(0, -2), down.flatten(0, -2), up.t()).view_as(base)


def lora_inplace_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The adapted layer with the adapter's product accumulated in place (``addmm_``), compiled or not."""
    rows = x.reshape(-1, x.shape[-1])
    out = F.linear(rows, self.weight, self.bias)
    out.addmm_(F.linear(rows, self.lora_A.to(x.dtype)), (self.lora_B * self.lora_scaling).to(x.dtype).t())
    return out.view(*x.shape[:-1], out.shape[-1])


def lora_sum_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The library's previous form: the adapter's product accumulated in place (``addmm_``) eager, a plain sum
    compiled, which Inductor rewrites as an out-of-place ``addmm`` (a copy of the base product) before q, k and v."""
    rows = x.reshape(-1, x.shape[-1])
    out = F.linear(rows, self.weight, self.bias)
    down = F.linear(rows, self.lora_A.to(x.dtype))
    up = (self.lora_B * self.lora_scaling).to(x.dtype)
    out = out + down @ up.t() if torch.compiler.is_compiling() else out.addmm_(down, up.t())
    return out.view(*x.shape[:-1], out.shape[-1])


FORWARDS = {"lora_sum": lora_sum_forward, "lora_outplace": lora_outplace_forward,
            "lora_inplace": lora_inplace_forward}


def llama_config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=4, num_key_value_heads=4)
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)


def vision_config(tiny: bool) -> VisionTowerConfig:
    if tiny:
        return VisionTowerConfig(embed_dim=48, depth=2, num_heads=2, mlp_hidden_dim=64, layer_scale=False)
    return SIGLIP_SO400M


def make_stack(config, layers: int, variant: str, rank: int, device, dtype) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    if isinstance(config, LlamaConfig):
        config._attn_implementation = "sdpa"
        blocks = [LlamaDecoderLayer(config, i) for i in range(layers)]
    else:
        blocks = [Block(config) for _ in range(layers)]
    stack = torch.nn.ModuleList(blocks).to(device, dtype)
    if variant.startswith("lora"):
        adapters = add_lora(stack, rank, 16.0, skip=())
        for module in stack.modules():
            if variant in FORWARDS and hasattr(module, "lora_A"):
                module.forward = types.MethodType(FORWARDS[variant], module)
        with torch.no_grad():  # B starts at zero; any value times the same
            for parameter in adapters[1::2]:
                parameter.normal_(0, 0.01)
    else:
        stack.requires_grad_(variant == "full")
    return stack


def run_stack(stack, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    for layer in stack:
        hidden = layer(hidden) if position_embeddings is None else layer(
            hidden, position_embeddings=position_embeddings)
    return hidden


def timed(fn, device, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def graphed(fn):
    """``fn`` captured in a CUDA graph and replayed, as the rollout runs the policy: a few layers' forward at small
    batches otherwise times the host's kernel launches, not the GPU."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(args, config, variant: str, compiled: bool, device, dtype) -> dict:
    stack = make_stack(config, args.layers, variant, args.rank, device, dtype)
    # every variant compiles the same layer code: without a reset, the later ones pass Dynamo's recompile limit
    # and silently run eager
    torch._dynamo.reset()
    if compiled:
        for layer in stack:
            layer.forward = torch.compile(layer.forward, dynamic=True)
    rotary = LlamaRotaryEmbedding(config).to(device) if isinstance(config, LlamaConfig) else None
    width = config.hidden_size if rotary is not None else config.embed_dim
    generator = torch.Generator(device).manual_seed(1)
    row = {"variant": variant, "compiled": compiled}

    hidden = torch.randn(args.batch, args.tokens, width, device=device, dtype=dtype,
                         generator=generator)
    grad = torch.randn_like(hidden) * 1e-3
    positions = torch.arange(args.tokens, device=device)[None]
    cos_sin = rotary(hidden, positions) if rotary is not None else None
    leaf = hidden.detach().requires_grad_(True)

    def train():
        run_stack(stack, leaf, cos_sin).backward(grad)
        leaf.grad = None
        for parameter in stack.parameters():
            parameter.grad = None

    row["train_ms"] = 1e3 * timed(train, device, args.repeats)
    if args.profile:
        row["train_profile"] = top_kernels(train, device)
    row["infer_ms"] = {}
    for batch in args.infer_batches:
        rows = torch.randn(batch, args.tokens, width, device=device, dtype=dtype, generator=generator)
        cos_sin_b = rotary(rows, positions) if rotary is not None else None

        @torch.no_grad()
        def infer(rows=rows, cos_sin_b=cos_sin_b):
            run_stack(stack, rows, cos_sin_b)

        row["infer_ms"][batch] = 1e3 * timed(graphed(infer) if device.type == "cuda" else infer, device,
                                             args.repeats)
    if args.profile:
        row["infer_profile"] = top_kernels(infer, device)
    del stack
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small layer on the CPU")
    parser.add_argument("--stack", choices=("llama", "vision"), default="llama",
                        help="Llama-2-7B decoder layers, or SigLIP-so400m vision blocks")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="rows of the training forward + backward")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens a row (default: 345, OpenVLA-OFT's prompt + patches; 256 patches for vision)")
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[2, 4, 16])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--compile", action="store_true", help="also each layer compiled")
    parser.add_argument("--profile", action="store_true", help="the top kernels of each eager row")
    args = parser.parse_args()
    variants = args.variants.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.layers, args.batch, args.infer_batches, args.repeats = 2, 2, [2], 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    config = llama_config(args.tiny) if args.stack == "llama" else vision_config(args.tiny)
    args.tokens = args.tokens or (16 if args.tiny else 345 if args.stack == "llama" else 256)

    rows = [measure(args, config, variant, compiled, device, dtype)
            for compiled in ([False, True] if args.compile else [False]) for variant in variants]
    floor = {r["compiled"]: r["train_ms"] for r in rows if r["variant"] == "frozen"}
    full = {r["compiled"]: r["train_ms"] for r in rows if r["variant"] == "full"}

    width = config.hidden_size if args.stack == "llama" else config.embed_dim
    print(f"\n{args.layers} {args.stack} layers ({width} wide), train batch {args.batch} x "
          f"{args.tokens} tokens, rank {args.rank}, {dtype}, {device.type}, median of {args.repeats}")
    header = "".join(f"{'infer ' + str(b) + ' ms':>14}" for b in args.infer_batches)
    print(f"{'variant':>13} {'compiled':>8} {'train ms':>9} {'vs full':>8} {'vs frozen':>9}{header}")
    for r in rows:
        vs_full = full[r["compiled"]] / r["train_ms"] if r["compiled"] in full else float("nan")
        vs_floor = r["train_ms"] / floor[r["compiled"]] if r["compiled"] in floor else float("nan")
        r["speed_vs_full"], r["time_vs_frozen"] = vs_full, vs_floor
        infer = "".join(f"{r['infer_ms'][b]:>14.2f}" for b in args.infer_batches)
        print(f"{r['variant']:>13} {str(r['compiled']):>8} {r['train_ms']:>9.2f} {vs_full:>8.2f} {vs_floor:>9.2f}"
              f"{infer}")
    for r in rows:
        for key in ("train_profile", "infer_profile"):
            if key in r:
                mode = "compiled" if r["compiled"] else "eager"
                print(f"\n{r['variant']} {mode} {key}: {r[key]['total_ms']:.2f} ms of kernels")
                for k in r[key]["kernels"]:
                    print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x  {k['name']}")
    print(json.dumps({"benchmark": "lora_overhead", "device": device.type, "stack": args.stack,
                      "layers": args.layers, "width": width, "batch": args.batch, "tokens": args.tokens,
                      "rank": args.rank,
                      "baseline": "full: every weight trainable, same run; frozen: no weight gradient (the floor)",
                      "rows": rows, "machine": machine(device), "versions": versions(("torch", "transformers")),
                      "command": command()}))


if __name__ == "__main__":
    main()
