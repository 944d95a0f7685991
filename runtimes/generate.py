"""The one generation loop (every backend plugs a decoder into it: runtimes/torch_generate.py).

    prompt (B, N), right-padded --continue_input--> each row's effective prompt (a state's pending
    tokens first) --> row b: completed segments | last segment (1 .. T tokens)

    1. prefill:  the completed segments of every row, written as `armt run` writes them (the diagonal
                 schedule for an ARMT unless told otherwise)
    2. start:    the last segment through the decoder with an empty KV cache (one call, n = its widest row)
    3. loop:     choose each row's token from its last logits (graphs/sampling.py); stop rows at EOS;
                 recurrent: a row whose segment holds T tokens completes it (memory write) first;
                 one decoder call with the new token of every running row

Policies: `frozen` (the official `generate`): the last prompt segment and every new token form one
growing segment that reads the memory and never writes it. `recurrent`: the segment is completed
and a new one started whenever it holds T tokens, so every score equals `armt run`'s logits on the
prompt plus the tokens generated before it.

Rows are independent: each row's cache places, positions and segment boundaries are its own, so a
padded batch gives each row what it gives alone (sampling: one seeded Generator per row index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from graphs.errors import InputError
from graphs.sampling import Sampler, SamplingConfig
from graphs.state import empty_state

log = logging.getLogger("armt.generate")

POLICIES = ("frozen", "recurrent")


@dataclass
class GenerateResult:
    tokens: np.ndarray  # (B, T) int64 new tokens only; 0 after a row's EOS
    scores: np.ndarray | None  # (B, T, V) float32 the raw logits each token was chosen from; 0 after EOS
    # (None when generate was called with scores=False)
    lengths: np.ndarray  # (B,) int64 new tokens of each row (its EOS included)
    state: object  # MemoryState / RmtState (numpy): what the current segment reads (recurrent: after every write)


def check_generate_args(max_new_tokens: int, policy: str, eos_ids: Iterable[int], vocab_size: int) -> tuple[int, ...]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if policy not in POLICIES:
        raise InputError(f"--memory-policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    eos = tuple(int(e) for e in eos_ids)
    bad = [e for e in eos if not 0 <= e < vocab_size]
    if bad:
        raise InputError(f"--eos-id must lie in [0, {vocab_size}), got {bad[0]}")
    return eos


def as_decoder(model_or_decoder, device: str = "cpu", precision: str = "fp32"):
    """A decoder: the argument itself if it is one, else a TorchDecoder over a torch model."""
    if hasattr(model_or_decoder, "step") and hasattr(model_or_decoder, "prefill"):
        return model_or_decoder
    from runtimes.torch_generate import TorchDecoder
    return TorchDecoder(model_or_decoder, device=device, precision=precision)


def _step_last(dec, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """ids (B, n), counts (B,) 1 .. n (0: a stopped row) -> each row's logits at its last real place
    (B, V): the decoder's `step_last` where it has one (only those places through the head), else
    its full `step`."""
    fn = getattr(dec, "step_last", None)
    if fn is not None:
        return fn(ids, counts)
    logits = dec.step(ids, counts)  # (B, n, V)
    return logits[np.arange(ids.shape[0]), np.maximum(counts, 1) - 1]


def generate(model_or_decoder, input_ids, attention_mask=None, max_new_tokens: int = 32, policy: str = "frozen",
             sampling: SamplingConfig | None = None, eos_ids: Iterable[int] = (), state=None,
             prefill_schedule: str | None = None, device: str = "cpu", precision: str = "fp32",
             on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
             scores: bool = True) -> GenerateResult:
    """Generate up to `max_new_tokens` per row after a right-padded prompt (B, N) (see the module doc).
    `scores=False`: no scores kept (result.scores None); under greedy sampling a decoder with a
    `step_greedy` then picks each token on its device (only the ids come back to the host)."""
    from runtimes.execute import continue_input
    dec = as_decoder(model_or_decoder, device, precision)
    cfg = dec.cfg
    eos = check_generate_args(max_new_tokens, policy, eos_ids, cfg.base.vocab_size)
    sampler = Sampler(sampling or SamplingConfig(), int(input_ids.shape[0]))
    schedule = prefill_schedule or ("diagonal" if cfg.kind == "armt" else "sequential")
    if cfg.kind == "rmt" and schedule != "sequential":
        from graphs.contracts import role_for
        role_for(cfg, schedule)  # the one line that refuses the diagonal schedule for an RMT
    cont = continue_input(cfg, input_ids, attention_mask, state)
    ids, lengths, T = cont.ids, cont.lengths, cfg.armt.segment_size
    B = ids.shape[0]
    if B == 0 or int(lengths.min()) < 1:
        raise InputError("every row needs at least one prompt token")
    # 1. the completed segments of every row: all but the last (which holds 1 .. T tokens)
    done_len = T * ((lengths - 1) // T)  # (B,)
    if cont.start is not None:
        start = cont.start
    else:  # a decoder may make the fresh state where it computes (torch: zeros on its device)
        start = dec.empty_state(B) if hasattr(dec, "empty_state") else empty_state(cfg, B)
    if int(done_len.max()) > 0:
        start = dec.prefill(ids[:, :int(done_len.max())], done_len, start, schedule)
    # 2. the last segment
    counts = lengths - done_len  # (B,) 1 .. T
    width = int(counts.max())
    last = np.zeros((B, width), dtype=np.int64)
    for b in range(B):
        last[b, :counts[b]] = ids[b, done_len[b]:lengths[b]]
    M = cfg.armt.num_mem_tokens
    extra = M if cfg.kind == "rmt" else 0
    capacity = extra + width + max_new_tokens if policy == "frozen" else extra + T + M + extra + 1
    dec.start(start, capacity)
    next_logits = _step_last(dec, last, counts)  # (B, V)
    V = next_logits.shape[-1]
    tokens = np.zeros((B, max_new_tokens), dtype=np.int64)
    kept = np.zeros((B, max_new_tokens, V), dtype=np.float32) if scores else None
    on_device = not scores and sampler.config.greedy and hasattr(dec, "step_greedy")
    tok = sampler(next_logits)
    done = np.zeros(B, dtype=bool)
    n_new = np.zeros(B, dtype=np.int64)
    steps = 0
    for t in range(max_new_tokens):
        live = ~done
        tokens[live, t] = tok[live]
        if kept is not None:
            kept[live, t] = next_logits[live]
        n_new += live
        steps = t + 1
        if eos:
            done = done | (live & np.isin(tok, eos))
        if on_token is not None:
            on_token(t, np.where(live, tok, 0), ~live)
        if done.all() or t == max_new_tokens - 1:
            break
        if policy == "recurrent":
            full = (dec.segment_tokens() >= T) & ~done
            dec.complete(full)
        step_counts = (~done).astype(np.int64)
        ids_t = np.where(done, 0, tok)[:, None]
        if on_device:  # the greedy token chosen on the device (the same argmax, NaN/Inf refused there)
            tok = dec.step_greedy(ids_t, step_counts)
        else:
            next_logits = _step_last(dec, ids_t, step_counts)
            tok = sampler(next_logits)
    return GenerateResult(tokens[:, :steps], None if kept is None else kept[:, :steps], n_new, dec.state())
