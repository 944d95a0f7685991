"""Model ids over every weight (issue 13): noise on any one weight changes the id; model directories
record it when written and loading reads it back; a fine-tuned copy's state, and `verify --model`
against it, are refused with exit 2 and a line that names both ids."""

import shutil

import numpy as np
import pytest
import torch

from graphs.modeldir import WEIGHTS, load_model_dir, recorded_model_id, save_model_dir
from graphs.state import save_state
from armt.cli import main
from tests.helpers import tiny_model


def _noisy(model, group, name, index=(0,), scale=1e-4):
    with torch.no_grad():
        getattr(model, group)[name][index].add_(scale)
    return model


@pytest.mark.parametrize("group,name", [("layers", "qkv"), ("layers", "down"), ("globals", "embed"),
                                        ("globals", "final_norm_w"), ("mem", "w_k"), ("globals", "memory")])
def test_noise_on_one_weight_changes_the_id(group, name):
    base = tiny_model("llama").model_id()
    assert tiny_model("llama").model_id() == base  # deterministic
    assert _noisy(tiny_model("llama"), group, name).model_id() != base
    assert _noisy(tiny_model("llama"), group, name).model_id().split("-")[0] == base.split("-")[0]  # same config


def test_another_config_changes_the_id():
    assert tiny_model("llama").model_id().split("-")[0] != tiny_model("llama", segment_size=5).model_id().split("-")[0]


def test_model_directory_records_the_id_it_recomputes(tmp_path):
    model = tiny_model("gpt2")
    save_model_dir(model, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    assert recorded_model_id(tmp_path / "m") == loaded.recorded_model_id == loaded.model_id() == model.model_id()
    # weights rewritten by another tool (no recorded id): the id is computed from the tensors
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "m" / WEIGHTS))
    tensors[next(iter(tensors))][0] += 1e-3
    save_file(tensors, str(tmp_path / "m" / WEIGHTS), metadata={"format": "pt"})
    edited = load_model_dir(tmp_path / "m")
    assert edited.recorded_model_id is None and edited.known_model_id() != model.model_id()


def test_an_edited_config_makes_the_recorded_id_stale(tmp_path):
    import json
    save_model_dir(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "armt_config.json").read_text())
    cfg["segment_size"] = 5
    (tmp_path / "m" / "armt_config.json").write_text(json.dumps(cfg))
    loaded = load_model_dir(tmp_path / "m")
    assert loaded.recorded_model_id is None
    assert loaded.known_model_id() == loaded.model_id() != recorded_model_id(tmp_path / "m")


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def test_fine_tuned_copy_refuses_the_originals_state(tmp_path, capsys):
    original = tiny_model("llama")
    save_model_dir(original, tmp_path / "orig")
    save_model_dir(_noisy(tiny_model("llama"), "layers", "gate_up", (1, 2, 3)), tmp_path / "tuned")
    ids = np.random.default_rng(0).integers(0, 61, (1, 9))
    np.save(tmp_path / "ids.npy", ids)
    assert main(["run", str(tmp_path / "orig"), "--input-ids", str(tmp_path / "ids.npy"),
                 "--state-out", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    code = main(["run", str(tmp_path / "tuned"), "--input-ids", str(tmp_path / "ids.npy"),
                 "--state-in", str(tmp_path / "s.npz"), "--output", str(tmp_path / "out.npy")])
    assert code == 2 and not (tmp_path / "out.npy").exists()
    tuned_id = load_model_dir(tmp_path / "tuned").model_id()
    _one_line(capsys, "another model", original.model_id(), tuned_id)
    assert original.model_id() != tuned_id


def test_state_of_the_export_of_another_model_is_refused_on_ort(tmp_path, capsys):
    from tests.test_runtime_ort import exported, fresh_model
    export_dir, _ = exported("llama")
    tuned = _noisy(fresh_model("llama"), "mem", "w_v", (0, 0, 0))
    np.save(tmp_path / "ids.npy", np.zeros((2, 6), np.int64))
    save_state(tmp_path / "tuned.npz", tuned.zero_state(2), tuned.model_id())
    assert main(["run", str(export_dir), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy"),
                 "--state-in", str(tmp_path / "tuned.npz")]) == 2
    _one_line(capsys, "another model", tuned.model_id(), fresh_model("llama").model_id())


def test_verify_model_refuses_a_fine_tuned_copy(tmp_path, capsys):
    """`armt verify EXPORT --model COPY` with noise on every weight but the memory tokens: another
    model (exit 2, both ids), not a parity miss (exit 1). The copy's recorded id is not trusted:
    verify recomputes it from the tensors."""
    from tests.test_runtime_ort import exported
    export_dir, model_dir = exported("llama")
    copy = tmp_path / "tuned"
    shutil.copytree(model_dir, copy)
    model = load_model_dir(copy)
    with torch.no_grad():
        for group in (model.layers, model.mem):
            for p in group.values():
                p.add_(1e-3 * torch.randn_like(p))
    from safetensors.torch import save_file
    from graphs.hf_layout import hf_from_params
    save_file(hf_from_params(model), str(copy / WEIGHTS),  # the original's id left in the header, as a hostile copy would
              metadata={"format": "pt", "armt_model_id": recorded_model_id(model_dir)})
    assert main(["verify", str(export_dir), "--model", str(copy)]) == 2
    _one_line(capsys, "another model", model.model_id(), recorded_model_id(model_dir))
