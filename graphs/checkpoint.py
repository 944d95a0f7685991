"""Import checkpoints of the official ARMT implementation (RodkinIvan/associative-recurrent-memory-transformer).

An official checkpoint is the ``state_dict`` of
``AssociativeRecurrentWrapper(AssociativeMemoryCell(base_model))``. Its names, with ``<lp>`` the base
model's decoder-layer list (``model.layers`` for LLaMA, ``transformer.h`` for GPT-2):

    official name                                        -> model-directory name (graphs/hf_layout.py)
    memory_cell.memory                         (M, d)    -> armt.memory
    memory_cell.model.<lp>.{i}.W_mq.weight     (d_mem,d) -> armt.layers.{i}.W_mq.weight   (same for W_mk,
    memory_cell.model.<lp>.{i}.W_mb.bias       (1,)      -> armt.layers.{i}.W_mb.bias      W_mv, W_mb)
    memory_cell.model.<lp>.{i}.layer.<rest>              -> <lp>.{i}.<rest>               (the HF block)
    memory_cell.model.<other>                            -> <other>           (embeddings, final norm, head)
    memory_cell.layers.{i}.<rest>                        -> alias of memory_cell.model.<lp>.{i}.<rest>:
                                                            must be equal to it, then dropped

GPT-2 trained with ``wrap_pos`` has a position table of n_positions + M rows; the model directory keeps
it as is (``ModelConfig.pos_table_rows``). The running memory (A, z) is not part of a checkpoint.

An official RMT checkpoint (``--kind rmt``) is the ``state_dict`` of
``RecurrentWrapper(MemoryCell(base_model, num_mem_tokens, wrap_pos))`` (``modeling_rmt/``): the base
model's own keys, unrenamed, and the learned initial memory:

    memory_cell.memory                         (M, d)    -> rmt.memory
    memory_cell.model.<HF name>                          -> <HF name>         (every base-model tensor)

With ``wrap_pos`` (GPT-2) its position table has n_positions + 2M rows (the original rows at M..M+P-1),
kept as is. A checkpoint of the other kind is refused with a hint (--kind armt / --kind rmt).

Loading is data-only and streaming: ``.pt``/``.bin``/``.pth`` through ``torch.load(weights_only=True,
mmap=True)`` (memory-mapped: tensors are paged in as they are converted; a pickle that
asks for any Python object other than tensors and containers is refused before anything runs) and
``.safetensors`` mapped tensor by tensor (graphs/tensorfile.py). The model keeps the checkpoint's
dtype (a bf16 checkpoint gives a bf16 model directory; the ARMT memory weights are fp32). A state
dict saved from the memory cell itself (names without the ``memory_cell.`` prefix), or under a
DataParallel ``module.`` prefix, or nested in a training checkpoint under ``state_dict`` /
``model_state_dict`` / ``model``, is accepted too.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from graphs.config import ArmtConfig, ModelConfig, RmtConfig, parse_base_config
from graphs.errors import CheckpointError, ConfigError, InputError
from graphs.hf_layout import MEMORY_KEYS, layers_path

WRAPPER_PREFIX = "memory_cell."
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
_ALL_LAYER_PATHS = {"llama": "model.layers", "gpt2": "transformer.h"}


# ------------------------------------------------------------------------------------------- reading
def _refusal_detail(message: str) -> str:
    """The one informative line of torch's weights-only refusal (e.g. 'Unsupported GLOBAL posix.system')."""
    found = re.search(r"(unsupported (?:global|operand)[^\n]*)", message, re.I)
    if not found:
        return "it holds objects other than tensors"
    return re.split(r"\.\s", found.group(1).strip() + " ")[0].strip()  # the first sentence, not torch's advice


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a ``.safetensors`` or a weights-only torch file; never runs code."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        from graphs.modeldir import load_safetensors
        return load_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the error path speaks for itself
            data = _torch_load(path)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse the user's file is a bad checkpoint
        text = str(exc)
        if "Weights only load failed" in text:
            detail = _refusal_detail(text)
            if "global" in detail.lower():  # a pickle that names Python code to run
                raise CheckpointError(
                    f"{path}: refused: loading it would call Python objects beyond plain tensors ({detail}); "
                    "checkpoints are read as data only (torch.load weights_only=True)") from None
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: torch.load(weights_only=True) "
                                  f"refused it ({detail})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint "
                              f"({exc.__class__.__name__}: {text.splitlines()[0][:120] if text else ''})") from None
    return _flat_tensors(data, path)


