"""Official-checkpoint import: alias copies, named tensor problems, data-only loading, formats, model dirs."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from graphs.checkpoint import (convert_official, load_official, model_from_official, official_config,
                               read_checkpoint)
from graphs.errors import ArmtError, CheckpointError
from graphs.modeldir import ARMT_CONFIG, CONFIG, WEIGHTS, load_model_dir, save_model_dir

FIXTURES = Path(__file__).parent / "fixtures" / "official"
LLAMA, GPT2_WRAP = FIXTURES / "llama", FIXTURES / "gpt2-wrap-pos"
LP = "memory_cell.model.model.layers"  # LLaMA's decoder blocks inside the wrapper


def settings(d: Path) -> dict:
    s = json.loads((d / "armt.json").read_text())
    return dict(segment_size=s["segment_size"], num_mem_tokens=s["num_mem_tokens"], d_mem=s["d_mem"],
                wrap_pos=s["wrap_pos"], correction=s["correction"])


def cfg_of(d: Path, **change):
    return official_config(d, **dict(settings(d), **change))


def state_dict(d: Path = LLAMA) -> dict[str, torch.Tensor]:
    return read_checkpoint(d / "checkpoint.pt")


def build(sd: dict[str, torch.Tensor], d: Path = LLAMA, **change):
    return model_from_official(cfg_of(d, **change), sd, "ckpt.pt")


def logits(model, d: Path = LLAMA) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.from_numpy(np.load(d / "input_ids.npy")), schedule="sequential").logits


def error_of(sd, d: Path = LLAMA, **change) -> str:
    with pytest.raises(CheckpointError) as info:
        build(sd, d, **change)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------- alias copies
def test_checkpoint_holds_alias_copies_that_share_storage():
    sd = state_dict()
    alias, primary = "memory_cell.layers.1.W_mv.weight", f"{LP}.1.W_mv.weight"
    assert torch.equal(sd[alias], sd[primary])


def test_alias_copy_that_differs_is_refused():
    sd = state_dict()
    name = "memory_cell.layers.1.W_mv.weight"
    sd[name] = sd[name].clone()
    sd[name][3, 5] += 1e-3
    message = error_of(sd)
    assert name in message and f"{LP}.1.W_mv.weight" in message and "differs" in message


def test_alias_copy_of_a_block_tensor_with_another_shape_is_refused():
    sd = state_dict()
    name = "memory_cell.layers.0.layer.mlp.down_proj.weight"
    sd[name] = torch.zeros(3, 3)
    message = error_of(sd)
    assert name in message and "(3, 3)" in message


def test_alias_alone_is_used_when_the_primary_is_absent():
    sd = state_dict()
    reference = logits(build(dict(sd)))
    del sd[f"{LP}.2.layer.self_attn.k_proj.weight"]
    assert torch.equal(logits(build(sd)), reference)


# ------------------------------------------------------------------------------- named problems
def test_missing_tensor_is_named_by_its_official_name():
    sd = state_dict()
    for name in (f"{LP}.2.layer.mlp.up_proj.weight", "memory_cell.layers.2.layer.mlp.up_proj.weight"):
        del sd[name]
    message = error_of(sd)
    assert f"missing {LP}.2.layer.mlp.up_proj.weight" in message


def test_missing_memory_weight_is_named():
    sd = state_dict()
    for name in (f"{LP}.0.W_mb.bias", "memory_cell.layers.0.W_mb.bias"):
        del sd[name]
    assert f"missing {LP}.0.W_mb.bias" in error_of(sd)


def test_unexpected_tensors_are_named():
    sd = state_dict()
    sd["memory_cell.model.model.extra_scale"] = torch.ones(2)
    sd["optimizer_step"] = torch.tensor(3)
    message = error_of(sd)
    assert "unexpected" in message
    assert "memory_cell.model.model.extra_scale" in message and "optimizer_step" in message


def test_block_tensor_outside_the_wrapper_layer_is_unexpected():
    """`<lp>.{i}.<name>` without `.layer.` is not the ARMT layout: reported, not silently used."""
    sd = state_dict()
    sd[f"{LP}.0.self_attn.q_proj.weight"] = sd.pop(f"{LP}.0.layer.self_attn.q_proj.weight")
    del sd["memory_cell.layers.0.layer.self_attn.q_proj.weight"]
    message = error_of(sd)
    assert f"unexpected {LP}.0.self_attn.q_proj.weight" in message
    assert f"missing {LP}.0.layer.self_attn.q_proj.weight" in message


def test_misshaped_tensor_is_named_with_both_shapes():
    sd = state_dict()
    sd["memory_cell.model.model.norm.weight"] = torch.ones(31)
    message = error_of(sd)
    assert "mis-shaped memory_cell.model.model.norm.weight (31,) (expected (32,))" in message


def test_wrong_memory_settings_are_explained():
    sd = state_dict()
    assert "d_mem 4" in error_of(sd, d_mem=5) and "--d-mem is 5" in error_of(sd, d_mem=5)
    assert "3 memory tokens" in error_of(sd, num_mem_tokens=4)


def test_wrap_pos_mismatch_gives_a_hint():
    sd = state_dict(GPT2_WRAP)
    assert "pass --wrap-pos" in error_of(sd, GPT2_WRAP, wrap_pos=False)
    assert "drop --wrap-pos" in error_of(state_dict(FIXTURES / "gpt2"), FIXTURES / "gpt2", wrap_pos=True)


def test_architecture_mismatch_is_explained():
    message = error_of(state_dict(GPT2_WRAP), LLAMA)
    assert "holds a gpt2 model" in message and "describes llama" in message


def test_state_dict_of_another_model_is_refused():
    sd = {k[len("memory_cell.model."):]: v for k, v in state_dict().items() if k.startswith("memory_cell.model.")}
    assert "not a checkpoint of the official ARMT" in error_of(sd)


# ------------------------------------------------------------------------------- data-only loading
class _CreatesMarker:
    """Unpickling this object calls Path.touch(marker): code execution if the loader allowed it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_CreatesMarker(control)))  # the payload is live: plain unpickling runs it
    assert control.exists()

    marker = tmp_path / "marker"
    payload = {"memory_cell.memory": _CreatesMarker(marker)}
    path = tmp_path / "evil.pt"
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "refused" in message and "\n" not in message
    assert not marker.exists()


