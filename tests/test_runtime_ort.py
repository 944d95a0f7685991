"""ONNX Runtime (CPU) runner, both schedules, against the torch reference and the official ARMT's logits
(tests/fixtures/official); state files across backends; bad input on export directories. GPU paths
(ORT CUDA, TensorRT) are marked and run only where they can.

Exports are the slow part (tracing): three, made once per test process and shared with test_verify.py:
the official LLaMA and GPT-2 (wrap_pos) fixtures in fp32, and a tiny LLaMA in fp16."""

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.bounds import compare
from runtimes.validation import export_model
from exporter.manifest import Manifest, record_files, write_manifest
from graphs.checkpoint import load_official
from graphs.errors import BackendUnavailable, ExportError, InputError
from graphs.modeldir import save_model_dir
from graphs.state import load_state
from runtimes.execute import run_schedule
from armt.cli import main
from runtimes.ort_runner import OrtRunner
from tests.helpers import as_torch, flip_bits, rel_err, same, tiny_model
from tests.precision import fp32_bounds

ROLES = ["segment", "diagonal_step"]
FIXTURES = Path(__file__).parent / "fixtures" / "official"
KINDS = {"llama": "fp32", "gpt2-wrap-pos": "fp32", "llama-fp16": "fp16"}  # kind -> export precision
V = 64  # vocabulary of the official fixtures


# ------------------------------------------------------------------------------------------ shared exports
def _scratch() -> Path:
    """One directory per test process. Pytest imports this file as `test_runtime_ort` while
    test_verify.py imports `tests.test_runtime_ort`: two module objects, so the cache lives on disk."""
    root = Path(tempfile.gettempdir()) / f"armt-runtime-tests-{os.getpid()}"
    if not root.exists():
        root.mkdir()
        atexit.register(shutil.rmtree, root, True)
    return root


def fresh_model(kind: str):
    """A new fp32 model of `kind` (export_model casts the model it is given)."""
    if kind == "llama-fp16":
        return tiny_model("llama")
    s = json.loads((FIXTURES / kind / "armt.json").read_text())
    return load_official(FIXTURES / kind / "checkpoint.pt", FIXTURES / kind, s["segment_size"], s["num_mem_tokens"],
                         s["d_mem"], wrap_pos=s["wrap_pos"], correction=s["correction"])


def official(kind: str, what: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / kind / f"{what}.npy"))


def exported(kind: str) -> tuple[Path, Path]:
    """(export dir, model dir) of a tiny model, exported once per test process (tracing is the slow part)."""
    root = _scratch() / kind
    if (root / "export" / "manifest.json").is_file() and (root / "model").is_dir():
        return root / "export", root / "model"
    precision = KINDS[kind]
    model_dir = save_model_dir(fresh_model(kind), root / "model", overwrite=True)
    # validate=False: the exporter's own check is tested with the exporter; parity here is what these
    # tests measure (and the official LLaMA's memory state is ill-conditioned on the exporter's sample:
    # A differs by 3e-5 between two fp32 torch attention kernels, see runtimes/verify.py)
    export_model(fresh_model(kind), root / "export", precision=precision, validate=False, decode=False)  # casts its model
    return root / "export", model_dir


def export_copy(kind: str, dest: Path) -> Path:
    """A copy of an export directory to alter."""
    shutil.copytree(exported(kind)[0], dest)
    return dest


def rechecksum(export_dir: Path) -> None:
    """Recompute the manifest's checksums after an alteration (so only the parity check can catch it)."""
    m = Manifest.from_dict(json.loads((export_dir / "manifest.json").read_text()), root=export_dir)
    m.files = record_files(export_dir, list(m.files))
    write_manifest(export_dir, m)


def _ids(B, N, seed=1, V=V):
    return torch.randint(0, V, (B, N), generator=torch.Generator().manual_seed(seed))


def _check(got, ref, precision, what="", fp32=None):
    """fp16: the product's measured table (exporter/bounds.py); fp32: `fp32`, the bounds derived on the
    case (tests/precision.py fp32_bounds), when given (GPU paths without a float64 derivation use the table)."""
    for kind, a, b in (("logits", got.logits, ref.logits), ("hidden", got.hidden, ref.hidden),
                       ("A", got.state.A, ref.state.A), ("z", got.state.z, ref.state.z),
                       ("written", got.state.written, ref.state.written)):
        if precision == "fp32" and fp32 is not None and kind != "written":
            assert rel_err(a, b) < fp32[kind], f"{what} {kind}: rel {rel_err(a, b):.2e} bound {fp32[kind]:.2e}"
            continue
        c = compare(kind, kind, precision, a, b)
        assert c.ok, f"{what} {kind}: rel {c.rel:.2e} q {c.q_rel:.2e} bound {c.bound} {c.note}"


