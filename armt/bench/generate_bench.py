"""`armt bench --generate`: prefill time and decode tokens/s of generation per backend, next to HF
transformers' own `generate` on the same base model (no memory, its default cache), in one run.

    backend     what is timed
    torch       runtimes.generate.generate on the torch decoder (prefill: the decoder's own FastArmt,
                diagonal, where it applies, with `armt bench`'s memory precision (exact_memory=False:
                bf16 read, TF32 products on CUDA; no effect in fp32); decode: one token per row per
                call through the cached decode layers)
    torch-graph the same with the one-token step as a CUDA graph (runtimes/graph_decode.py; on a CPU
                the same static step, eagerly), the greedy token picked in the graph
    torch-ref   the same loop with the prefill on the reference cells (graphs.model's schedule loop)
    ort         runtimes.generate.generate on the export's decode graphs (ONNX Runtime)
    hf          transformers AutoModelForCausalLM(base config).generate, greedy, min = max new tokens

The ARMT backends run generate with scores=False (tokens only, as HF's generate here).
For each (backend, batch, prompt length), one generate call of --new-tokens tokens is clocked at its
start and at every new token (device synchronized; HF through a streamer that only stamps times):
`prefill_ms` = start to the first token (the prompt through the model, the first token chosen),
`decode_ms` = first to last token, decode tokens/s = batch * (new tokens - 1) / decode; medians
over --repeats calls after --warmup. Every row generates all its tokens (no EOS). For the torch and
torch-graph backends the `armt bench` diagonal time of the same ids (FastArmt.run, head-less, as
`armt bench --schedules diagonal`; measured once per shape) is given too (`diagonal_ms`): the
prefill target compares the torch backend's prefill with it.

Targets (issue 11), evaluated in the JSON's "targets" (met: true/false, or null when not measured):
decode at batch 1 and the shortest prompt: the fastest ARMT backend >= 800 tokens/s, ORT >= 500,
both >= 3x HF at the same prompt; prefill of the longest prompt within 10% of its diagonal time.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from graphs.errors import ArmtError, BackendUnavailable, InputError

from armt.bench.timing import measure  # the diagonal reference time, as `armt bench` measures it

log = logging.getLogger("armt.bench")

GENERATE_BACKENDS = ("torch", "torch-graph", "torch-ref", "ort", "hf")
TARGETS = {"decode_b1_fastest_tokens_per_s": 800.0, "decode_b1_ort_tokens_per_s": 500.0,
           "speedup_vs_hf": 3.0, "prefill_over_diagonal": 1.10}


# ------------------------------------------------------------------------------------------ HF peer
def hf_base_model(model, device: torch.device, precision: str):
    """transformers' own causal LM of the ARMT's base config with the same base weights (the memory
    weights dropped): the peer a user would otherwise deploy."""
    try:
        import transformers
    except ImportError:
        raise BackendUnavailable("the hf backend needs transformers") from None
    from graphs.hf_layout import hf_from_params
    from graphs.dtypes import compute_dtype, torch_dtype
    hf_cfg = dict(model.cfg.base.hf_config)
    config = transformers.AutoConfig.for_model(**hf_cfg)
    dtype = torch_dtype(compute_dtype(precision))
    hf = transformers.AutoModelForCausalLM.from_config(config)  # fp32; cast below (no dtype keyword: its
    # name changed across transformers versions)
    tensors = {k: v for k, v in hf_from_params(model).items() if not k.startswith("armt.")}
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    params = {n for n, _ in hf.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise InputError(f"the base weights do not fit transformers' {config.model_type} model "
                         f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        hf.tie_weights()
    return hf.to(device=device, dtype=dtype).eval()


class Clock:
    """Time stamps of a generate call: its start and each new token (device synchronized)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ticks: list[float] = []

    def tick(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ticks.append(time.perf_counter())


class _HfTicks:
    """A transformers streamer that only stamps the time of each new token (its first `put` is the prompt)."""

    def __init__(self, clock: Clock):
        self.clock, self.seen_prompt = clock, False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.clock.tick()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def hf_generate_fn(hf, ids: torch.Tensor, new_tokens: int) -> Callable[[Clock], Any]:
    mask = torch.ones_like(ids)

    def run(clock: Clock):
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                               streamer=_HfTicks(clock))
    return run