def test_cli_refuses_malicious_pickle_with_one_line(tmp_path, capsys):
    from armt.cli import main
    marker = tmp_path / "marker"
    torch.save({"w": _CreatesMarker(marker)}, tmp_path / "evil.pt")
    code = main(["convert-official", str(tmp_path / "evil.pt"), "--base-config", str(LLAMA),
                 "--segment-size", "5", "--num-mem-tokens", "3", "--d-mem", "4", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refused" in err[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"memory_cell.memory": torch.zeros(3, 32), "epoch": 3}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        read_checkpoint(tmp_path / "a.pt")
    torch.save([torch.zeros(2)], tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="not a state_dict"):
        read_checkpoint(tmp_path / "b.pt")


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "notes.pt").write_text("hello\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------- formats
def test_safetensors_checkpoint_gives_the_same_model(tmp_path):
    from safetensors.torch import save_file
    sd = state_dict()
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(tmp_path / "ckpt.safetensors"))
    s = settings(LLAMA)
    from_st = load_official(tmp_path / "ckpt.safetensors", LLAMA, **s)
    from_pt = load_official(LLAMA / "checkpoint.pt", LLAMA, **s)
    assert torch.equal(logits(from_st), logits(from_pt))


def test_training_checkpoint_nesting_and_dataparallel_prefix(tmp_path):
    sd = state_dict()
    reference = logits(build(dict(sd)))
    torch.save({"model_state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 7}, tmp_path / "t.pt")
    assert torch.equal(logits(build(read_checkpoint(tmp_path / "t.pt"))), reference)


def test_memory_cell_state_dict_without_wrapper_prefix():
    sd = {k[len("memory_cell."):]: v for k, v in state_dict().items()}
    assert torch.equal(logits(build(sd)), logits(build(state_dict())))


def test_bfloat16_checkpoint_stays_bfloat16():
    """The stored dtype is kept (issue 12: no fp32 doubling); the ARMT memory weights are fp32 always."""
    sd = {k: v.to(torch.bfloat16) for k, v in state_dict().items()}
    model = build(sd)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.globals.values()} == {torch.bfloat16}
    assert {p.dtype for p in model.mem.values()} == {torch.float32}
    assert torch.equal(model.layers["qkv"][0, :, :32].t(), sd[f"{LP}.0.layer.self_attn.q_proj.weight"])
    assert torch.equal(model.mem["w_q"][0].t(), sd[f"{LP}.0.W_mq.weight"].float())


def test_mixed_dtype_checkpoint_loads_as_fp32():
    sd = state_dict()
    sd["memory_cell.model.model.norm.weight"] = sd["memory_cell.model.model.norm.weight"].half()
    assert build(sd).dtype == torch.float32


# ------------------------------------------------------------------------------- model directories
def test_model_directory_round_trip(tmp_path):
    s = settings(GPT2_WRAP)
    out = convert_official(GPT2_WRAP / "checkpoint.pt", GPT2_WRAP, tmp_path / "m", **s)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG, ARMT_CONFIG, WEIGHTS, "CONVERTED.md"])
    armt_cfg = json.loads((out / ARMT_CONFIG).read_text())
    assert armt_cfg == dict(kind="armt", architecture="gpt2", nu=3, **s)  # the kind is recorded
    direct = load_official(GPT2_WRAP / "checkpoint.pt", GPT2_WRAP, **s)
    loaded = load_model_dir(out)
    assert direct.cfg == loaded.cfg
    for (name, a), (_, b) in zip(direct.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.globals["pos_embed"].shape[0] == 24 + 3  # n_positions + M with wrap_pos
    save_model_dir(loaded, tmp_path / "again")
    again = load_model_dir(tmp_path / "again")
    assert torch.equal(logits(again, GPT2_WRAP), logits(direct, GPT2_WRAP))


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    s = settings(LLAMA)
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArmtError, match="--overwrite"):
        convert_official(LLAMA / "checkpoint.pt", LLAMA, out, **s)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_official(LLAMA / "checkpoint.pt", LLAMA, out, overwrite=True, **s)
    assert not (out / "keep.txt").exists() and (out / WEIGHTS).is_file()


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import graphs.modeldir as modeldir

    def broken(model):
        raise CheckpointError("disk full (simulated)")
    monkeypatch.setattr(modeldir, "hf_tensors", broken)
    with pytest.raises(CheckpointError, match="simulated"):
        convert_official(LLAMA / "checkpoint.pt", LLAMA, tmp_path / "m", **settings(LLAMA))
    assert list(tmp_path.iterdir()) == []


