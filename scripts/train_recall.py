"""Train the demo ARMT (a small LLaMA-based ARMT) on associative recall across segments.

    python scripts/train_recall.py --out my-armt-recall --device cuda --time-limit 480
    python scripts/train_recall.py --out models/armt-recall --overwrite ...   # replace the shipped model
    python scripts/train_recall.py --out /tmp/armt-recall --device cpu --steps 20      # smoke test

The model must carry key-value pairs through its memory: the query segment holds no values (see
graphs/recall.py). Curriculum: every step draws its number of segments uniformly from
2..`stage` and raises `stage` by one (up to --segments) once the recent accuracy at `stage`
passes --promote. Only the query segment's logits are scored (cross-entropy at the query places).

The training forward is the diagonal schedule written out for full segments (no padding, one
slot shape), on the model's own `embed` / `geometry` / `cells` / `head`: the same math as
`ArmtModel.forward`, without its per-row bookkeeping. The final numbers are measured with the real
`ArmtModel.forward(schedule="diagonal")` and written to metrics.json next to the model directory.

Periodically (--save-every seconds) and at the end the best model so far is written atomically to
--out (graphs.modeldir.save_model_dir, plus recall_task.json), so a run killed at its time limit
still leaves a usable model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphs.atomic import atomic_write_bytes  # noqa: E402
from graphs.config import ArmtConfig, ModelConfig, parse_base_config  # noqa: E402
from graphs.model import ArmtModel  # noqa: E402
from graphs.modeldir import save_model_dir  # noqa: E402
from graphs.schedule import build_schedule  # noqa: E402
from graphs.recall import RecallBatch, RecallTask, make_batch, score  # noqa: E402

log = logging.getLogger("train_recall")

TASK_FILE = "recall_task.json"


def build_config(task: RecallTask, d_model: int, layers: int, heads: int, kv_heads: int, d_ff: int,
                 mem_tokens: int, d_mem: int) -> ModelConfig:
    hf = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=task.vocab_size,
              hidden_size=d_model, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, intermediate_size=d_ff, hidden_act="silu", rms_norm_eps=1e-6,
              rope_theta=10000.0, tie_word_embeddings=False,
              max_position_embeddings=task.segment_size + mem_tokens, bos_token_id=None, eos_token_id=None)
    base = parse_base_config(hf)
    return ModelConfig(base, ArmtConfig("llama", task.segment_size, mem_tokens, d_mem))


def query_logits(model: ArmtModel, ids: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Logits of the last segment only. ids (B, S*T) of full segments -> (B, T, V).

    Diagonal schedule (graphs/schedule.py): each step's active layers lo..hi work on their segments in
    one batched `cells` call; every slot is full, so one rotary table and mask serve all of them."""
    T, M, L = model.cfg.armt.segment_size, model.cfg.armt.num_mem_tokens, model.cfg.base.n_layers
    B, N = ids.shape
    S = N // T
    dev = model.device
    pos = torch.arange(T + M, device=dev)[None].expand(B, T + M)  # (B, P)
    kv = torch.ones(L, B, T + M, dtype=torch.bool, device=dev)
    (cos, sin), allowed = model.geometry(pos[None].expand(L, B, T + M), kv)  # (L, B, 1, P, hd), (L, B, 1, P, P)
    st = model.zero_state(B)
    A, z, wr = list(st.A.unbind(0)), list(st.z.unbind(0)), list(st.written.unbind(0))
    write = torch.ones(L, B, dtype=torch.bool, device=dev)
    outs: list[torch.Tensor | None] = [None] * L  # outs[l]: layer l's output at the previous step
    for step in build_schedule("diagonal", L, S).steps:
        lo, hi = step.lo, step.hi
        n = hi - lo + 1
        inputs = [outs[l - 1] if l > 0 else None for l in range(lo, hi + 1)]
        if step.entering is not None:
            t = step.entering
            inputs[0] = model.embed(ids[:, t * T:(t + 1) * T], pos)  # (B, P, d)
        y, a_n, z_n, w_n = model.cells(lo, hi + 1, torch.stack(inputs), (cos[:n], sin[:n]), allowed[:n],
                                       torch.stack(A[lo:hi + 1]), torch.stack(z[lo:hi + 1]),
                                       torch.stack(wr[lo:hi + 1]), write[:n], fused)
        for i, l in enumerate(range(lo, hi + 1)):
            outs[l], A[l], z[l], wr[l] = y[i], a_n[i], z_n[i], w_n[i]
    logits, _ = model.head(outs[L - 1][:, :T])
    return logits  # (B, T, V)