def _torch_load(path: Path):
    """torch.load, data only, memory-mapped (tensors are paged in when used, so a checkpoint larger
    than memory opens); a file in the legacy (pre-zip) format cannot be mapped and is read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _flat_tensors(data: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint's nesting and a DataParallel prefix; every value must be a tensor."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state_dict (a dict of tensors)")
    if not any(isinstance(v, torch.Tensor) for v in data.values()):
        for key in NESTED_KEYS:
            if isinstance(data.get(key), dict):
                return _flat_tensors(data[key], path)
    bad = [k for k, v in data.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: state_dict entries that are not tensors: "
                              + ", ".join(map(str, bad[:5])))
    if data and all(k.startswith("module.") for k in data):
        data = {k[len("module."):]: v for k, v in data.items()}
    return dict(data)


# ------------------------------------------------------------------------------------------- renaming
class OfficialNames:
    """Official <-> model-directory names for one architecture."""

    def __init__(self, cfg: ModelConfig, prefix: str = WRAPPER_PREFIX):
        self.cfg = cfg
        self.prefix = prefix
        self.lp = layers_path(cfg.base.architecture)
        lp = re.escape(self.lp)
        mem = "|".join(re.escape(k) for k in MEMORY_KEYS)
        self._memory_re = re.compile(rf"^{lp}\.(\d+)\.({mem})$")
        self._block_re = re.compile(rf"^{lp}\.(\d+)\.layer\.(.+)$")
        self._hf_block_re = re.compile(rf"^{lp}\.(\d+)\.(.+)$")
        self._hf_memory_re = re.compile(r"^armt\.layers\.(\d+)\.(.+)$")

    def to_hf(self, name: str) -> str | None:
        """Model-directory name of an official tensor; None for the alias copies under `layers.`;
        an unrecognised name is returned unchanged (so it is reported as unexpected)."""
        p = self.prefix
        if name == p + "memory":
            return "armt.memory"
        if name.startswith(p + "layers."):
            return None
        if not name.startswith(p + "model."):
            return name
        rest = name[len(p + "model."):]
        m = self._memory_re.match(rest)
        if m:
            return f"armt.layers.{m.group(1)}.{m.group(2)}"
        m = self._block_re.match(rest)
        if m:
            return f"{self.lp}.{m.group(1)}.{m.group(2)}"
        if rest.startswith(self.lp + "."):
            return name  # a decoder-block tensor outside `.layer.`: not an ARMT layout
        return rest

    def to_official(self, hf_name: str) -> str:
        """The official name that would produce `hf_name` (for messages about missing tensors)."""
        p = self.prefix
        if hf_name == "armt.memory":
            return p + "memory"
        m = self._hf_memory_re.match(hf_name)
        if m:
            return f"{p}model.{self.lp}.{m.group(1)}.{m.group(2)}"
        m = self._hf_block_re.match(hf_name)
        if m:
            return f"{p}model.{self.lp}.{m.group(1)}.layer.{m.group(2)}"
        return p + "model." + hf_name

    def alias_of(self, name: str) -> str:
        """memory_cell.layers.{i}.<rest> -> memory_cell.model.<lp>.{i}.<rest>."""
        return f"{self.prefix}model.{self.lp}.{name[len(self.prefix + 'layers.'):]}"


def detect_prefix(tensors: dict[str, torch.Tensor], source: str) -> str:
    """'memory_cell.' for a wrapper's state_dict, '' for a memory cell's own."""
    if WRAPPER_PREFIX + "memory" in tensors:
        return WRAPPER_PREFIX
    if "memory" in tensors and any(k.startswith("model.") for k in tensors):
        return ""
    raise CheckpointError(f"{source}: no memory_cell.memory tensor: not a checkpoint of the official ARMT or RMT "
                          "code (a state_dict of AssociativeRecurrentWrapper(AssociativeMemoryCell(model)) or "
                          "RecurrentWrapper(MemoryCell(model)))")


def official_to_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename an official state_dict to model-directory names.

    Returns (tensors by model-directory name, model-directory name -> official name). Raises
    CheckpointError if an alias copy under `memory_cell.layers.` differs from the tensor it aliases.
    """
    prefix = detect_prefix(tensors, source)
    names = OfficialNames(cfg, prefix)
    _check_layout(cfg, names, tensors, source)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, t in tensors.items():
        hf = names.to_hf(name)
        if hf is None:
            continue
        if hf in out:
            raise CheckpointError(f"{source}: {name} and {origin[hf]} both map to {hf}")
        out[hf], origin[hf] = t, name
    for name, t in tensors.items():
        if names.to_hf(name) is not None:
            continue
        primary = names.alias_of(name)
        if primary not in tensors:  # only the alias was saved: it is the same module, so use it
            hf = names.to_hf(primary)
            if hf in out:
                raise CheckpointError(f"{source}: {name} and {origin[hf]} both map to {hf}")
            out[hf], origin[hf] = t, name
            continue
        other = tensors[primary]
        if tuple(other.shape) != tuple(t.shape) or other.dtype != t.dtype or not _same_values(other, t):
            detail = (f"shapes {tuple(t.shape)} vs {tuple(other.shape)}" if tuple(other.shape) != tuple(t.shape)
                      else f"dtypes {t.dtype} vs {other.dtype}" if other.dtype != t.dtype
                      else f"max |difference| {float((t.double() - other.double()).abs().max()):.3g}")
            raise CheckpointError(f"{source}: {name} differs from {primary}, the tensor it aliases ({detail}); "
                                  "the checkpoint is inconsistent")
    _untie(cfg, out, origin)
    _check_finite(out, origin, source)
    return out, origin