def _fp32_close(a, b, kind, ids, lengths=None, model_kind="llama"):
    """fp32 results on the exported `model_kind` fixture agree within the bound derived on this case."""
    bound = fp32_bounds(fresh_model(model_kind), ids, lengths)[kind]
    assert rel_err(a, b) < bound, (kind, rel_err(a, b), bound)


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("kind", ["llama", "gpt2-wrap-pos"])
@pytest.mark.parametrize("role", ROLES)
def test_ort_reproduces_official_logits(kind, role):
    """The exported official checkpoints on ONNX Runtime give the official implementation's logits,
    hidden states and final memory within the fp32 bound derived on the case (tests/precision.py),
    with either schedule."""
    export_dir, _ = exported(kind)
    with OrtRunner(export_dir, role) as runner:
        got = run_schedule(runner, official(kind, "input_ids"))
    bound = fp32_bounds(fresh_model(kind), official(kind, "input_ids"))
    for name, value, tensor in (("logits", got.logits, "logits"), ("hidden", got.hidden, "hidden"),
                                ("memory_A", got.state.A, "A"), ("memory_z", got.state.z, "z")):
        ref = official(kind, name)
        err = float((as_torch(value).double() - ref.double()).abs().max() / ref.double().abs().max())
        assert err < bound[tensor], (kind, role, name, err, bound[tensor])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("role", ROLES)
def test_ort_cpu_matches_torch_reference_per_segment(kind, role):
    export_dir, _ = exported(kind)
    precision = KINDS[kind]
    model = fresh_model(kind)
    reference = model if precision == "fp32" else fresh_model(kind).cast(torch.float16)
    lengths = torch.tensor([22, 5, 13])
    ids = _ids(3, 22, V=model.cfg.base.vocab_size)
    mask = (torch.arange(22)[None] < lengths[:, None]).long()
    with torch.no_grad():
        ref = reference(ids, attention_mask=mask, schedule="sequential", trace=True)
    with OrtRunner(export_dir, role) as runner:
        assert runner.model_id == model.model_id() and runner.precision == precision
        got = run_schedule(runner, ids, mask, trace=True)
    fp32 = fp32_bounds(model, ids, lengths.tolist()) if precision == "fp32" else None
    _check(got, ref, precision, f"{kind} {role}", fp32)
    S = len(ref.segment_states)
    assert len(got.segment_states) == S >= 4
    for s, (g, r) in enumerate(zip(got.segment_states, ref.segment_states)):
        for name in ("A", "z", "written"):
            if fp32 is not None and name != "written":
                assert rel_err(getattr(g, name), getattr(r, name)) < fp32[name], (s, name)
                continue
            c = compare(name, name, precision, getattr(g, name), getattr(r, name))
            assert c.ok, f"segment {s} {name}: rel {c.rel:.2e}"
    assert np.all(got.logits[1, 5:] == 0)
    if precision == "fp32":  # memory matters here: an empty memory before the last segment changes the logits
        T = model.cfg.armt.segment_size
        with torch.no_grad():
            amnesic = model(ids[:1, (S - 1) * T:], schedule="sequential")
        assert rel_err(amnesic.logits[0], ref.logits[0, (S - 1) * T:]) > 100 * fp32["logits"]


@pytest.mark.parametrize("role", ROLES)
def test_ort_padded_batch_equals_single_rows(role):
    export_dir, _ = exported("llama")
    lengths = [20, 6, 13, 1]
    ids = _ids(4, 20, seed=4)
    mask = (torch.arange(20)[None] < torch.tensor(lengths)[:, None]).long()
    with OrtRunner(export_dir, role) as runner:
        batch = run_schedule(runner, ids, mask)
        for row, n in enumerate(lengths):
            alone = run_schedule(runner, ids[row:row + 1, :n])
            for kind, a, b in (("logits", batch.logits[row, :n], alone.logits[0]),
                               ("A", batch.state.A[:, row], alone.state.A[:, 0]),
                               ("z", batch.state.z[:, row], alone.state.z[:, 0])):
                _fp32_close(a, b, kind, ids, lengths)
            assert same(batch.state.written[:, row], alone.state.written[:, 0])