def batch_loss(model: ArmtModel, batch: RecallBatch, fused: bool) -> tuple[torch.Tensor, int, int]:
    dev = model.device
    ids = torch.from_numpy(batch.input_ids).to(dev)
    logits = query_logits(model, ids, fused=fused)  # (B, T, V)
    off = (batch.n_segments - 1) * batch.segment_size
    qpos = torch.from_numpy(np.where(batch.query_valid, batch.query_pos - off, 0)).to(dev)  # (B, Q)
    valid = torch.from_numpy(batch.query_valid).to(dev)
    answers = torch.from_numpy(batch.answers).to(dev)
    picked = torch.gather(logits, 1, qpos[..., None].expand(-1, -1, logits.shape[-1]))  # (B, Q, V)
    loss = F.cross_entropy(picked[valid].float(), answers[valid])
    right = int(((picked.argmax(-1) == answers) & valid).sum())
    return loss, right, int(valid.sum())


@torch.no_grad()
def fast_accuracy(model: ArmtModel, task: RecallTask, n_segments: int, n_pairs: int, rows: int,
                  seed: int, fused: bool, chunk: int = 512) -> float:
    rng = np.random.default_rng(seed)
    right = total = 0
    for start in range(0, rows, chunk):
        b = make_batch(task, min(chunk, rows - start), n_segments, n_pairs, rng)
        _, r, t = batch_loss(model, b, fused)
        right, total = right + r, total + t
    return right / max(total, 1)


@torch.no_grad()
def reference_accuracy(model: ArmtModel, task: RecallTask, n_segments: int, n_pairs: int, rows: int,
                       seed: int, zero_memory: bool = False, chunk: int = 256) -> float:
    """Accuracy through ArmtModel.forward(schedule='diagonal'): what the deployed runtimes compute.
    `zero_memory`: run the query segment alone from a zero MemoryState (the control)."""
    rng = np.random.default_rng(seed)
    right = total = 0
    for start in range(0, rows, chunk):
        b = make_batch(task, min(chunk, rows - start), n_segments, n_pairs, rng)
        if zero_memory:
            b = b.last_segment()
        out = model(torch.from_numpy(b.input_ids).to(model.device), schedule="diagonal")
        r, t = score(out.logits, b)
        right, total = right + r, total + t
    return right / max(total, 1)


def concat(a: RecallBatch, b: RecallBatch) -> RecallBatch:
    return RecallBatch(*(np.concatenate([x, y]) for x, y in
                         ((a.input_ids, b.input_ids), (a.query_pos, b.query_pos), (a.answers, b.answers),
                          (a.query_valid, b.query_valid))), a.n_segments, a.segment_size)


