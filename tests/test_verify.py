"""`armt verify`: passes on a good export; exit 1 when parity breaks (a weight altered with the checksums
recomputed, another model's graph swapped in); exit 2 on a checksum mismatch or bad input; exit 3 when
a requested backend cannot run here (TensorRT without a supported GPU), never counted as passed."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx.external_data_helper import ExternalDataInfo

from exporter.manifest import Manifest, write_manifest
from graphs.errors import ExportError
from graphs.modeldir import save_model_dir
from armt.cli import main
from runtimes.verify import generated_cases
from tests.helpers import flip_bits, tiny_model
from tests.test_runtime_ort import V, export_copy, exported, fresh_model, rechecksum


def _verify(export_dir, *args):
    return main(["verify", str(export_dir), *map(str, args)])


def _largest_external_tensor(graph_path):
    proto = onnx.load(str(graph_path), load_external_data=False)
    ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    t = max(ext, key=lambda t: int(ExternalDataInfo(t).length or 0))
    info = ExternalDataInfo(t)
    return t.name, info.location, int(info.offset or 0), int(info.length)


def test_good_export_passes_with_per_graph(capsys):
    export_dir, model_dir = exported("llama")
    assert _verify(export_dir, "--model", model_dir, "--per-graph") == 0
    out = capsys.readouterr().out
    ran = len(generated_cases(fresh_model("llama").cfg)) * 2 * 5  # cases x schedules x tensors
    assert f"{ran + 10}/{ran + 10} comparisons within bounds (fp32)" in out  # + 10 per-graph outputs:
    # segment 4 (hidden, A_out, z_out, written_out), diagonal_step 5 (+ hidden_out), lm_head 1 (logits)
    assert "graph diagonal_step" in out and "FAIL" not in out and "not run" not in out


def test_fp16_export_passes_against_its_precision(capsys):
    export_dir, model_dir = exported("llama-fp16")
    assert _verify(export_dir, "--model", model_dir, "--precision", "fp16", "--schedule", "diagonal") == 0
    assert "within bounds (fp16)" in capsys.readouterr().out


def test_given_ids_and_mask(tmp_path, capsys):
    export_dir, model_dir = exported("llama")
    np.save(tmp_path / "ids.npy", np.random.default_rng(1).integers(0, V, (2, 17)))
    np.save(tmp_path / "mask.npy", (np.arange(17)[None] < np.array([17, 4])[:, None]).astype(np.int64))
    assert _verify(export_dir, "--model", model_dir, "--input-ids", tmp_path / "ids.npy",
                   "--attention-mask", tmp_path / "mask.npy") == 0
    out = capsys.readouterr().out
    assert "given 2x17" in out and "10/10 comparisons" in out


def test_altered_weight_with_recomputed_checksums_fails_parity(tmp_path, capsys):
    """One weight changed by 0.01 inside the external data; the checksums then made to match, so
    only the parity comparison can catch it: exit 1, and the per-graph comparison flags it too."""
    export_dir, model_dir = exported("llama")
    d = export_copy("llama", tmp_path / "altered")
    name, location, offset, length = _largest_external_tensor(d / "segment.onnx")
    with open(d / location, "r+b") as f:
        f.seek(offset + 4 * (length // 8))  # a float32 in the middle of the tensor
        value = np.frombuffer(f.read(4), np.float32)[0]
        f.seek(offset + 4 * (length // 8))
        f.write(np.float32(value + 0.01).tobytes())
    rechecksum(d)
    assert _verify(d, "--model", model_dir, "--per-graph") == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "polygraphy: mismatch" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armt verify: error:") and "missed" in err[0]


def _swap_in_other_model(tmp_path, stamp=True):
    """A copy of the LLaMA export whose diagonal_step.onnx is the same graph of a different model (same
    interface, its own weights file, manifest updated consistently)."""
    from exporter.export import fix_io
    from exporter.trace import trace_graph
    from exporter.weights import SharedWeights
    from graphs.contracts import contract
    d = export_copy("llama", tmp_path / "swapped")
    other = fresh_model("llama")  # the same architecture with other weights (say, another fine-tune)
    with torch.no_grad():
        other.layers["qkv"].mul_(1.1)
    c = contract(other.cfg, "diagonal_step", "fp32")
    from exporter.provenance import read_metadata_props
    original = read_metadata_props(d / "diagonal_step.onnx") if stamp else {}

    def edit(p):
        fix_io(p, "diagonal_step", c.inputs, c.outputs, dict(c.derived_dims))
        if stamp:  # a hostile swap copies the original graph's provenance: only parity can catch it
            onnx.helper.set_model_props(p, original)
    SharedWeights(d, name="swapped.data").adopt_ir(trace_graph(other, "diagonal_step", "fp32"), d / "other.onnx", edit)
    (d / "other.onnx").replace(d / "diagonal_step.onnx")
    m = Manifest.from_dict(json.loads((d / "manifest.json").read_text()), root=d)
    m.graphs["diagonal_step"] = dataclasses.replace(m.graphs["diagonal_step"],
                                                    data_files=("weights.data", "swapped.data"))
    m.files["swapped.data"] = m.files["weights.data"]  # placeholder, recomputed next
    write_manifest(d, m)
    rechecksum(d)
    return d


def test_graph_of_another_model_swapped_in_fails_parity(tmp_path, capsys):
    """diagonal_step.onnx replaced by another model's: the diagonal schedule misses, the sequential passes."""
    _, model_dir = exported("llama")
    d = _swap_in_other_model(tmp_path)
    assert _verify(d, "--model", model_dir) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("ort ")]
    assert any(r[1] == "diagonal" and r[-1] == "FAIL" for r in rows)
    assert all(r[-1] == "ok" for r in rows if r[1] == "sequential")