def test_torch_load_is_weights_only(monkeypatch, tmp_path):
    """The loader passes weights_only=True (never relies on the torch default)."""
    seen = {}
    real = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    (tmp_path / "a.pt").write_bytes(buf.getvalue())
    read_checkpoint(tmp_path / "a.pt")
    assert seen.get("weights_only") is True and seen.get("map_location") == "cpu"


def test_deduplicated_checkpoint_keeping_only_aliases_and_the_head(tmp_path):
    """Savers that drop shared tensors may keep just one name of each alias group: here only the
    `memory_cell.layers.*` copies and, of the tied GPT-2 embedding, only `lm_head.weight`."""
    d = FIXTURES / "gpt2"
    sd = state_dict(d)
    reference = logits(build(dict(sd), d), d)
    slim = {k: v for k, v in sd.items()
            if not k.startswith("memory_cell.model.transformer.h.") and k != "memory_cell.model.transformer.wte.weight"}
    assert len(slim) < len(sd) and "memory_cell.model.lm_head.weight" in slim
    assert torch.equal(logits(build(slim, d), d), reference)


def test_non_finite_weights_are_refused():
    sd = state_dict()
    name = f"{LP}.1.layer.mlp.gate_proj.weight"
    sd[name] = sd[name].clone()
    sd[name][0, 0] = float("nan")
    sd["memory_cell.layers.1.layer.mlp.gate_proj.weight"] = sd[name]
    assert f"{name} holds NaN or Inf" in error_of(sd)
