"""The optimizer step of :class:`srpo_rl.optim.HostAdamW` against torch's fused AdamW on the same host tensors.

``--params-m`` million parameters in tensors of ``--tensor-m`` million (a 7B decoder's are 45-65 M), in
``--dtype`` on ``--device``, with gradients of their dtype. Rows, each the median of ``--repeats`` steps:

- ``bare fused AdamW``: torch's ``AdamW(fused=True)`` on fp32 host tensors with fp32 host gradients already
  there: the update alone, the ceiling of any host optimizer;
- ``HostAdamW``: a full step: the gradients to the host (from the GPU through pinned memory), widened to fp32,
  the same fused update on the master weights, the rounded weights back into the parameters;
- ``HostAdamW, fresh buffers``: the same with its host buffers dropped before every step, as a host optimizer
  that allocates its temporaries per step does (the first version of the class): fresh host memory pays a
  page fault per 4 KiB on first touch;
- ``HostAdamW, bf16 moments``: ``state_dtype=torch.bfloat16``, a full step with the moments widened to fp32
  and rounded back stochastically (two thirds of the host memory).

    python benchmarks/host_adamw.py                                   # 256 M bf16 parameters on the CPU
    python benchmarks/host_adamw.py --device cuda --params-m 2048     # bf16 on the GPU, the state on the host

Prints a table, then one JSON line with every figure, the machine, the versions and the command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from _common import command, machine, versions

from srpo_rl.optim import HostAdamW

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(optimizer, device: torch.device, repeats: int, before_step=lambda: None) -> float:
    """Median seconds of ``optimizer.step()`` after one untimed step (which creates the state)."""
    optimizer.step()
    times = []
    for _ in range(repeats):
        before_step()
        sync(device)
        t0 = time.perf_counter()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-m", type=float, default=256, help="million parameters (default 256)")
    parser.add_argument("--tensor-m", type=float, default=32, help="million parameters a tensor (default 32)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    size = int(args.tensor_m * 2**20)
    count = max(1, round(args.params_m * 2**20 / size))
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(size, generator=g).to(dtype).to(device)) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(size, generator=g).to(dtype).to(device)

    host = HostAdamW(params, lr=1e-4)
    rows = [{"case": "HostAdamW", "seconds": timed_steps(host, device, args.repeats)}]
    drop_buffers = lambda: host.__dict__.pop("_buffers", None)  # noqa: E731 - what HostAdamW reuses
    rows.append({"case": "HostAdamW, fresh buffers",
                 "seconds": timed_steps(host, device, args.repeats, before_step=drop_buffers)})
    masters = [host.state[p]["master"] for p in params]
    host_bytes = host.host_bytes()
    del host
    narrow = HostAdamW(params, lr=1e-4, state_dtype=torch.bfloat16)
    rows.append({"case": "HostAdamW, bf16 moments", "seconds": timed_steps(narrow, device, args.repeats),
                 "host_gib": narrow.host_bytes() / 2**30})
    del narrow
    for m in masters:
        m.grad = torch.randn(size, generator=g)
    bare = torch.optim.AdamW(masters, lr=1e-4, fused=True)
    rows.insert(0, {"case": "bare fused AdamW", "seconds": timed_steps(bare, torch.device("cpu"), args.repeats)})
    ceiling = rows[0]["seconds"]
    numel = count * size
    for row in rows:
        row["params_per_s_m"] = numel / row["seconds"] / 1e6
        row["vs_bare"] = ceiling / row["seconds"]

    print(f"\n{numel / 1e6:.0f} M {args.dtype} parameters on {device} ({count} tensors), AdamW state on the host "
          f"({host_bytes / 2**30:.1f} GiB), {torch.get_num_threads()} CPU threads, median of {args.repeats}")
    print(f"{'case':<26} {'step s':>8} {'M params/s':>11} {'vs bare':>8}")
    for row in rows:
        print(f"{row['case']:<26} {row['seconds']:>8.3f} {row['params_per_s_m']:>11.0f} {row['vs_bare']:>7.2f}x")
    print(json.dumps({"benchmark": "host_adamw", "params": numel, "tensors": count, "dtype": args.dtype,
                      "device": str(device), "host_gib": host_bytes / 2**30, "threads": torch.get_num_threads(),
                      "results": rows, "machine": machine(device), "versions": versions(("torch",)),
                      "command": command()}))


if __name__ == "__main__":
    main()
