"""The Python API: one object over a model directory (torch) or an export directory (ONNX Runtime,
TensorRT), with `__call__` (logits for token ids, memory state in and out) and `generate`.

    import armt
    m = armt.load("models/armt-recall")                            # torch, cpu, fp32, diagonal
    m = armt.load("out/demo/export-fp32", backend="ort")           # an export: ort or trt
    out = m(ids)                                                   # out.logits (B, N, V), out.hidden, out.state
    more = m(next_ids, state=out.state)                            # continues exactly where `out` stopped
    gen = m.generate("the apple red of ... ? apple", max_new_tokens=1)   # gen.text, gen.tokens, gen.scores
    gen = m.generate(ids, max_new_tokens=32, policy="recurrent", greedy=False, temperature=0.8, seed=0)

What runs is what `armt run` / `armt generate` run with the same settings (runtimes.torch_runner.
run_torch, runtimes.execute.run_schedule on the backend's runner, runtimes.generate.generate), so
the results are the CLI's. Inputs are numpy arrays or torch tensors (or nested lists), right-padded
with a 0/1 attention mask as `armt run`; outputs are numpy. Errors are the typed errors of
graphs/errors.py (InputError for bad input, BackendUnavailable when a backend cannot run here).
Nothing heavy is imported before `load`: an ONNX-Runtime-only install (no torch) loads an export.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from graphs.errors import InputError

log = logging.getLogger("armt.api")

BACKENDS = ("torch", "ort", "trt")
POLICIES = ("frozen", "recurrent")


@dataclass
class Output:
    """What a call returns (numpy): logits (B, N, V) fp32, hidden (B, N, d) fp32, the state after it."""

    logits: np.ndarray
    hidden: np.ndarray
    state: Any  # graphs.state.MemoryState (ARMT) or RmtState (RMT), with the rows' unfinished segments


@dataclass
class Generation:
    """What `generate` returns: the new tokens (B, T) int64 (0 after a row's EOS), the logits each was
    chosen from (B, T, V) fp32, new tokens per row (B,), the state, and the decoded text of each row
    when the prompt was text (else None)."""

    tokens: np.ndarray
    scores: np.ndarray
    lengths: np.ndarray
    state: Any
    text: list[str] | None = None


def _as_ids(ids: Any, what: str = "input ids") -> np.ndarray:
    """(B, N) int64 from numpy, a torch tensor, or (nested) lists; a 1-D input is one row."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (arr.size and arr.dtype.kind not in "iu"):
        raise InputError(f"{what} must be a 2-D integer array (batch, tokens), got shape {arr.shape} "
                         f"of {arr.dtype}")
    return arr.astype(np.int64, copy=False)


class LoadedModel:
    """A model directory or an export, ready to run on one backend. Use `armt.load`."""

    def __init__(self, path: Path, backend: str, device: str, precision: str, schedule: str,
                 cfg: Any, model: Any = None, manifest: Any = None):
        self.path, self.backend, self.device = path, backend, device
        self.precision, self.schedule, self.config = precision, schedule, cfg
        self._model, self._manifest = model, manifest  # torch model (torch) or export manifest (ort, trt)
        self._runner = None
        self._export_decoder = None
        self._tokenizer = None
        self._tokenizer_error: Exception | None = None

    def __repr__(self) -> str:
        return (f"armt.LoadedModel({str(self.path)!r}, kind={self.config.kind}, backend={self.backend}, "
                f"device={self.device}, precision={self.precision}, schedule={self.schedule})")

    # ------------------------------------------------------------------ identity, tokenizer
    @property
    def model_id(self) -> str:
        return self._model.known_model_id() if self._model is not None else self._manifest.model_id

    @property
    def tokenizer(self):
        """The model's tokenizer (graphs.tokenizer.TextTokenizer), or None when it has none."""
        if self._tokenizer is None and self._tokenizer_error is None:
            try:
                self._tokenizer = self._load_tokenizer()
            except InputError as exc:  # no tokenizer files: None here, the one line on text input
                self._tokenizer_error = exc
        return self._tokenizer

    def _load_tokenizer(self):
        if self._manifest is not None:
            from runtimes.loaders import load_export_tokenizer
            tok = load_export_tokenizer(self._manifest)
        else:
            from graphs.tokenizer import load_tokenizer
            tok = load_tokenizer(self.path)
        tok.check_fits(self.config.base.vocab_size)
        return tok

    def _require_tokenizer(self):
        tok = self.tokenizer
        if tok is None:
            raise self._tokenizer_error
        return tok

    def encode(self, text: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Text (one prompt or a list) -> right-padded ids (B, N) int64 and the 0/1 mask (B, N)."""
        tok = self._require_tokenizer()
        rows = [tok.encode(t) for t in ([text] if isinstance(text, str) else list(text))]
        if not rows:
            raise InputError("no prompt given")
        n = max(len(r) for r in rows)
        ids = np.zeros((len(rows), n), dtype=np.int64)
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
            mask[b, :len(r)] = 1
        return ids, mask

    # ------------------------------------------------------------------ logits
    def __call__(self, ids, attention_mask=None, state=None) -> Output:
        """Logits and hidden states for right-padded token ids (B, N), continuing `state` (a previous
        Output's, or a state file's: graphs.state.load_state) exactly; as `armt run`."""
        ids = _as_ids(ids)
        mask = None if attention_mask is None else _as_ids(attention_mask, "attention mask")
        if self.backend == "torch":
            from runtimes.torch_runner import run_torch
            result = run_torch(self._model, ids, mask, state=state, schedule=self.schedule, device=self.device,
                               precision=self.precision, collect=("logits", "hidden"))
        else:
            from runtimes.execute import run_schedule
            runner = self._schedule_runner()
            with runner:
                result = run_schedule(runner, ids, mask, state=state, collect=("logits", "hidden"))
        return Output(result.logits, result.hidden, result.state)

    def _schedule_runner(self):
        if self._runner is None:
            from graphs.contracts import role_for
            from runtimes.base import make_runner
            self._runner = make_runner(self.backend, self._manifest, role_for(self.config, self.schedule),
                                       device=self.device)
        return self._runner

    # ------------------------------------------------------------------ generation
    def generate(self, prompt, max_new_tokens: int = 32, policy: str = "frozen", *, attention_mask=None,
                 greedy: bool | None = None, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, eos_id: int | Sequence[int] | None = None, state=None,
                 on_text: Callable[[str], None] | None = None) -> Generation:
        """Generate up to `max_new_tokens` tokens after `prompt`: token ids (B, N) (with
        `attention_mask` for rows of different lengths) or text (a string or a list of strings,
        encoded with `self.tokenizer`; the result then carries `text`). `policy`: "frozen" (the
        official implementation's generate) or "recurrent" (exact continuation, memory written at
        every segment boundary). Greedy unless `greedy=False` or a sampling setting is given
        (`temperature`, `top_k`, `top_p`, reproducible with `seed`). `eos_id`: the token(s) that end
        a row (default: the tokenizer's EOS when the prompt is text). `on_text(delta)`: with one text
        prompt, called with each piece of new text as it is generated. As `armt generate`."""
        from graphs.sampling import SamplingConfig
        from runtimes.generate import generate
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        is_text = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                              and all(isinstance(p, str) for p in prompt))
        if is_text:
            if attention_mask is not None:
                raise InputError("attention_mask is for token ids; a text prompt makes its own")
            ids, mask = self.encode(prompt)
        else:
            ids = _as_ids(prompt)
            mask = None if attention_mask is None else _as_ids(attention_mask, "attention mask")
        sampled = greedy is False or (greedy is None and (temperature != 1.0 or top_k or top_p != 1.0))
        sampling = (SamplingConfig(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=0 if seed is None else seed) if sampled else SamplingConfig(greedy=True))
        sampling.check()
        eos = self._eos_ids(eos_id, is_text)
        on_token = self._streamer(on_text, ids.shape[0]) if (on_text is not None and is_text) else None
        res = generate(self._decoder(), ids, mask, max_new_tokens=max_new_tokens, policy=policy,
                       sampling=sampling, eos_ids=eos, state=state, prefill_schedule=self.schedule,
                       device=self.device, precision=self.precision, on_token=on_token)
        text = None
        if is_text:
            tok = self._tokenizer
            text = [tok.decode(res.tokens[b, :int(res.lengths[b])]) for b in range(res.tokens.shape[0])]
        return Generation(res.tokens, res.scores, res.lengths, res.state, text)

    def _eos_ids(self, eos_id, is_text: bool) -> tuple[int, ...]:
        if eos_id is None:
            tok = self._tokenizer if is_text else None
            return (tok.eos_id,) if tok is not None and tok.eos_id is not None else ()
        return tuple(int(e) for e in ([eos_id] if isinstance(eos_id, (int, np.integer)) else eos_id))

    def _streamer(self, on_text: Callable[[str], None], rows: int):
        if rows != 1:
            raise InputError("on_text streams one prompt's text; got several prompts")
        from graphs.tokenizer import stream_first_row
        return stream_first_row(self._tokenizer, on_text)

    def _decoder(self):
        """What runtimes.generate.generate runs: the torch model (its TorchDecoder is made there, on
        the requested device and precision), or the export's decoder (runtimes/ort_generate.py
        OrtDecoder, runtimes/trt_generate.py TrtDecoder)."""
        if self.backend == "torch":
            return self._model
        if self._export_decoder is None:
            self._export_decoder = open_export_decoder(self._manifest.root, self.backend, self.device,
                                                       self.precision)
        return self._export_decoder


def open_export_decoder(path, backend: str, device: str, precision: str | None = None,
                        cuda_graph: bool | None = None):
    """The decoder over an export's decode graphs (as `armt generate --backend ort|trt` opens it);
    `cuda_graph`: CUDA graphs for its steps (ort decoder: CUDA only, default off; trt: default on)."""
    try:
        from runtimes.decoders import open_decoder
    except ImportError:
        from graphs.errors import BackendUnavailable
        raise BackendUnavailable(f"generation on {backend} needs the export's decode graphs, which this version "
                                 "does not run (use backend='torch' on the model directory)") from None
    return open_decoder(path, backend, device=device, precision=precision, cuda_graph=cuda_graph)


def load(path: str | Path, backend: str = "torch", device: str | None = None, precision: str | None = None,
         schedule: str | None = None) -> LoadedModel:
    """Load a model directory (backend "torch") or an export directory ("ort", "trt").

    `device`: "cpu" or "cuda" (default cpu; trt: cuda). `precision`: torch: the compute precision
    (fp32, fp16, bf16; default fp32); ort/trt: the export's (checked when given). `schedule`:
    "diagonal" or "sequential" (default: diagonal for an ARMT, sequential for an RMT), the prefill's
    too. The memory state is fp32 in every precision."""
    from graphs.contracts import default_schedule, role_for
    path = Path(path)
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = device or ("cuda" if backend == "trt" else "cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda, got {device!r}")
    is_export = (path / "manifest.json").is_file()
    if backend == "torch":
        if is_export:
            raise InputError(f"{path} is an export directory; backend 'torch' loads a model directory "
                             "(use backend='ort' or 'trt' for exports)")
        from graphs.modeldir import load_model_dir
        model = load_model_dir(path)
        cfg, manifest, precision = model.cfg, None, precision or "fp32"
        from graphs.dtypes import PRECISIONS
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    else:
        if path.is_dir() and not is_export and (path / "armt_config.json").is_file():
            raise InputError(f"{path} is a model directory; backend {backend!r} loads an export directory "
                             "(make one with `armt export`)")
        from runtimes.loaders import open_export
        manifest = open_export(path, precision)
        model, cfg, precision = None, manifest.model_config(), manifest.precision
    schedule = schedule or default_schedule(cfg)
    role_for(cfg, schedule)  # an RMT refuses the diagonal schedule (one line)
    loaded = LoadedModel(path, backend, device, precision, schedule, cfg, model=model, manifest=manifest)
    log.debug("loaded %r", loaded)
    return loaded