def _check_finite(out: dict[str, torch.Tensor], origin: dict[str, str], source: str) -> None:
    """Refuse NaN/Inf weights; pages of a mapped file read for the check are dropped again (tensorfile.release)."""
    from graphs.tensorfile import release
    for hf, t in out.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{source}: {origin[hf]} holds NaN or Inf values")
        release(t)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element (NaN equals NaN, so a shared tensor always equals itself)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


def _untie(cfg: ModelConfig, out: dict[str, torch.Tensor], origin: dict[str, str]) -> None:
    """Tied embeddings saved once under the head's name (deduplicating savers keep either name):
    the head's copy is the embedding."""
    embed = "model.embed_tokens.weight" if cfg.base.architecture == "llama" else "transformer.wte.weight"
    if cfg.base.tie_word_embeddings and embed not in out and "lm_head.weight" in out:
        out[embed], origin[embed] = out.pop("lm_head.weight"), origin.pop("lm_head.weight")


def _check_layout(cfg: ModelConfig, names: OfficialNames, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Friendly errors for the settings a user passes on the command line."""
    a, p = cfg.armt, names.prefix
    _check_architecture(cfg, names.lp, p, tensors, source)
    model_keys = [k[len(p + "model."):] for k in tensors if k.startswith(p + "model.")]
    block_keys = [k for k in model_keys if k.startswith(names.lp + ".")]
    if block_keys and not any(".layer." in k or ".W_m" in k for k in block_keys):
        raise CheckpointError(f"{source}: the checkpoint has no ARMT memory weights ({p}model.{names.lp}.<i>.W_mq "
                              "...) and unrenamed base-model blocks: it looks like an official RMT checkpoint "
                              "(pass --kind rmt)")
    _check_memory_and_positions(cfg, p, tensors, source)
    wq = tensors.get(f"{p}model.{names.lp}.0.W_mq.weight")
    if wq is not None and wq.dim() == 2 and wq.shape[0] != a.d_mem:
        raise CheckpointError(f"{source}: the checkpoint has d_mem {wq.shape[0]} ({p}model.{names.lp}.0."
                              f"W_mq.weight {tuple(wq.shape)}), --d-mem is {a.d_mem}")


def _check_architecture(cfg: ModelConfig, lp: str, p: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """A checkpoint of one base family with the other family's config is named as such."""
    b = cfg.base
    model_keys = [k[len(p + "model."):] for k in tensors if k.startswith(p + "model.")]
    if not any(k.startswith(lp + ".") for k in model_keys):
        for arch, other in _ALL_LAYER_PATHS.items():
            if arch != b.architecture and any(k.startswith(other + ".") for k in model_keys):
                raise CheckpointError(f"{source}: the checkpoint holds a {arch} model ({other}.*), the base "
                                      f"config describes {b.architecture}")


def _check_memory_and_positions(cfg: ModelConfig, p: str, tensors: dict[str, torch.Tensor], source: str) -> None:
    """memory_cell.memory against --num-mem-tokens and d_model; GPT-2's position table against --wrap-pos."""
    b, a = cfg.base, cfg.armt
    mem = tensors[p + "memory"]
    if mem.dim() != 2 or mem.shape[1] != b.d_model:
        raise CheckpointError(f"{source}: {p}memory has shape {tuple(mem.shape)}, the base config needs "
                              f"(num_mem_tokens, {b.d_model})")
    if mem.shape[0] != a.num_mem_tokens:
        raise CheckpointError(f"{source}: the checkpoint has {mem.shape[0]} memory tokens ({p}memory "
                              f"{tuple(mem.shape)}), --num-mem-tokens is {a.num_mem_tokens}")
    wpe = tensors.get(p + "model.transformer.wpe.weight")
    if b.architecture == "gpt2" and wpe is not None and wpe.dim() == 2:
        rows, extra = wpe.shape[0], a.num_mem_tokens * (2 if cfg.kind == "rmt" else 1)
        if rows != cfg.pos_table_rows:
            hint = (" (trained with wrap_pos: pass --wrap-pos)" if not a.wrap_pos and rows == b.n_positions + extra
                    else " (trained without wrap_pos: drop --wrap-pos)" if a.wrap_pos and rows == b.n_positions
                    else "")
            raise CheckpointError(f"{source}: {p}model.transformer.wpe.weight has {rows} rows, expected "
                                  f"{cfg.pos_table_rows}{hint}")


def _official_message(message: str, source: str, names: OfficialNames, origin: dict[str, str]) -> str:
    """Rewrite model-directory names in a params_from_hf error back to the checkpoint's own names."""
    head = f"{source}: " if message.startswith(f"{source}: ") else ""

    def repl(m: re.Match) -> str:
        token = m.group(0)
        if token in origin:
            return origin[token]
        if token.startswith(("armt.", "rmt.", "model.", "transformer.", "lm_head.")):
            return names.to_official(token)
        return token
    return head + re.sub(r"[A-Za-z_][\w.]*\.\w+", repl, message[len(head):])


# ------------------------------------------------------------------------------------------- RMT
class RmtOfficialNames:
    """Official RMT <-> model-directory names: the base model's keys sit unrenamed under `model.`."""

    def __init__(self, cfg: ModelConfig, prefix: str = WRAPPER_PREFIX):
        self.cfg, self.prefix = cfg, prefix

    def to_hf(self, name: str) -> str:
        """Model-directory name of an official tensor (an unrecognised name comes back unchanged)."""
        p = self.prefix
        if name == p + "memory":
            return "rmt.memory"
        if name.startswith(p + "model."):
            return name[len(p + "model."):]
        return name

    def to_official(self, hf_name: str) -> str:
        return self.prefix + ("memory" if hf_name == "rmt.memory" else "model." + hf_name)


def rmt_official_to_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename an official RMT state_dict to model-directory names: (tensors, model-dir name -> official name)."""
    prefix = detect_prefix(tensors, source)
    names = RmtOfficialNames(cfg, prefix)
    lp = layers_path(cfg.base.architecture)
    _check_architecture(cfg, lp, prefix, tensors, source)
    armt_like = [k for k in tensors if re.match(rf"^{re.escape(prefix)}(model\.{re.escape(lp)}\.\d+\.(layer\.|W_m)|layers\.)", k)]
    if armt_like:
        raise CheckpointError(f"{source}: the checkpoint holds ARMT memory layers ({armt_like[0]}): it is an official "
                              "ARMT checkpoint (convert it with --kind armt)")
    _check_memory_and_positions(cfg, prefix, tensors, source)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, t in tensors.items():
        hf = names.to_hf(name)
        if hf in out:
            raise CheckpointError(f"{source}: {name} and {origin[hf]} both map to {hf}")
        out[hf], origin[hf] = t, name
    _untie(cfg, out, origin)
    _check_finite(out, origin, source)
    return out, origin


# ------------------------------------------------------------------------------------------- building
def model_from_official(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str = "checkpoint"):
    """A model of the config's kind (ArmtModel or graphs.rmt.RmtModel, eval mode, in the checkpoint's
    dtype: graphs/hf_layout.stored_dtype) from an official state_dict."""
    from graphs.modeldir import model_from_tensors
    rmt = cfg.kind == "rmt"
    hf, origin = (rmt_official_to_hf if rmt else official_to_hf)(cfg, tensors, source)
    try:
        return model_from_tensors(cfg, hf, source)
    except CheckpointError as exc:
        prefix = detect_prefix(tensors, source)
        names = RmtOfficialNames(cfg, prefix) if rmt else OfficialNames(cfg, prefix)
        raise CheckpointError(_official_message(str(exc), source, names, origin)) from None


def read_base_config(path: str | Path) -> dict:
    """The base model's HF config: a directory holding config.json (or the file itself)."""
    from graphs.modeldir import CONFIG, read_json
    path = Path(path)
    if path.is_dir():
        return read_json(path / CONFIG, "base config")
    if path.is_file() and path.suffix == ".json":
        return read_json(path, "base config")
    raise ConfigError(f"base config: {path} is not a directory holding {CONFIG}")