@pytest.mark.parametrize("role", ROLES)
def test_ort_resume_equals_one_call(role):
    """A run cut at a segment boundary and resumed from its state equals the uncut run."""
    export_dir, _ = exported("llama")
    ids = _ids(2, 29, seed=5)
    with OrtRunner(export_dir, role) as runner:
        cut = 2 * runner.cfg.armt.segment_size
        whole = run_schedule(runner, ids)
        first = run_schedule(runner, ids[:, :cut])
        second = run_schedule(runner, ids[:, cut:], state=first.state)
    _fp32_close(np.concatenate([first.logits, second.logits], 1), whole.logits, "logits", ids)
    _fp32_close(second.state.A, whole.state.A, "A", ids)
    _fp32_close(second.state.z, whole.state.z, "z", ids)


def test_ort_state_stays_in_runner_buffers():
    """The loop feeds the runner's own output buffers back: after the first call no input is staged
    again for the carried tensors, and outputs alternate between two buffers (ping-pong)."""
    export_dir, _ = exported("llama")
    with OrtRunner(export_dir, "diagonal_step") as runner:
        run_schedule(runner, _ids(1, 40))
        flat = runner._buffers._flat  # (kind, name, slot, shape) -> buffer
        assert {k[:3] for k in flat if k[0] == "out" and k[1] in ("hidden_out", "A_out")} == {
            ("out", "hidden_out", 0), ("out", "hidden_out", 1), ("out", "A_out", 0), ("out", "A_out", 1)}
        assert not any(k[:3] == ("out", "logits", 1) for k in flat)  # logits are never fed back: one buffer
        before = {k: v.ptr for k, v in flat.items()}
        run_schedule(runner, _ids(1, 40, seed=2))
        assert {k: v.ptr for k, v in flat.items()} == before  # same shapes: nothing reallocated


def test_torch_state_file_loads_for_ort(tmp_path):
    """A state written by the torch backend (model dir) resumes on ONNX Runtime (export dir)."""
    export_dir, model_dir = exported("llama")
    ids = _ids(2, 20, seed=6).numpy()
    cut = 2 * fresh_model("llama").cfg.armt.segment_size  # resuming equals one run at segment boundaries
    np.save(tmp_path / "a.npy", ids[:, :cut])
    np.save(tmp_path / "b.npy", ids[:, cut:])
    np.save(tmp_path / "all.npy", ids)
    assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "a.npy"),
                 "--state-out", str(tmp_path / "s.npz")]) == 0
    for schedule in ("sequential", "diagonal"):
        assert main(["run", str(export_dir), "--backend", "ort", "--schedule", schedule, "--input-ids",
                     str(tmp_path / "b.npy"), "--state-in", str(tmp_path / "s.npz"),
                     "--output", str(tmp_path / "b.npy.out.npy"),
                     "--state-out", str(tmp_path / "s2.npz")]) == 0
        assert main(["run", str(model_dir), "--input-ids", str(tmp_path / "all.npy"), "--output",
                     str(tmp_path / "all_out.npy"), "--state-out", str(tmp_path / "s_all.npz")]) == 0
        part, whole = np.load(tmp_path / "b.npy.out.npy"), np.load(tmp_path / "all_out.npy")
        _fp32_close(part, whole[:, cut:], "logits", ids)
        model_id = fresh_model("llama").model_id()
        _fp32_close(load_state(tmp_path / "s2.npz", model_id).A, load_state(tmp_path / "s_all.npz", model_id).A, "A", ids)


# ------------------------------------------------------------------------------------------ bad input
def _one_line(capsys, match):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and match in err, err


def test_bad_input_on_exports(tmp_path, capsys):
    export_dir, _ = exported("llama")
    np.save(tmp_path / "ids.npy", _ids(2, 8).numpy())
    np.save(tmp_path / "oov.npy", _ids(2, 8).numpy() + V)
    np.save(tmp_path / "left.npy", np.array([[1] * 8, [0] * 3 + [1] * 5]))
    run = lambda *a: main(["run", str(export_dir), "--backend", "ort", *map(str, a)])  # noqa: E731
    assert run("--input-ids", tmp_path / "oov.npy") == 2
    _one_line(capsys, f"must lie in [0, {V})")
    assert run("--input-ids", tmp_path / "ids.npy", "--attention-mask", tmp_path / "left.npy") == 2
    _one_line(capsys, "right-padded")
    other = tiny_model("llama", seed=9)  # another model: its id differs
    from graphs.state import save_state
    save_state(tmp_path / "other.npz", other.zero_state(2), other.model_id())
    assert run("--input-ids", tmp_path / "ids.npy", "--state-in", tmp_path / "other.npz") == 2
    _one_line(capsys, "another model")
    assert run("--input-ids", tmp_path / "ids.npy", "--precision", "fp16") == 2
    _one_line(capsys, "holds fp32 graphs, not fp16")
    assert run("--input-ids", tmp_path / "ids.npy", "--device", "cuda") == (0 if _cuda_ep() else 3)
    if not _cuda_ep():
        _one_line(capsys, "CUDA")


