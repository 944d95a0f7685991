"""Performance-log measurements for the fast executor: variants side by side, and a kernel profile.

    python -m armt.bench.ablation --synthetic llama-1b --tokens 131072 --device cuda --out DIR

Times the diagonal schedule with each optimisation switched off in turn (CUDA graphs, the Triton
SiLU*up kernel, TF32 memory matmuls), then profiles one steady-state step (top CUDA kernels), and
writes DIR/ablation.json. A development tool for docs/performance.md, not part of `armt`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from armt.bench.timing import measure
from armt.bench.workloads import build_model, on_device


def check_kernels(record: dict, dev: torch.device) -> None:
    """The Triton kernels against the eager torch ops they replace, on fresh random data (bf16)."""
    import runtimes.fast_torch as ft
    gu = torch.randn(3, 1000, 2 * 512, device=dev, dtype=torch.bfloat16) * 3
    eager = torch.nn.functional.silu(gu[..., :512]) * gu[..., 512:]
    fused = ft.silu_mul(gu)
    qkv = torch.randn(6, 100, 12, 64, device=dev, dtype=torch.bfloat16)
    ang = torch.rand(100, 32, device=dev) * 6
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
    x1, x2 = qkv[:, :, :10, :32], qkv[:, :, :10, 32:]
    c, s = cos[:, None], sin[:, None]
    ref = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    got = ft._triton_rope()(qkv.contiguous(), 10, cos.contiguous(), sin.contiguous())
    record["kernel_checks"] = {
        "silu_mul_max_abs_diff": float((fused.float() - eager.float()).abs().max()),
        "silu_mul_rel": float((fused.float() - eager.float()).abs().max() / eager.float().abs().max()),
        "rope_max_abs_diff": float((got.float() - ref.float()).abs().max()),
        "rope_rel": float((got.float() - ref.float()).abs().max() / ref.float().abs().max())}
    print("kernel checks:", record["kernel_checks"], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="llama-1b")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mem-std", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import runtimes.fast_torch as ft

    dev = torch.device(args.device)
    model = on_device(build_model(args.synthetic, None, 1024, 128, 64, 0.02, args.mem_std, 0), dev, args.precision)
    ids = torch.randint(0, model.cfg.base.vocab_size, (1, args.tokens), device=dev)
    record: dict = {"tokens": args.tokens, "precision": args.precision, "variants": {}}

    def time_variant(name: str, fx: ft.FastArmt) -> None:
        t = measure(lambda: fx.run(ids, "diagonal"), dev, 1, args.repeats)
        record["variants"][name] = {"median_ms": t.median_ms, "times_ms": t.times_ms}
        print(f"{name:<28} {t.median_ms:9.1f} ms", flush=True)

    check_kernels(record, dev)
    time_variant("all on", ft.FastArmt(model))
    time_variant("no CUDA graphs", ft.FastArmt(model, cuda_graphs=False))
    time_variant("exact fp32 memory (no TF32)", ft.FastArmt(model, exact_memory=True))
    fx = ft.FastArmt(model)
    fx.half_read = False
    time_variant("fp32/TF32 memory read", fx)
    saved = ft._SILU_MUL, ft._ROPE
    ft._SILU_MUL = False
    time_variant("eager silu*up", ft.FastArmt(model))
    ft._SILU_MUL, ft._ROPE = saved[0], False
    time_variant("eager rotary", ft.FastArmt(model))
    ft._SILU_MUL, ft._ROPE = saved

    # one steady-state step (all L layers), profiled eagerly
    fx = ft.FastArmt(model, cuda_graphs=False)
    fx.run(ids[:, : 1024 * (model.cfg.base.n_layers + 1)], "diagonal")
    L = model.cfg.base.n_layers
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), fx._precision():
        for _ in range(2):
            fx._cells(0, L - 1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fx._cells(0, L - 1)
            torch.cuda.synchronize()
    ops = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")),
                 key=lambda e: -e.self_device_time_total)[:15]
    record["ops"] = [{"name": e.key, "self_us_per_step": e.self_device_time_total / 5,
                      "calls_per_step": e.count / 5} for e in ops]
    for e in record["ops"]:
        print(f"{e['self_us_per_step']:9.1f} us  x{e['calls_per_step']:<4.0f} {e['name']}")
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 5
    kernels = [{"name": e.key[:90], "us_per_step": e.device_time_total / 5, "calls_per_step": e.count / 5}
               for e in events[:25]]
    record["steady_step_us"] = total
    record["kernels"] = kernels
    print(f"steady step (eager, device time): {total / 1e3:.2f} ms")
    for k in kernels:
        print(f"{k['us_per_step']:9.1f} us  x{k['calls_per_step']:<4.0f} {k['name']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