def official_config(base_config: str | Path, segment_size: int, num_mem_tokens: int, d_mem: int | None = None,
                    wrap_pos: bool = False, correction: bool = True, nu: int = 3, kind: str = "armt") -> ModelConfig:
    """The ModelConfig of an official model: an ARMT (needs `d_mem`) or, with kind="rmt", an RMT
    (takes no d_mem, correction or nu)."""
    base = parse_base_config(read_base_config(base_config))
    if kind == "rmt":
        if d_mem is not None or not correction or nu != 3:
            raise ConfigError("d_mem, correction and nu are ARMT settings; an RMT has no memory weights")
        return ModelConfig(base, RmtConfig(base.architecture, segment_size, num_mem_tokens, wrap_pos=wrap_pos))
    if kind != "armt":
        raise ConfigError(f"kind must be armt or rmt, got {kind!r}")
    if d_mem is None:
        raise ConfigError("an ARMT needs d_mem (the memory key width, --d-mem)")
    armt = ArmtConfig(base.architecture, segment_size, num_mem_tokens, d_mem, nu=nu,
                      correction=correction, wrap_pos=wrap_pos)
    return ModelConfig(base, armt)


def load_official(checkpoint: str | Path, base_config: str | Path, segment_size: int, num_mem_tokens: int,
                  d_mem: int | None = None, wrap_pos: bool = False, correction: bool = True, nu: int = 3,
                  kind: str = "armt"):
    """Read an official checkpoint and return the model it describes (its stored dtype, eval mode): an ArmtModel,
    or with kind="rmt" a graphs.rmt.RmtModel.

    `base_config`: directory holding the base model's HF config.json. The other arguments are the
    settings the official model was trained with (AssociativeMemoryCell / MemoryCell and the wrapper's
    segment_size).
    """
    cfg = official_config(base_config, segment_size, num_mem_tokens, d_mem, wrap_pos, correction, nu, kind)
    return model_from_official(cfg, read_checkpoint(checkpoint), str(checkpoint))