def param_groups(model: ArmtModel, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name or name.endswith("b_b") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save(model: ArmtModel, task: RecallTask, out: Path, metrics: dict) -> None:
    cpu = ArmtModel(model.cfg)
    cpu.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_model_dir(cpu, out, overwrite=True,
                   extra_files={TASK_FILE: json.dumps(task.to_dict(), indent=2) + "\n",
                                "train_metrics.json": json.dumps(metrics, indent=2) + "\n"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="model directory to write (an existing one only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (e.g. the shipped "
                   "models/armt-recall); without it an existing directory is refused before training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1_000_000, help="stop after this many steps")
    p.add_argument("--time-limit", type=float, default=480.0, help="stop training after this many seconds")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--segments", type=int, default=4, help="trained number of segments (context + query)")
    p.add_argument("--start-segments", type=int, default=2)
    p.add_argument("--promote", type=float, default=0.95)
    p.add_argument("--segment-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-ff", type=int, default=256)
    p.add_argument("--mem-tokens", type=int, default=8)
    p.add_argument("--d-mem", type=int, default=16)
    p.add_argument("--mem-init-std", type=float, default=0.02)
    p.add_argument("--eval-rows", type=int, default=1000)
    p.add_argument("--fused", action="store_true", help="fused SDPA attention (GPU)")
    p.add_argument("--init-from", help="model directory to start from (its shape replaces the shape options)")
    p.add_argument("--full-pairs", type=float, default=0.5,
                   help="fraction of each batch with the most pairs that fit (the rest: 1..most, uniform)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if Path(args.out).exists() and not args.overwrite:  # the shipped demo model is one `--out` away
        print(f"train_recall.py: error: {args.out} exists (the shipped demo model is models/armt-recall); "
              "choose another --out or pass --overwrite to replace it", file=sys.stderr)
        return 2

    t_start = time.time()
    torch.manual_seed(args.seed)
    task = RecallTask(segment_size=args.segment_size)
    if args.init_from:
        from graphs.modeldir import load_model_dir
        model = load_model_dir(args.init_from).to(args.device)
        cfg = model.cfg
        task = RecallTask.from_dict(json.loads((Path(args.init_from) / TASK_FILE).read_text()))
        b = cfg.base  # record the shape actually trained, not the unused shape options
        args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff = (b.d_model, b.n_layers, b.n_heads,
                                                                           b.n_kv_heads, b.d_ff)
        args.mem_tokens, args.d_mem, args.segment_size = cfg.armt.num_mem_tokens, cfg.armt.d_mem, task.segment_size
        log.info("starting from %s", args.init_from)
    else:
        cfg = build_config(task, args.d_model, args.layers, args.heads, args.kv_heads, args.d_ff,
                           args.mem_tokens, args.d_mem)
        model = ArmtModel(cfg, init_std=0.02, mem_init_std=args.mem_init_std, seed=args.seed).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %d parameters (%.2f MB fp32), %s", n_params, n_params * 4 / 1e6, cfg.armt)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(args.seed)
    S_max, S4 = args.segments, 4 * args.segments
    P_eval = task.max_pairs(S_max)
    out = Path(args.out)

    stage = max(2, min(args.start_segments, S_max))
    recent: list[float] = []
    best = (-1.0, -1.0)
    last_save = time.time()
    history = []
    warmup = 300
    step = 0
    skipped = 0

    def evaluate() -> tuple[float, float]:
        model.eval()
        a = fast_accuracy(model, task, S_max, P_eval, 1024, seed=10_000, fused=args.fused)
        b = fast_accuracy(model, task, S4, P_eval, 1024, seed=20_000, fused=args.fused)
        model.train()
        return a, b

    def checkpoint(final: bool = False) -> None:
        nonlocal best, last_save
        a, b = evaluate()
        history.append({"step": step, "seconds": round(time.time() - t_start, 1), "stage": stage,
                        "acc_trained": a, "acc_4x": b})
        log.info("eval step %d stage %d: acc@%d seg %.4f  acc@%d seg %.4f", step, stage, S_max, a, S4, b)
        key = (min(a, 0.99) + b, a) if stage >= S_max else (-1.0, a)
        if key >= best or final and best[0] < 0:
            best = key
            save(model, task, out, {"step": step, "seconds": time.time() - t_start, "history": history,
                                    "args": vars(args)})
            log.info("saved %s", out)
        last_save = time.time()

    model.train()
    while step < args.steps and time.time() - t_start < args.time_limit:
        frac = (time.time() - t_start) / args.time_limit
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(frac, 1.0))) * 0.95 + 0.05)
        for g in opt.param_groups:
            g["lr"] = lr
        # segment counts 2..stage, weighted towards the longest (the short ones are learnt first)
        counts = np.arange(2, stage + 1)
        S = int(rng.choice(counts, p=2.0 ** counts / (2.0 ** counts).sum()))
        n_full = int(round(args.full_pairs * args.batch))
        batch = concat(make_batch(task, args.batch - n_full, S, (1, task.max_pairs(S)), rng),
                       make_batch(task, n_full, S, task.max_pairs(S), rng)) if n_full else \
            make_batch(task, args.batch, S, (1, task.max_pairs(S)), rng)
        loss, right, total = batch_loss(model, batch, args.fused)
        if not torch.isfinite(loss):
            skipped += 1
            opt.zero_grad(set_to_none=True)
            if skipped > 50:
                log.error("too many non-finite losses; stopping")
                break
            step += 1
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        if torch.isfinite(gnorm):
            opt.step()
        else:
            skipped += 1
        if S == stage:
            recent.append(right / max(total, 1))
            recent = recent[-50:]
            if stage < S_max and len(recent) >= 20 and np.mean(recent) > args.promote:
                stage += 1
                recent = []
                log.info("step %d: curriculum -> up to %d segments", step, stage)
        if step % 100 == 0:
            log.info("step %d  %.0fs  S=%d stage=%d  loss %.4f  acc %.3f  lr %.2e  gnorm %.2f",
                     step, time.time() - t_start, S, stage, loss.item(), right / max(total, 1), lr, gnorm.item())
        step += 1
        if time.time() - last_save > args.save_every:
            checkpoint()
    train_seconds = time.time() - t_start
    checkpoint(final=True)

    # final numbers on the saved (best) model, through ArmtModel.forward with the diagonal schedule
    from graphs.modeldir import load_model_dir
    best_model = load_model_dir(out).to(args.device)
    rows = args.eval_rows
    metrics = {
        "trained_segments": S_max, "eval_segments_4x": S4, "pairs": P_eval, "eval_rows": rows,
        "eval_seed_trained": 1, "eval_seed_4x": 2, "eval_seed_zero": 3,
        "acc_trained": reference_accuracy(best_model, task, S_max, P_eval, rows, seed=1),
        "acc_4x": reference_accuracy(best_model, task, S4, P_eval, rows, seed=2),
        "acc_memory_zeroed": reference_accuracy(best_model, task, S_max, P_eval, rows, seed=3, zero_memory=True),
        "chance": task.chance, "steps": step, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1), "device": str(args.device),
        "device_name": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
        "seed": args.seed, "skipped_steps": skipped, "history": history, "args": vars(args),
    }
    log.info("final: %s", {k: v for k, v in metrics.items() if k not in ("history", "args")})
    atomic_write_bytes(out.parent / f"{out.name}.metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