# ------------------------------------------------------------------------------------------ ARMT
def _prefill_on_reference(decoder) -> None:
    """Make a torch decoder run the prompt's completed segments on the reference cells (the schedule
    loop on a TorchRunner) instead of the fast executor."""
    from runtimes.execute import run_schedule
    from runtimes.torch_runner import TorchRunner
    from graphs.contracts import role_for

    def prefill(ids, lengths, state, schedule):
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        runner = TorchRunner(decoder._source, role_for(decoder.cfg, schedule), device=decoder.device_name,
                             precision=decoder.precision)
        with runner:
            res = run_schedule(runner, ids, mask, state=state, collect=())
        return res.state.without_pending()
    decoder.prefill = prefill


def armt_generate_fn(backend: str, model, ids: np.ndarray, new_tokens: int, device: torch.device,
                     precision: str, export_dir: str | None, cuda_graph: bool | None = None,
                     decoder=None) -> Callable[[Clock], Any]:
    """The timed call: runtimes.generate.generate on the backend's decoder (its `decoder` attribute).
    `cuda_graph`: the ort decoder's CUDA graphs (runtimes/ort_generate.py; default off); `decoder`: an
    ort decoder opened before (its sessions reused)."""
    from graphs.sampling import SamplingConfig
    import runtimes.generate as gen
    if backend in ("torch", "torch-ref", "torch-graph"):
        from runtimes.graph_decode import GraphDecoder
        from runtimes.torch_generate import TorchDecoder

        def make():
            cls = GraphDecoder if backend == "torch-graph" else TorchDecoder
            d = cls(model, device=str(device), precision=precision, exact_memory=False)  # as `armt bench`
            if backend == "torch-ref":
                _prefill_on_reference(d)
            return d
    elif backend == "ort":
        from armt.api import open_export_decoder
        if not export_dir:
            raise InputError("the ort backend needs --export-dir (an `armt export` of the same model) or --export-to DIR")
        if decoder is None:
            decoder = open_export_decoder(export_dir, "ort", device.type, precision, cuda_graph=cuda_graph)
        make = lambda: decoder  # noqa: E731  (one session set; generate restarts its cache each call)
    else:
        raise InputError(f"generate backends are {', '.join(GENERATE_BACKENDS)}, got {backend!r}")
    decoder = make()

    def run(clock: Clock):
        with torch.no_grad():
            return gen.generate(decoder, ids, None, max_new_tokens=new_tokens, policy="frozen",
                                sampling=SamplingConfig(greedy=True), on_token=lambda *_: clock.tick(),
                                scores=False)  # as HF's generate here: tokens only (torch-graph: argmax on the device)
    run.decoder = decoder
    return run


