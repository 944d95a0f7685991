#!/usr/bin/env python3
"""Build the official-implementation test fixtures by running the official ARMT and RMT code.

The official implementation (RodkinIvan/associative-recurrent-memory-transformer) is *not* part of
this project: point ``--official-repo`` at a checkout of it (a directory holding
``modeling_amt/language_modeling.py`` and ``modeling_rmt/language_modeling.py``). It needs
transformers 4.x (written for 4.3x-4.4x; 4.46.3 works). Everything under tests/fixtures/official/
is rebuilt by one command (see tests/fixtures/official/README.md for the set-up of the environment):

    git --git-dir=$MIRROR archive $COMMIT | tar -x -C /tmp/official
    /work/venv-official/bin/python tools/make_official_fixtures.py \\
        --official-repo /tmp/official --official-commit $COMMIT

Under torch 2.13.0+cpu and transformers 4.46.3 a re-run is byte-identical (the ARMT forward files too,
which predate the rest; --keep-armt leaves them alone). The generate files of every fixture are made
from the checkpoint.pt on disk.

Fixtures
--------
ARMT (``AssociativeRecurrentWrapper(AssociativeMemoryCell(base))``, directories llama,
llama-nocorr-bias, gpt2, gpt2-wrap-pos): a tiny base model, every weight from a seeded generator (the
official init zeros ``W_mv``, which would make the memory do nothing), a batch of 2 rows with
several segments and a short last one. Files: checkpoint.pt (the wrapper's state_dict), config.json
(the base HF config), armt.json (wrapper settings), input_ids.npy (2, N) int64, logits.npy (2, N, V)
float32, hidden.npy (2, N, d) float32 (last hidden state, after the final norm), memory_A.npy
(L, 2, K, d) and memory_z.npy (L, 2, K) float32 (every layer's memory after the last segment).

RMT (``RecurrentWrapper(MemoryCell(base, M, wrap_pos), segment_size=T)`` of
``modeling_rmt/language_modeling.py``, directories rmt-llama, rmt-gpt2, rmt-gpt2-wrap-pos): the same
files, with armt.json holding ``"kind": "rmt"`` and, instead of memory_A/memory_z, memory.npy
(2, M, d) (the memory after the last segment) and memory_per_segment.npy (S, 2, M, d) (after each).

Generation (every fixture): generate_<case>.npz from the official wrapper's ``generate`` (greedy,
8 new tokens, eos_token_id=None, pad_token_id=0, attention mask of ones, batch 2, no padding), for
three prompts: ``multi`` (N tokens: several segments, a partial last one), ``boundary`` (T * (N // T)
tokens: ends on a segment boundary), ``single`` (T - 2 tokens: one segment). Each prompt is the prefix
input_ids[:, :n] unless that prefix leads to a near-tie among the greedy choices (best and second-best
score closer than MIN_MARGIN): then it is the first seeded random draw of the same length without one
(generate.json "prompt" says which). Each npz: prompt_ids (2, n) int64, tokens (2, 8) int64 (new
tokens only), scores (2, 8, V) float32 (the logits each token was chosen from; equal to the raw
logits, no processor changes them) and the memory the generation used (ARMT: memory_A, memory_z as above; RMT: memory
(2, M, d), the memory tokens fed in front of the last segment). generate.json records, per case, what
the base model saw at each call (new positions, cached positions, position ids, number of layers
that read / wrote the associative memory) and the checks below.

What the official code does (read in its source, confirmed by the probes recorded in the jsons)
-------------------------------------------------------------------------------------------------
Segmentation (both): ``segment_alignment`` unset = left: segments [0, T), [T, 2T), ..., the last one
holds the N mod T remaining tokens and is run as a shorter segment (no padding, nothing dropped).

RMT forward, per segment of t tokens: inputs_embeds = [mem, embed(tokens), mem] (the same memory
tensor as read tokens in front and as write tokens behind, 2M + t positions), attention mask of
ones; logits and hidden states are the t middle positions; the next memory is
``hidden_states[-1][:, -M:]``, i.e. the last hidden state *after the final norm* (ln_f / RMSNorm) at
the M write positions. The first segment reads ``memory_cell.memory`` (a (M, d) parameter,
broadcast over the batch). Positions: without wrap_pos no position_ids are passed, so HF's default
applies with inputs_embeds (LLaMA: cache_position = arange; GPT-2: arange(past, past + len)) and each
segment gets 0 .. 2M + t - 1, restarting per segment: read memory 0..M-1, tokens M..M+t-1, write
memory M+t..2M+t-1 (so in a short last segment the write positions move down). With wrap_pos
(GPT-2 only) wpe is enlarged to P + 2M rows (P = n_positions of config.json; the old rows go to
M..M+P-1, rows 0..M-1 and P+M..P+2M-1 are new) and position_ids = [0 .. M+t-1, P+M .. P+2M-1]: read
memory 0..M-1, tokens M..M+t-1, write memory always P+M..P+2M-1, also in a short segment.

ARMT forward positions (for comparison): without wrap_pos 0 .. t+K-1 per segment (tokens 0..t-1, K
write tokens t..t+K-1); with wrap_pos tokens 0..t-1 and write tokens P..P+K-1 (wpe enlarged to P+K,
old rows kept at 0..P-1).

RMT generate(input_ids, attention_mask): every prompt segment but the last is run through the cell
(forward, writing memory); the last segment is fed to ``base.generate`` as inputs_embeds =
[mem, embed(last segment)] without the write tokens, attention mask of ones (M + t). ``mem`` is the
memory written by the previous segment, or ``memory_cell.memory`` for a one-segment prompt. No
position_ids are passed, also with wrap_pos: HF generate derives them from the attention mask
(cumsum - 1): read memory 0..M-1, prompt tokens M..M+t-1, the j-th new token (j = 0, 1, ...) is fed
at M+t+j. This equals the forward positions of the read part, for wrap_pos too. For a prompt that
ends on a boundary the last segment is a full one (T tokens), fed the same way. New tokens never
start a new segment and never write memory (the context simply grows past T).

ARMT generate: ``zero_mem``, every prompt segment but the last through the cell (writing memory),
then ``generate_mode(True)`` (no writes) and ``base.generate(inputs_embeds=embed(last segment),
attention mask of ones)``: no memory tokens at all. Every layer wrapper adds ``associate(h)`` to its
input for every hidden state it sees unless ``first_seg``, so the last prompt segment and every
generated token read the memory written by the earlier segments (the memory of the last segment is
never written). One-segment prompt: first_seg stays True, nothing reads (with A = 0, z = 0 a read
would add 0 / 1e-5 = 0 anyway). Positions: 0..t-1 for the prompt, t+j for the j-th new token (from
the attention mask; with wrap_pos the write rows P..P+K-1 are never used in generate).

KV cache: both generates use HF's cache (use_cache defaults to True): the first base call sees the
whole fed prompt, every later call one new token with past = all previous positions (GPT-2: legacy
tuple cache, LLaMA: DynamicCache); 8 new tokens take 8 calls (the last token is never fed). ARMT
reads are per token (a function of the token's own hidden state and the fixed memory), so the cached
decode equals a full re-forward: recorded per case as ``scores_vs_reforward`` (a no-cache forward,
through the official cell, of the prompt's last segment and the new tokens, after the earlier
segments; RMT likewise). ``first_score_vs_forward`` compares scores[:, 0]
with the official wrapper's forward logits at the prompt's last position (the same computation:
causal attention, the write tokens sit behind). ``scores_without_carried_memory`` (prompts of more
than one segment) is the same re-forward with the earlier segments skipped (ARMT: nothing reads;
RMT: the last segment reads the initial memory), so the generate fixtures test the memory.
``min_top2_margin`` is the smallest gap between the best and second-best score.

Memory matters (RMT, recorded in armt.json ``memory_matters``, rel = max|diff| / max|ref|): the
logits of segments 1.. when every segment after the first reads zeros instead of the carried
memory, or reads the initial memory parameter again (no carry); the first segment is unchanged. The
carried memory is a normed hidden state (entries ~1, against embeddings of std 0.15), so it matters
a lot (rel > 1).

Side notes: both wrap_pos variants replace every GPT-2 layer's causal-mask buffer ``attn.bias`` by a
larger uint8 tril (non-persistent, not in the checkpoint); torch 2.13 warns that a uint8 condition in
torch.where is deprecated. The GPT-2 config.json keeps the original n_positions; the enlarged wpe is
only in checkpoint.pt.

Nothing here is copied from the official code; it is imported and run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "official"
OFFICIAL_REPO = "RodkinIvan/associative-recurrent-memory-transformer"

# name -> base HF config (without model_type-specific defaults), wrapper settings, run shape, scales
FIXTURES: dict[str, dict] = {
    "llama": dict(
        base=dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                  attention_bias=False),
        armt=dict(segment_size=5, num_mem_tokens=3, d_mem=4, correction=True, wrap_pos=False),
        tokens=17, seed=11),
    "llama-nocorr-bias": dict(
        base=dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, intermediate_size=40, rms_norm_eps=1e-5,
                  rope_theta=500.0, max_position_embeddings=64, tie_word_embeddings=True,
                  attention_bias=True),
        armt=dict(segment_size=4, num_mem_tokens=2, d_mem=3, correction=False, wrap_pos=False),
        tokens=14, seed=12),
    "gpt2": dict(
        base=dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=24, n_inner=48,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
        armt=dict(segment_size=6, num_mem_tokens=3, d_mem=4, correction=True, wrap_pos=False),
        tokens=21, seed=13),
    "gpt2-wrap-pos": dict(
        base=dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=24, n_inner=48,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
        armt=dict(segment_size=6, num_mem_tokens=3, d_mem=4, correction=True, wrap_pos=True),
        tokens=21, seed=14),
}

# decoder-only RMT: RecurrentWrapper(MemoryCell(base, num_mem_tokens, wrap_pos), segment_size=...)
RMT_FIXTURES: dict[str, dict] = {
    "rmt-llama": dict(
        base=dict(model_type="llama", vocab_size=64, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-6,
                  rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
                  attention_bias=False),
        rmt=dict(segment_size=5, num_mem_tokens=3, wrap_pos=False),
        tokens=17, seed=21),
    "rmt-gpt2": dict(
        base=dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=24, n_inner=48,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
        rmt=dict(segment_size=6, num_mem_tokens=2, wrap_pos=False),
        tokens=21, seed=22),
    "rmt-gpt2-wrap-pos": dict(
        base=dict(model_type="gpt2", vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=24, n_inner=48,
                  layer_norm_epsilon=1e-5, activation_function="gelu_new"),
        rmt=dict(segment_size=6, num_mem_tokens=3, wrap_pos=True),
        tokens=21, seed=23),
}

BASE_STD = 0.15  # every base matrix and embedding
NORM_STD = 0.1  # norm scales are 1 + NORM_STD * noise (so a swapped norm is caught)
BIAS_STD = 0.05
MEM_STD = 0.03  # W_mq, W_mk, W_mv, W_mb: keeps q . z well above the 1e-5 epsilon yet lets memory matter
BATCH = 2

MAX_NEW_TOKENS = 8
GENERATE_KWARGS = dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1, output_scores=True,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
MIN_MARGIN = 1e-3  # greedy choices closer than this would make the generate fixtures fragile
MAX_DRAWS = 50


def import_official(repo: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """(modeling_amt.language_modeling, modeling_rmt.language_modeling) of the official checkout."""
    for sub in ("modeling_amt", "modeling_rmt"):
        if not (repo / sub / "language_modeling.py").is_file():
            sys.exit(f"error: {repo} does not hold {sub}/language_modeling.py")
    if importlib.util.find_spec("wandb") is None:
        sys.modules["wandb"] = types.ModuleType("wandb")  # imported at the top, only used in comments
    sys.path.insert(0, str(repo))
    return (importlib.import_module("modeling_amt.language_modeling"),
            importlib.import_module("modeling_rmt.language_modeling"))


def official_commit(repo: Path, given: str | None) -> str:
    if given:
        return given
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                              text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit("error: --official-repo is not a git work tree; pass --official-commit")


def build_base(spec: dict) -> torch.nn.Module:
    import transformers
    base = dict(spec["base"])
    arch = base.pop("model_type")
    cfg_cls, model_cls, layers = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, "model.layers"),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, "transformer.h"),
    }[arch]
    config = cfg_cls(**base)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    if model.config._attn_implementation != "eager":
        raise RuntimeError("could not select eager attention")
    return model, layers


def set_weights(wrapper: torch.nn.Module, seed: int) -> None:
    """Every parameter from one seeded generator (named_parameters visits aliased modules once)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapper.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if any(m in name for m in (".W_mq.", ".W_mk.", ".W_mv.", ".W_mb.")):
                p.copy_(noise * (MEM_STD if name.endswith("weight") else BIAS_STD))
            elif name.endswith("memory_cell.memory"):
                p.copy_(noise * BASE_STD)
            elif p.dim() == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + NORM_STD * noise)
            elif p.dim() == 1:
                p.copy_(noise * BIAS_STD)
            else:
                p.copy_(noise * BASE_STD)