def test_graph_swapped_in_without_its_exports_provenance_is_refused(tmp_path, capsys):
    _, model_dir = exported("llama")
    d = _swap_in_other_model(tmp_path, stamp=False)
    assert _verify(d, "--model", model_dir) == 2
    assert "diagonal_step.onnx records no export provenance" in capsys.readouterr().err


def test_checksum_mismatch_is_bad_input(tmp_path, capsys):
    _, model_dir = exported("llama")
    d = export_copy("llama", tmp_path / "tampered")
    flip_bits(d / "sample_feeds.npz", 100, 1)
    assert _verify(d, "--model", model_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sample_feeds.npz was altered (sha256" in err


def test_wrong_reference_and_bad_arguments(tmp_path, capsys):
    export_dir, model_dir = exported("llama")
    other_dir = save_model_dir(tiny_model("llama", seed=7), tmp_path / "other")
    assert _verify(export_dir, "--model", other_dir) == 2
    err = capsys.readouterr().err
    assert "is another model than the one this export was made from" in err and tiny_model("llama", seed=7).model_id() in err
    assert _verify(export_dir, "--model", model_dir, "--backend", "onnx") == 2
    assert "--backend must be" in capsys.readouterr().err
    assert _verify(export_dir, "--model", model_dir, "--precision", "bf16") == 2
    assert "holds fp32 graphs" in capsys.readouterr().err
    np.save(tmp_path / "oov.npy", np.full((1, 5), 99))
    assert _verify(export_dir, "--model", model_dir, "--input-ids", tmp_path / "oov.npy") == 2
    assert f"must lie in [0, {V})" in capsys.readouterr().err
    assert _verify(tmp_path / "nothing", "--model", model_dir) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on machines without a GPU")
def test_trt_not_run_is_not_a_pass(tmp_path, capsys):
    """With engines built (TensorRT-RTX builds without a GPU) but no GPU to execute them: ORT rows
    pass, TensorRT gets a 'not run' row with its reason, and the exit code is 3, not 0."""
    pytest.importorskip("tensorrt_rtx")
    from exporter.engines import build_engines
    _, model_dir = exported("llama")
    d = export_copy("llama", tmp_path / "engines")
    build_engines(d)
    assert _verify(d, "--model", model_dir, "--backend", "ort,trt", "--schedule", "diagonal") == 3
    captured = capsys.readouterr()
    assert "not run: TensorRT engines execute on a CUDA GPU" in captured.out
    assert "NOT RUN (not counted as passed): trt" in captured.out
    assert "not counted as passed" in captured.err
    # the TensorRT runner refuses clearly when asked directly
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int64))
    assert main(["run", str(d), "--backend", "trt", "--input-ids", str(tmp_path / "ids.npy")]) == 3
    assert "TensorRT engines execute on a CUDA GPU" in capsys.readouterr().err