# ------------------------------------------------------------------------------------------ rows
@dataclass
class GenerateBench:
    model: Any  # fp32 ArmtModel / RmtModel on the CPU
    device: torch.device
    precision: str
    new_tokens: int
    warmup: int = 1
    repeats: int = 3
    export_dir: str | None = None
    max_hf: int | None = None
    max_ref: int | None = None
    cuda_graph: bool | None = None  # ort: the decoder's CUDA graphs (--cuda-graph)

    def __post_init__(self):
        if self.new_tokens < 2:
            raise InputError("--new-tokens must be at least 2 (decode speed is measured after the first token)")
        self._hf = None
        self._work = None
        self._torch_tokens: dict = {}  # (batch, prompt) -> the torch backend's tokens
        self._diagonal: dict = {}  # (batch, prompt) -> `armt bench`'s diagonal time
        self._on_device = None
        self._ort = None  # the ort decoder, shared by the rows (not with CUDA graphs: a session per step shape)

    def _device_model(self):
        if self._on_device is None:  # moved and cast once; TorchDecoder then uses it as it is
            from graphs.dtypes import compute_dtype, torch_dtype
            m = copy.deepcopy(self.model).to(self.device)
            m.cast(torch_dtype(compute_dtype(self.precision)))
            self._on_device = m.eval()
        return self._on_device

    def _timed(self, fn: Callable[[Clock], Any]) -> dict:
        """`warmup` untimed calls, then `repeats` clocked ones: prefill = start to the first token,
        decode = first to last token (new_tokens - 1 steps); medians over the repeats."""
        for _ in range(self.warmup):
            fn(Clock(self.device))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        prefill, decode, result = [], [], None
        for _ in range(self.repeats):
            clock = Clock(self.device)
            clock.tick()
            result = fn(clock)
            if len(clock.ticks) != self.new_tokens + 1:
                raise InputError(f"generate produced {len(clock.ticks) - 1} tokens, not {self.new_tokens}")
            prefill.append((clock.ticks[1] - clock.ticks[0]) * 1e3)
            decode.append((clock.ticks[-1] - clock.ticks[1]) * 1e3)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"prefill_ms": statistics.median(prefill), "decode_ms": statistics.median(decode),
                "prefill_times_ms": prefill, "decode_times_ms": decode, "peak_bytes": peak, "result": result}

    def row(self, backend: str, ids: np.ndarray) -> dict:
        B, N = ids.shape
        row = {"backend": backend, "batch": B, "prompt_tokens": N, "new_tokens": self.new_tokens,
               "precision": self.precision}
        if backend == "hf" and self.max_hf and N > self.max_hf:
            return {**row, "error": f"skipped (--max-hf {self.max_hf})"}
        if backend == "torch-ref" and self.max_ref and N > self.max_ref:
            return {**row, "error": f"skipped (--max-ref {self.max_ref})"}
        try:
            if backend == "hf":
                if self._hf is None:
                    self._hf = hf_base_model(self.model, self.device, self.precision)
                tids = torch.from_numpy(ids).to(self.device)
                t = self._timed(hf_generate_fn(self._hf, tids, self.new_tokens))
                tokens = t.pop("result")[:, N:].cpu().numpy()
            else:
                fn = armt_generate_fn(backend, self._device_model(), ids, self.new_tokens, self.device,
                                      self.precision, self.export_dir, self.cuda_graph,
                                      self._ort if backend == "ort" else None)
                t = self._timed(fn)
                tokens = t.pop("result").tokens
                if backend == "ort":  # what ran: CUDA graphs asked for may have been refused (reason logged)
                    t["cuda_graph"] = fn.decoder.cuda_graph
                    if self.cuda_graph:
                        fn.decoder.close()
                    else:
                        self._ort = fn.decoder
            if backend in ("torch", "torch-graph"):
                t["diagonal_ms"] = self._diagonal_ms(ids)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**row, "error": "out of device memory"}
        except ArmtError as exc:
            return {**row, "error": str(exc)}
        decode_s = t["decode_ms"] / 1e3
        row.update(t)
        row["generated"] = int(tokens.shape[1])
        key = (B, N)
        if backend == "torch":
            self._torch_tokens[key] = tokens
        elif backend != "hf" and key in self._torch_tokens:  # greedy: the same tokens (fp32), or how many agree
            ref = self._torch_tokens[key]
            row["same_tokens_as_torch"] = float((ref == tokens).mean()) if ref.shape == tokens.shape else 0.0
        row["decode_tokens_per_s"] = B * (self.new_tokens - 1) / decode_s if decode_s > 0 else None
        row["prefill_tokens_per_s"] = B * N / (t["prefill_ms"] / 1e3)
        if "diagonal_ms" in t and t["diagonal_ms"]:
            row["prefill_over_diagonal"] = t["prefill_ms"] / t["diagonal_ms"]
        return row

    def _diagonal_ms(self, ids: np.ndarray) -> float | None:
        """`armt bench`'s diagonal time of the same ids (torch fast executor, head-less)."""
        if self.model.cfg.kind != "armt":
            return None
        key = ids.shape
        if key in self._diagonal:
            return self._diagonal[key]
        from armt.bench.workloads import Workloads
        if self._work is None:
            self._work = Workloads(self.model, self.device, self.precision)
        fn = self._work.callable("torch", "diagonal", torch.from_numpy(ids))
        self._diagonal[key] = measure(fn, self.device, self.warmup, self.repeats).median_ms
        return self._diagonal[key]

    def close(self) -> None:
        if self._work is not None:
            self._work.close()
        if self._ort is not None:
            self._ort.close()
            self._ort = None