def test_altered_or_missing_export_files(tmp_path, capsys):
    np.save(tmp_path / "ids.npy", _ids(1, 8).numpy())
    altered = export_copy("llama", tmp_path / "altered")
    flip_bits(altered / "weights.data", 9000, 0x40)
    run = lambda d: main(["run", str(d), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy")])  # noqa: E731
    assert run(altered) == 2
    _one_line(capsys, "weights.data was altered (sha256")
    missing = export_copy("llama", tmp_path / "missing")
    (missing / "diagonal_step.onnx").unlink()
    assert run(missing) == 2
    _one_line(capsys, "diagonal_step.onnx is missing")
    with pytest.raises(ExportError, match="manifest.json is missing"):
        OrtRunner(tmp_path, "segment")


def test_swapped_graph_files_are_refused(tmp_path):
    """segment.onnx and diagonal_step.onnx exchanged (checksums recomputed): refused before running
    anything, by the graphs' recorded roles when the export is opened (exporter/provenance.py)."""
    d = export_copy("llama", tmp_path / "swapped")
    (d / "segment.onnx").rename(d / "tmp.onnx")
    (d / "diagonal_step.onnx").rename(d / "segment.onnx")
    (d / "tmp.onnx").rename(d / "diagonal_step.onnx")
    rechecksum(d)
    with pytest.raises(ExportError, match="'graphs.segment.role'.*exported with role diagonal_step"):
        OrtRunner(d, "diagonal_step").activate()


def test_runner_refuses_wrong_feeds():
    export_dir, _ = exported("llama")
    with OrtRunner(export_dir, "segment") as runner:
        model = fresh_model("llama")
        st = model.zero_state(1)
        feeds = {"input_ids": _ids(1, 6), "positions": torch.arange(9)[None],
                 "key_valid": torch.ones(1, 9, dtype=torch.bool),
                 "write": torch.ones(1, dtype=torch.bool), "A_in": st.A, "z_in": st.z, "written_in": st.written}
        out = runner.infer({k: v.numpy() for k, v in feeds.items()})
        assert runner.to_numpy(out["hidden"]).shape == (1, 6, model.cfg.base.d_model)  # logits: lm_head's job
        with pytest.raises(InputError, match="must be int64"):
            runner.infer({**feeds, "positions": torch.arange(9, dtype=torch.int32)[None].numpy()})
        with pytest.raises(InputError, match="shape"):
            runner.infer({**feeds, "z_in": st.z[:, :, :3].numpy()})


# ------------------------------------------------------------------------------------------ GPU only
def _cuda_ep() -> bool:
    import onnxruntime
    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("role", ROLES)
def test_ort_cuda_iobinding_matches_cpu(role):
    if not _cuda_ep():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)")
    export_dir, _ = exported("llama")
    ids = _ids(2, 26, seed=7)
    mask = (torch.arange(26)[None] < torch.tensor([26, 11])[:, None]).long()
    with OrtRunner(export_dir, role, device="cpu") as cpu, OrtRunner(export_dir, role, device="cuda") as gpu:
        a, b = run_schedule(cpu, ids, mask), run_schedule(gpu, ids, mask)
        assert gpu.device.type == "cuda" and gpu._buffers.storage.device_type == "cuda"
    _check(b, a, "fp32", f"cuda {role}")


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU supported by TensorRT")
@pytest.mark.parametrize("role", ROLES)
def test_trt_matches_ort(role, tmp_path):
    from runtimes.trt_runner import TrtRunner
    d = export_copy("llama", tmp_path / "engines")
    from exporter.engines import build_engines
    build_engines(d)
    ids = _ids(2, 26, seed=8)
    try:
        runner = TrtRunner(d, role).activate()
    except BackendUnavailable as exc:
        pytest.skip(f"TensorRT cannot run here: {exc}")
    with runner, OrtRunner(d, role) as cpu:
        got, ref = run_schedule(runner, ids), run_schedule(cpu, ids)
        got_again = run_schedule(runner, ids)  # replayed CUDA graphs give the same numbers
    _check(got, ref, "fp32", f"trt {role}")
    assert same(got.logits, got_again.logits)