class StateRecorder:
    """Wraps memory_cell.zero_mem so the memory state is captured before the wrapper clears it."""

    def __init__(self, cell: torch.nn.Module):
        self.cell = cell
        self.last: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._orig = cell.zero_mem
        cell.zero_mem = self._zero_mem

    def _zero_mem(self) -> None:
        self.last = [(layer.W_mem.detach().clone(), layer.z.detach().clone()) for layer in self.cell.layers]
        self._orig()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last captured state as (L, B, K, d) and (L, B, K)."""
        A = torch.stack([s[0].expand(BATCH, -1, -1) for s in self.last])
        z = torch.stack([s[1].expand(BATCH, -1) for s in self.last])
        return A, z


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class Probe:
    """Records every call of the base model: new positions, cached positions, position ids as the
    embedding (GPT-2 wpe) or rotary table (LLaMA) receives them and, for ARMT, how many layers read
    (``associate``) and wrote (``update_mem``) the associative memory during the call."""

    def __init__(self, base: torch.nn.Module, armt_layers=None):
        self.calls: list[dict] = []
        self._handles = [base.register_forward_pre_hook(self._call, with_kwargs=True)]
        if hasattr(base, "transformer"):
            self._handles.append(base.transformer.wpe.register_forward_pre_hook(
                lambda m, args: self._positions(args[0])))
        else:
            self._handles.append(base.model.rotary_emb.register_forward_pre_hook(
                lambda m, args: self._positions(args[1])))
        self._layers = list(armt_layers or [])
        for layer in self._layers:
            layer.associate = self._counting(layer.associate, "reads")
            layer.update_mem = self._counting(layer.update_mem, "writes")

    def _call(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        past = kwargs.get("past_key_values")
        if past is None:
            cached = 0
        elif hasattr(past, "get_seq_length"):
            cached = int(past.get_seq_length())
        else:
            cached = int(past[0][0].shape[-2])
        self.calls.append(dict(new=int(x.shape[1]), cached=cached, positions=None, reads=0, writes=0))

    def _positions(self, pos: torch.Tensor) -> None:
        pos = pos.expand(BATCH, -1) if pos.shape[0] == 1 else pos
        if not bool((pos == pos[:1]).all()):
            raise RuntimeError("rows got different positions")
        self.calls[-1]["positions"] = pos[0].tolist()

    def _counting(self, fn, key):
        def counted(*args, **kwargs):
            self.calls[-1][key] += 1
            return fn(*args, **kwargs)
        return counted

    def close(self) -> list[dict]:
        for h in self._handles:
            h.remove()
        for layer in self._layers:
            del layer.associate, layer.update_mem
        return self.calls


def write_config(base: torch.nn.Module, out_dir: Path) -> None:
    hf = base.config.to_dict()
    hf.pop("_attn_implementation_autoset", None)
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez's layout (one NAME.npy per array, stored), with fixed timestamps so a re-run is byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


# ---------------------------------------------------------------------------------------------- ARMT

def build_armt(lm: types.ModuleType, spec: dict):
    """The official ARMT wrapper around a fresh base (weights are set by the caller)."""
    torch.manual_seed(spec["seed"])
    base, layers_attr = build_base(spec)
    a = spec["armt"]
    cell = lm.AssociativeMemoryCell(base, num_mem_tokens=a["num_mem_tokens"], d_mem=a["d_mem"],
                                    layers_attr=layers_attr, wrap_pos=a["wrap_pos"],
                                    correction=a["correction"])
    wrapper = lm.AssociativeRecurrentWrapper(cell, segment_size=a["segment_size"]).eval()
    return wrapper, base, cell


def make_fixture(lm: types.ModuleType, name: str, spec: dict, out_dir: Path) -> dict:
    wrapper, base, cell = build_armt(lm, spec)
    a = spec["armt"]
    set_weights(wrapper, spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    V = base.config.vocab_size
    ids = torch.randint(0, V, (BATCH, spec["tokens"]), generator=gen)
    recorder = StateRecorder(cell)
    with torch.no_grad():
        out = wrapper(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    A, z = recorder.stacked()

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(wrapper.state_dict(), out_dir / "checkpoint.pt")
    write_config(base, out_dir)
    import transformers
    meta = dict(a, nu=3, transformers_version=transformers.__version__, torch_version=torch.__version__,
                batch=BATCH, tokens=spec["tokens"], seed=spec["seed"])
    write_json(out_dir / "armt.json", meta)
    np.save(out_dir / "input_ids.npy", ids.numpy().astype(np.int64))
    np.save(out_dir / "logits.npy", out.logits.float().numpy())
    np.save(out_dir / "hidden.npy", out.hidden_states[-1].float().numpy())
    np.save(out_dir / "memory_A.npy", A.float().numpy())
    np.save(out_dir / "memory_z.npy", z.float().numpy())
    return {"name": name, "logits": tuple(out.logits.shape), "A": tuple(A.shape),
            "max|logit|": float(out.logits.abs().max())}


def load_armt_fixture(lm: types.ModuleType, spec: dict, fixture_dir: Path):
    """The official wrapper with the weights of the fixture's checkpoint.pt, checked against its logits."""
    wrapper, base, cell = build_armt(lm, spec)
    wrapper.load_state_dict(torch.load(fixture_dir / "checkpoint.pt", weights_only=True), strict=True)
    ids = torch.from_numpy(np.load(fixture_dir / "input_ids.npy"))
    with torch.no_grad():
        logits = wrapper(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    ref = torch.from_numpy(np.load(fixture_dir / "logits.npy"))
    if not torch.equal(logits, ref):
        raise RuntimeError(f"{fixture_dir}: the checkpoint does not reproduce logits.npy ({rel_err(logits, ref)})")
    return wrapper, ids


def armt_reforward(wrapper, prompt: torch.Tensor, tokens: torch.Tensor,
                   carry: bool = True) -> tuple[torch.Tensor, dict]:
    """No-cache forward, through the official cell, of what ARMT generate computes: the earlier prompt
    segments write memory, then (generate mode) the last segment followed by the new tokens.
    carry=False skips the earlier segments (no memory: nothing reads)."""
    cell, base = wrapper.memory_cell, wrapper.memory_cell.model
    segs = wrapper.segment(input_ids=prompt, attention_mask=torch.ones_like(prompt))
    cell.zero_mem()
    for seg in segs[:-1] if carry else []:
        cell(**seg, output_hidden_states=True, zero_mem=False)
    reads = not cell.layers[0].first_seg
    cell.generate_mode(True)
    x = torch.cat([segs[-1]["input_ids"], tokens[:, :-1]], dim=1)
    logits = base(inputs_embeds=base.get_input_embeddings()(x), attention_mask=torch.ones_like(x),
                  use_cache=False).logits
    cell.generate_mode(False)
    cell.zero_mem()
    t = segs[-1]["input_ids"].shape[1]
    return logits[:, t - 1:], {"reads_memory": reads}


# ----------------------------------------------------------------------------------------------- RMT

def build_rmt(rl: types.ModuleType, spec: dict):
    torch.manual_seed(spec["seed"])
    base, _ = build_base(spec)
    r = spec["rmt"]
    cell = rl.MemoryCell(base, num_mem_tokens=r["num_mem_tokens"], wrap_pos=r["wrap_pos"])
    wrapper = rl.RecurrentWrapper(cell, segment_size=r["segment_size"]).eval()
    set_weights(wrapper, spec["seed"])
    return wrapper, base, cell


def rmt_segments(wrapper, ids: torch.Tensor, replace=None) -> torch.Tensor:
    """Logits of the official cell run segment by segment; ``replace(memory)`` swaps the memory read
    by every segment after the first (None: the carried memory, as RecurrentWrapper.forward does)."""
    cell, memory, logits = wrapper.memory_cell, None, []
    for i, seg in enumerate(wrapper.segment(input_ids=ids, attention_mask=torch.ones_like(ids))):
        if i > 0 and replace is not None:
            memory = replace(memory)
        out, memory = cell(**seg, memory_state=memory, output_hidden_states=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def make_rmt_fixture(rl: types.ModuleType, name: str, spec: dict, out_dir: Path, provenance: dict) -> dict:
    wrapper, base, cell = build_rmt(rl, spec)
    r, T = spec["rmt"], spec["rmt"]["segment_size"]
    gen = torch.Generator().manual_seed(spec["seed"] + 1000)
    ids = torch.randint(0, base.config.vocab_size, (BATCH, spec["tokens"]), generator=gen)
    memories: list[torch.Tensor] = []
    hook = cell.register_forward_hook(lambda m, args, out: memories.append(out[1].detach().clone()))
    probe = Probe(base)
    with torch.no_grad():
        out = wrapper(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    calls = probe.close()
    hook.remove()
    n_seg = -(-spec["tokens"] // T)
    assert len(memories) == n_seg and len(calls) == n_seg

    with torch.no_grad():
        same = rmt_segments(wrapper, ids)
        zeros = rmt_segments(wrapper, ids, torch.zeros_like)
        no_carry = rmt_segments(wrapper, ids, lambda m: cell.set_memory(ids.shape))
    if not torch.equal(same, out.logits):
        raise RuntimeError("the segment loop does not reproduce RecurrentWrapper.forward")
    ref = out.logits
    matters = dict(
        zeros_later_segments=rel_err(zeros[:, T:], ref[:, T:]),
        initial_memory_later_segments=rel_err(no_carry[:, T:], ref[:, T:]),
        first_segment_unchanged=bool(torch.equal(zeros[:, :T], ref[:, :T])
                                     and torch.equal(no_carry[:, :T], ref[:, :T])),
        measure="max|logits(swapped memory) - logits| / max|logits| over the positions of segments 1..")
    if min(matters["zeros_later_segments"], matters["initial_memory_later_segments"]) < 0.05:
        raise RuntimeError(f"{name}: the memory barely matters: {matters}")

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(wrapper.state_dict(), out_dir / "checkpoint.pt")
    write_config(base, out_dir)
    import transformers
    meta = dict(kind="rmt", **r, segment_alignment="left", batch=BATCH, tokens=spec["tokens"], seed=spec["seed"],
                **provenance, transformers_version=transformers.__version__, torch_version=torch.__version__,
                memory_matters=matters,
                positions_per_segment=[c["positions"] for c in calls])
    write_json(out_dir / "armt.json", meta)
    np.save(out_dir / "input_ids.npy", ids.numpy().astype(np.int64))
    np.save(out_dir / "logits.npy", out.logits.float().numpy())
    np.save(out_dir / "hidden.npy", out.hidden_states[-1].float().numpy())
    np.save(out_dir / "memory.npy", memories[-1].float().numpy())
    np.save(out_dir / "memory_per_segment.npy", torch.stack(memories).float().numpy())
    return {"name": name, "logits": tuple(out.logits.shape), "memory_matters": matters,
            "max|logit|": float(out.logits.abs().max())}


def rmt_reforward(wrapper, prompt: torch.Tensor, tokens: torch.Tensor,
                  carry: bool = True) -> tuple[torch.Tensor, dict]:
    """No-cache forward of what RMT generate computes: the earlier prompt segments through the cell,
    then the base on [memory, last segment, new tokens] (no write tokens, default positions).
    carry=False skips the earlier segments (the last one reads the initial memory)."""
    cell, base = wrapper.memory_cell, wrapper.memory_cell.model
    segs = wrapper.segment(input_ids=prompt, attention_mask=torch.ones_like(prompt))
    memory = None
    for seg in segs[:-1] if carry else []:
        _, memory = cell(**seg, memory_state=memory, output_hidden_states=True)
    initial = memory is None
    if initial:
        memory = cell.set_memory(prompt.shape)
    x = torch.cat([segs[-1]["input_ids"], tokens[:, :-1]], dim=1)
    emb = torch.cat([memory, base.get_input_embeddings()(x)], dim=1)
    logits = base(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                  use_cache=False).logits
    t = segs[-1]["input_ids"].shape[1]
    return logits[:, cell.num_mem_tokens + t - 1:], {"memory": memory, "reads_initial_memory": initial}


# ------------------------------------------------------------------------------------------ generate

def prompt_lengths(N: int, T: int) -> dict[str, int]:
    assert N % T != 0 and N // T >= 2 and T >= 3
    return {"multi": N, "boundary": T * (N // T), "single": T - 2}


def candidate_prompts(ids: torch.Tensor, n: int, seed: int, vocab: int):
    """The prefix ids[:, :n] first, then seeded random draws (a random tiny model often has near-ties
    among its best next tokens; a prompt whose greedy choices are that close is skipped)."""
    yield 0, ids[:, :n]
    gen = torch.Generator().manual_seed(seed)
    for draw in range(1, MAX_DRAWS + 1):
        yield draw, torch.randint(0, vocab, (BATCH, n), generator=gen)


def run_generate(kind: str, wrapper, prompt: torch.Tensor, T: int, recorder) -> tuple[dict, dict, float]:
    """The official generate on one prompt: arrays for the npz, the facts for generate.json, the margin."""
    cell, base = wrapper.memory_cell, wrapper.memory_cell.model
    n, n_seg = int(prompt.shape[1]), -(-prompt.shape[1] // T)
    memories: list[torch.Tensor] = []
    hook = cell.register_forward_hook(lambda m, args, out: memories.append(out[1].detach().clone())) \
        if kind == "rmt" else None
    probe = Probe(base, cell.layers if kind == "armt" else None)
    with torch.no_grad():
        g = wrapper.generate(prompt, torch.ones_like(prompt), **GENERATE_KWARGS)
    calls = probe.close()
    if hook is not None:
        hook.remove()
    tokens, scores, raw = g.sequences, torch.stack(g.scores, dim=1), torch.stack(g.logits, dim=1)
    assert tokens.shape == (BATCH, MAX_NEW_TOKENS), tokens.shape
    if not (torch.equal(scores, raw) and torch.equal(tokens, scores.argmax(-1))):
        raise RuntimeError("scores are not the raw logits the tokens were chosen from")
    top2 = scores.topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())

    arrays = dict(prompt_ids=prompt.numpy().astype(np.int64), tokens=tokens.numpy().astype(np.int64),
                  scores=scores.float().numpy())
    with torch.no_grad():
        if kind == "armt":
            A, z = recorder.stacked()  # the state generate ran with (its final zero_mem captured it)
            arrays.update(memory_A=A.float().numpy(), memory_z=z.float().numpy())
            ref, info = armt_reforward(wrapper, prompt, tokens)
        else:
            ref, info = rmt_reforward(wrapper, prompt, tokens)
            expected = memories[-1] if memories else cell.set_memory(prompt.shape)
            if len(memories) != n_seg - 1 or not torch.equal(info["memory"], expected):
                raise RuntimeError("unexpected memory flow in generate")
            arrays["memory"] = info.pop("memory").float().numpy()
        reforward = armt_reforward if kind == "armt" else rmt_reforward
        alone = reforward(wrapper, prompt, tokens, carry=False)[0] if n_seg > 1 else None
        forward = wrapper(input_ids=prompt, attention_mask=torch.ones_like(prompt)).logits
    facts = dict(prompt_tokens=n, segments=n_seg, last_segment_tokens=n - (n_seg - 1) * T,
                 segments_writing_memory=n_seg - 1, **info, base_calls=calls,
                 scores_vs_reforward=rel_err(scores, ref),
                 first_score_vs_forward=rel_err(scores[:, 0], forward[:, -1]),
                 scores_without_carried_memory=None if alone is None else rel_err(alone, scores),
                 min_top2_margin=margin)
    return arrays, facts, margin


def write_generate_fixtures(kind: str, wrapper, ids: torch.Tensor, T: int, seed: int, out_dir: Path,
                            provenance: dict) -> dict:
    """generate_<case>.npz and generate.json beside a forward fixture, from the official generate."""
    import transformers
    recorder = StateRecorder(wrapper.memory_cell) if kind == "armt" else None
    vocab = wrapper.memory_cell.model.config.vocab_size
    summary: dict = dict(kind=kind, **provenance, transformers_version=transformers.__version__,
                         torch_version=torch.__version__,
                         generate_kwargs={k: v for k, v in GENERATE_KWARGS.items() if k != "output_logits"},
                         attention_mask="ones", min_margin=MIN_MARGIN, cases={})
    for i, (case, n) in enumerate(prompt_lengths(ids.shape[1], T).items()):
        for draw, prompt in candidate_prompts(ids, n, seed + 2000 + i, vocab):
            arrays, facts, margin = run_generate(kind, wrapper, prompt, T, recorder)
            if margin >= MIN_MARGIN:
                break
        else:
            raise RuntimeError(f"{out_dir.name}/{case}: no prompt with a greedy margin >= {MIN_MARGIN}")
        save_npz(out_dir / f"generate_{case}.npz", **arrays)
        summary["cases"][case] = dict(prompt=f"input_ids[:, :{n}]" if draw == 0 else
                                      f"torch.randint(0, {vocab}, (2, {n})), draw {draw} of "
                                      f"torch.Generator().manual_seed({seed + 2000 + i})", **facts)
    write_json(out_dir / "generate.json", summary)
    keys = ("prompt", "scores_vs_reforward", "first_score_vs_forward", "scores_without_carried_memory",
            "min_top2_margin")
    return {"name": out_dir.name, "generate": {c: {k: v[k] for k in keys} for c, v in summary["cases"].items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-repo", required=True, type=Path,
                        help="directory holding modeling_amt/ and modeling_rmt/ of the official code")
    parser.add_argument("--official-commit", help="the commit of that checkout (default: git rev-parse HEAD in it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="fixtures directory")
    parser.add_argument("--only", action="append", choices=sorted([*FIXTURES, *RMT_FIXTURES]), help="build only these")
    parser.add_argument("--keep-armt", action="store_true",
                        help="do not rewrite the ARMT forward files, only their generate files (from checkpoint.pt)")
    args = parser.parse_args()
    repo = args.official_repo.resolve()
    lm, rl = import_official(repo)
    provenance = dict(official_repo=OFFICIAL_REPO, official_commit=official_commit(repo, args.official_commit))
    for name in args.only or [*FIXTURES, *RMT_FIXTURES]:
        out_dir = args.out / name
        if name in FIXTURES:
            spec = FIXTURES[name]
            if not args.keep_armt:
                print(json.dumps(make_fixture(lm, name, spec, out_dir)))
            wrapper, ids = load_armt_fixture(lm, spec, out_dir)
            print(json.dumps(write_generate_fixtures("armt", wrapper, ids, spec["armt"]["segment_size"],
                                                     spec["seed"], out_dir, provenance)))
        else:
            spec = RMT_FIXTURES[name]
            print(json.dumps(make_rmt_fixture(rl, name, spec, out_dir, provenance)))
            wrapper, _, _ = build_rmt(rl, spec)
            wrapper.load_state_dict(torch.load(out_dir / "checkpoint.pt", weights_only=True), strict=True)
            ids = torch.from_numpy(np.load(out_dir / "input_ids.npy"))
            print(json.dumps(write_generate_fixtures("rmt", wrapper, ids, spec["rmt"]["segment_size"],
                                                     spec["seed"], out_dir, provenance)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