def test_trt_without_engines_is_bad_input(capsys):
    export_dir, model_dir = exported("llama")
    assert _verify(export_dir, "--model", model_dir, "--backend", "trt") == 2
    assert "run `armt build" in capsys.readouterr().err


def test_self_contained_verify_rebuilds_the_reference_from_the_export(tmp_path, capsys):
    """Without --model the torch reference is the export's own weights (manifest parameter index):
    a good export passes, one whose diagonal graph computes with other weights fails (exit 1)."""
    export_dir, _ = exported("llama")
    assert _verify(export_dir) == 0
    assert "FAIL" not in capsys.readouterr().out
    d = _swap_in_other_model(tmp_path)
    assert _verify(d) == 1
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("ort ")]
    assert any(r[1] == "diagonal" and r[-1] == "FAIL" for r in rows)
    assert all(r[-1] == "ok" for r in rows if r[1] == "sequential")


def test_report_exit_codes():
    from runtimes.verify import Report, Row
    r = Report("x", "fp32")
    assert r.exit_code == 0
    r.rows.append(Row("trt", "diagonal", "*", "*", status="not run", note="no GPU"))
    assert r.exit_code == 3
    r.rows.append(Row("ort", "diagonal", "c", "A", status="FAIL"))
    assert r.exit_code == 1
    with pytest.raises(ExportError):
        from runtimes.verify import compare_runs, Case, RunResult
        from graphs.state import MemoryState
        st = MemoryState.zeros(1, 1, 2, 2)
        compare_runs(RunResult(None, None, st, None, 0, [st]), RunResult(None, None, st, None, 0, []),
                     Case("c", np.zeros((1, 1), dtype=np.int64), None), 6, "fp32")


def test_noise_widening_is_capped_and_never_for_exact_or_nan():
    from exporter.bounds import compare as cmp
    from runtimes.verify import NOISE_CAP, NOISE_FACTOR, judge
    ref = torch.linspace(-1, 1, 1000)
    got = ref + 3e-5  # rel 3e-5: misses the fp32 bound 1e-5
    quiet = cmp("A", "A", "fp32", ref + 1e-7, ref)
    noisy = cmp("A", "A", "fp32", ref - 1e-5, ref)  # the reference's own spread: 1e-5
    assert not judge(cmp("A", "A", "fp32", got, ref), quiet).ok
    widened = judge(cmp("A", "A", "fp32", got, ref), noisy)
    assert widened.ok and widened.bound.rel == pytest.approx(min(NOISE_FACTOR * 1e-5, NOISE_CAP * 1e-5), rel=1e-2)
    huge = cmp("A", "A", "fp32", ref * 1.5, ref)  # a reference that is noise only cannot excuse anything
    assert judge(cmp("A", "A", "fp32", ref * 1.4, ref), huge).bound.rel == pytest.approx(NOISE_CAP * 1e-5)
    assert not judge(cmp("A", "A", "fp32", ref * 1.4, ref), huge).ok
    nan = ref.clone()
    nan[3] = float("nan")
    assert not judge(cmp("A", "A", "fp32", nan, ref), noisy).ok
    flags = torch.tensor([True, False])
    assert not judge(cmp("w", "written", "fp32", ~flags, flags), noisy).ok