# ------------------------------------------------------------------------------------------ targets
def _target(value: float | None, bound: float, at_least: bool, what: str) -> dict:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {"what": what, "target": bound, "measured": value, "met": met}


def evaluate_targets(rows: list[dict]) -> dict:
    """The issue's targets from the rows: decode at batch 1 and the shortest prompt measured, prefill at
    the longest prompt of the torch backends (torch preferred; torch-graph has the same prefill)."""
    ok = [r for r in rows if "error" not in r and r.get("decode_tokens_per_s")]
    b1 = [r for r in ok if r["batch"] == 1]
    shortest = min((r["prompt_tokens"] for r in b1), default=None)
    at = {r["backend"]: r["decode_tokens_per_s"] for r in b1 if r["prompt_tokens"] == shortest}
    armt_rates = {k: v for k, v in at.items() if k != "hf"}
    fastest = max(armt_rates.items(), key=lambda kv: kv[1], default=(None, None))
    hf = at.get("hf")
    ort = at.get("ort")
    prefill = [r for r in ok if r["backend"] in ("torch", "torch-graph") and r.get("prefill_over_diagonal") is not None]
    longest = max(prefill, key=lambda r: (r["prompt_tokens"], -r["batch"], r["backend"] == "torch"), default=None)
    return {
        "decode_prompt_tokens": shortest,
        "fastest_backend": fastest[0],
        "decode_b1_fastest": _target(fastest[1], TARGETS["decode_b1_fastest_tokens_per_s"], True,
                                     "decode tokens/s, batch 1, fastest ARMT backend"),
        "decode_b1_ort": _target(ort, TARGETS["decode_b1_ort_tokens_per_s"], True, "decode tokens/s, batch 1, ORT"),
        "fastest_vs_hf": _target(None if fastest[1] is None or not hf else fastest[1] / hf, TARGETS["speedup_vs_hf"],
                                 True, "fastest ARMT decode / HF generate decode, batch 1"),
        "ort_vs_hf": _target(None if ort is None or not hf else ort / hf, TARGETS["speedup_vs_hf"], True,
                             "ORT decode / HF generate decode, batch 1"),
        "prefill_vs_diagonal": {**_target(None if longest is None else longest["prefill_over_diagonal"],
                                          TARGETS["prefill_over_diagonal"], False,
                                          "prefill time / armt bench diagonal time, longest prompt, "
                                          + (longest["backend"] if longest else "torch")),
                                "prompt_tokens": None if longest is None else longest["prompt_tokens"],
                                "backend": None if longest is None else longest["backend"]},
    }


def table(rows: list[dict]) -> str:
    head = (f"{'backend':10s} {'batch':>5s} {'prompt':>8s} {'new':>5s} {'prefill ms':>11s} {'diag ms':>9s} "
            f"{'decode tok/s':>13s} {'decode ms':>10s}  note")
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['backend']:10s} {r['batch']:5d} {r['prompt_tokens']:8d} {r['new_tokens']:5d} "
                         f"{'-':>11s} {'-':>9s} {'-':>13s} {'-':>10s}  {r['error']}")
            continue
        diag = f"{r['diagonal_ms']:9.1f}" if r.get("diagonal_ms") else f"{'-':>9s}"
        rate = f"{r['decode_tokens_per_s']:13.1f}" if r.get("decode_tokens_per_s") else f"{'-':>13s}"
        lines.append(f"{r['backend']:10s} {r['batch']:5d} {r['prompt_tokens']:8d} {r['new_tokens']:5d} "
                     f"{r['prefill_ms']:11.1f} {diag} {rate} {r['decode_ms']:10.1f}")
    return "\n".join(lines)


def targets_table(targets: dict) -> str:
    lines = [f"targets (decode at batch 1, prompt {targets['decode_prompt_tokens']}; fastest ARMT backend: "
             f"{targets['fastest_backend']}):"]
    for key, t in targets.items():
        if not isinstance(t, dict):
            continue
        measured = "not measured" if t["measured"] is None else f"{t['measured']:.3g}"
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        rel = ">=" if key != "prefill_vs_diagonal" else "<="
        lines.append(f"  {t['what']}: {measured} ({rel} {t['target']:g}): {verdict}")
    return "\n".join(lines)
