"""Large checkpoints (issue 12): sharded safetensors with an index, meta-device loading without
random initialisation, the stored dtype kept (graphs/tensorfile.py, graphs/modeldir.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from armt.cli import main
from graphs import tensorfile
from graphs.errors import CheckpointError
from graphs.modeldir import WEIGHTS, load_model_dir, recorded_model_id, save_model_dir
from tests.helpers import tiny_model, tiny_rmt

LLAMA = "tests/fixtures/official/llama"


def _params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def _same(a, b):
    pa, pb = _params(a), _params(b)
    return pa.keys() == pb.keys() and all(pa[k].dtype == pb[k].dtype and torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("make", [lambda: tiny_model("llama"), lambda: tiny_model("gpt2"), lambda: tiny_rmt("llama")],
                         ids=["armt-llama", "armt-gpt2", "rmt-llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_round_trip(tmp_path, make, dtype):
    model = make().cast(dtype)
    one = save_model_dir(model, tmp_path / "one")
    sharded = save_model_dir(model, tmp_path / "sharded", shard_bytes=4096)
    index = json.loads((sharded / tensorfile.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (sharded / WEIGHTS).exists()
    for s in shards:  # at most the limit of tensor data, or one tensor larger than it alone
        held = load_file(sharded / s)
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= 4096
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_file(one / WEIGHTS).values())
    a, b = load_model_dir(one), load_model_dir(sharded)
    assert _same(a, model) and _same(b, model)  # tensors equal, dtype kept
    assert a.dtype == dtype == b.dtype
    # the model id is the same for the same tensors, sharded or not, recorded and recomputed
    assert recorded_model_id(one) == recorded_model_id(sharded) == a.model_id() == b.model_id() == model.model_id()
    # every shard is a plain safetensors file
    merged = {}
    for s in shards:
        merged.update(load_file(sharded / s))
    assert merged.keys() == load_file(one / WEIGHTS).keys()


def test_bf16_stays_bf16_on_disk(tmp_path):
    model = tiny_model("llama")
    fp32 = save_model_dir(model, tmp_path / "fp32")
    bf16 = save_model_dir(model.cast(torch.bfloat16), tmp_path / "bf16")
    stored = load_file(bf16 / WEIGHTS)
    assert {t.dtype for k, t in stored.items() if not k.startswith("armt.layers.")} == {torch.bfloat16}
    assert {t.dtype for k, t in stored.items() if k.startswith("armt.layers.")} == {torch.float32}
    assert (bf16 / WEIGHTS).stat().st_size < 0.75 * (fp32 / WEIGHTS).stat().st_size  # no fp32 doubling
    back = load_model_dir(bf16)
    assert back.dtype == torch.bfloat16 and back.mem["w_q"].dtype == torch.float32
    assert back.known_model_id() == back.model_id() == recorded_model_id(bf16)


def test_meta_device_load_initialises_nothing(tmp_path, monkeypatch):
    d = save_model_dir(tiny_model("llama"), tmp_path / "m")
    want = load_model_dir(d)

    def no_init(*a, **k):
        raise AssertionError("random initialisation while loading a model directory")
    for name in ("randn", "rand", "normal", "randint"):
        monkeypatch.setattr(torch, name, no_init)
    monkeypatch.setattr(torch.Tensor, "normal_", no_init)
    got = load_model_dir(d)
    assert _same(got, want)
    assert all(p.device.type == "cpu" for p in got.parameters())
    assert got.inv_freq is not None and got.inv_freq.device.type == "cpu"


def test_loaded_parameters_do_not_alias_the_file(tmp_path):
    """The stacked tensors are copies: the mapping is private and nothing points into it afterwards."""
    d = save_model_dir(tiny_model("gpt2"), tmp_path / "m")
    model = load_model_dir(d)
    before = (d / WEIGHTS).read_bytes()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert (d / WEIGHTS).read_bytes() == before
    assert not any(hasattr(p, "_armt_mapped") for p in model.parameters())


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / tensorfile.INDEX).write_text("{nope"), "not valid JSON"),
    (lambda d: (d / tensorfile.INDEX).write_text('{"weight_map": {"x": "../evil.safetensors"}}'), "not a file beside"),
    (lambda d: _drop_listed(d), "does not hold what"),
    (lambda d: _truncate_first_shard(d), "truncated or damaged|not a safetensors file"),
])
def test_broken_shards_are_refused(tmp_path, damage, message):
    d = save_model_dir(tiny_model("llama"), tmp_path / "m", shard_bytes=4096)
    damage(d)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model_dir(d)
    assert "\n" not in str(info.value)


def _drop_listed(d):
    index = json.loads((d / tensorfile.INDEX).read_text())
    name = sorted(index["weight_map"])[0]
    index["weight_map"][name + ".extra"] = index["weight_map"][name]
    (d / tensorfile.INDEX).write_text(json.dumps(index))


def _truncate_first_shard(d):
    shard = sorted(p for p in d.iterdir() if p.name.startswith("model-"))[0]
    shard.write_bytes(shard.read_bytes()[:-5])


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10 ** 9), ("2GiB", 2 * 1024 ** 3), ("500mb", 5 * 10 ** 8),
                                        ("4096", 4096)])
def test_parse_size(text, value):
    assert tensorfile.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1GB", "lots", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(CheckpointError):
        tensorfile.parse_size(text)


def test_convert_official_shards_and_keeps_dtype(tmp_path):
    ckpt = tmp_path / "bf16.safetensors"
    from graphs.checkpoint import read_checkpoint
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in read_checkpoint(f"{LLAMA}/checkpoint.pt").items()},
              str(ckpt))
    settings = json.loads(open(f"{LLAMA}/armt.json").read())
    args = ["convert-official", str(ckpt), "--base-config", LLAMA, "--segment-size", str(settings["segment_size"]),
            "--num-mem-tokens", str(settings["num_mem_tokens"]), "--d-mem", str(settings["d_mem"])]
    assert main([*args, "-o", str(tmp_path / "one")]) == 0
    assert main([*args, "--shard-size", "4KB", "-o", str(tmp_path / "sharded")]) == 0
    assert (tmp_path / "sharded" / tensorfile.INDEX).is_file()
    a, b = load_model_dir(tmp_path / "one"), load_model_dir(tmp_path / "sharded")
    assert a.dtype == torch.bfloat16 and _same(a, b) and a.model_id() == b.model_id()
    assert main([*args, "--shard-size", "lots", "-o", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