def load_official_rmt(checkpoint: str | Path, base_config: str | Path, segment_size: int, num_mem_tokens: int,
                      wrap_pos: bool = False):
    """An official RMT checkpoint (RecurrentWrapper(MemoryCell(base, num_mem_tokens, wrap_pos))) as a
    graphs.rmt.RmtModel (in the checkpoint's dtype)."""
    return load_official(checkpoint, base_config, segment_size, num_mem_tokens, wrap_pos=wrap_pos, kind="rmt")


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """The checks atomic_directory makes when it starts, made early."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output {out} already exists and is not empty (pass --overwrite to replace it)")


def convert_official(checkpoint: str | Path, base_config: str | Path, out_dir: str | Path, *,
                     segment_size: int, num_mem_tokens: int, d_mem: int | None = None, wrap_pos: bool = False,
                     correction: bool = True, nu: int = 3, overwrite: bool = False, kind: str = "armt",
                     shard_bytes: int | None = None, tokenizer: str | Path | None = None) -> Path:
    """Official checkpoint (ARMT, or with kind="rmt" RMT) -> model directory (written atomically, in
    the checkpoint's dtype; `shard_bytes`: safetensors shards of at most that size), with the HF
    tokenizer files of the directory `tokenizer` when given. Returns the directory."""
    from graphs.modeldir import save_model_dir
    from graphs.paths import OutputPath, check_paths
    # before the (possibly long) load: never write over, into or around the inputs; the settings; the output
    inputs = {"CKPT": checkpoint, "--base-config": base_config}
    if tokenizer is not None:
        from graphs.tokenizer import has_tokenizer, tokenizer_files
        if not Path(tokenizer).is_dir() or not has_tokenizer(tokenizer_files(tokenizer)):
            raise InputError(f"--tokenizer {tokenizer} is not a directory holding tokenizer files "
                             "(tokenizer.json, tokenizer.model, ...)")
        inputs["--tokenizer"] = tokenizer
    check_paths(inputs,
                [OutputPath("-o", out_dir, directory=True, overwrite=overwrite)])
    official_config(base_config, segment_size, num_mem_tokens, d_mem, wrap_pos, correction, nu, kind)
    check_output_dir(out_dir, overwrite)
    model = load_official(checkpoint, base_config, segment_size, num_mem_tokens, d_mem, wrap_pos,
                          correction, nu, kind)
    card = (f"Converted from the official {kind.upper()} checkpoint {Path(checkpoint).name} by "
            f"`armt convert-official{' --kind rmt' if kind == 'rmt' else ''}`.\n")
    return save_model_dir(model, out_dir, overwrite=overwrite, extra_files={"CONVERTED.md": card},
                          shard_bytes=shard_bytes, tokenizer_dir=tokenizer)
