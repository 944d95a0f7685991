"""Peak RSS of saving, loading and converting a model of a synthetic preset's shape (docs/checkpoints.md).

    PYTHONPATH=$PWD python scripts/measure_checkpoint_rss.py --preset llama-1b --dtype bf16 --work /tmp/rss

Each step runs in its own process and reports its peak resident set (ru_maxrss: anonymous memory plus
the pages of mapped files it touched), its wall time and the size of what it read or wrote:

    save      a model of random weights (made on the meta device, filled parameter by parameter in
              --dtype) written by save_model_dir (one file, then sharded with --shard-size)
    load      load_model_dir of each (meta device, assign=True, stored dtype)
    official  the model directory's tensors renamed to the official ARMT layout, streamed into one
              .safetensors checkpoint (graphs/tensorfile.write_file)
    convert   armt convert-official of that checkpoint (the streaming path)

Nothing here is a test: it measures, once, on the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def size_mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2 ** 20


def step(args: argparse.Namespace) -> dict:
    import torch
    from graphs.modeldir import load_model_dir, save_model_dir
    from graphs.synthetic import synthetic_config
    from graphs.tensorfile import parse_size
    work = Path(args.work)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    started = time.perf_counter()
    if args.step.startswith("save"):
        from graphs.model import ArmtModel
        cfg = synthetic_config(args.preset, segment_size=1024, num_mem_tokens=16, d_mem=64)
        model = ArmtModel(cfg, empty=True)
        gen = torch.Generator().manual_seed(0)
        for group in (model.globals, model.layers, model.mem):
            for name in list(group):
                want = torch.float32 if group is model.mem else dtype
                shape = group[name].shape
                t = torch.empty(shape, dtype=want)
                t.normal_(0.0, 0.02, generator=gen) if not name.endswith(("norm", "norm_w")) else t.fill_(1.0)
                group[name] = torch.nn.Parameter(t, requires_grad=False)
        shard = parse_size(args.shard_size) if args.step == "save-sharded" else None
        out = save_model_dir(model, work / args.step.replace("save", "model"), overwrite=True, shard_bytes=shard)
        what = out
    elif args.step.startswith("load"):
        what = work / args.step.replace("load", "model")
        model = load_model_dir(what)
        assert model.dtype == dtype, model.dtype
    elif args.step == "official":
        from graphs.checkpoint import OfficialNames
        from graphs.modeldir import load_config
        from graphs.tensorfile import read_dir, write_file
        src = work / "model"
        names = OfficialNames(load_config(src))
        tensors = read_dir(src)
        what = work / "official.safetensors"
        write_file(what, ((names.to_official(k), v) for k, v in tensors.items()), {"format": "pt"})
        (work / "base").mkdir(exist_ok=True)
        (work / "base" / "config.json").write_text((src / "config.json").read_text())
    elif args.step == "convert":
        from graphs.checkpoint import convert_official
        what = work / "official.safetensors"
        convert_official(what, work / "base", work / "converted", segment_size=1024, num_mem_tokens=16, d_mem=64,
                         overwrite=True)
    else:
        raise SystemExit(f"unknown step {args.step}")
    return {"step": args.step, "peak_rss_mib": round(peak_mib()), "seconds": round(time.perf_counter() - started, 1),
            "data_mib": round(size_mib(Path(what)))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--shard-size", default="1GB")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        print(json.dumps(step(args)))
        return 0
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows = []
    for s in ("save", "save-sharded", "load", "load-sharded", "official", "convert"):
        out = subprocess.run([sys.executable, __file__, "--step", s, "--preset", args.preset, "--dtype", args.dtype,
                              "--work", args.work, "--shard-size", args.shard_size],
                             check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
