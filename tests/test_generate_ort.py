"""Generation on ONNX Runtime CPU (issue 11): the export's decode graphs driven by the one generation
loop (runtimes/ort_generate.py OrtDecoder) against the torch decoder, on official fixtures (trained
weights: the memory matters), both policies, a padded batch; the export-time validation of the
decode graphs; an export without them refused. Two exports, shared by the module."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from armt.cli import main
from graphs.errors import InputError
from runtimes.generate import generate
from runtimes.decoders import open_decoder
from tests.helpers import rel_err
from tests.test_generate import FIXTURES, official_model
from tests.test_rmt_ort import _have_trt_rtx

pytest.importorskip("onnxruntime")

# fp32: ORT and torch run the same decomposed fp32 math, measured <= 2e-6 here; on these trained
# fixtures the memory read does not amplify rounding (docs/generation.md), so the plain 1e-5 holds.
FP32 = 1e-5
NAMES = ("llama", "rmt-gpt2-wrap-pos")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The defaults export the decode graphs: the LLaMA fixture through `armt export MODEL_DIR` (no
    flag), the RMT through the Python API (no `decode` argument)."""
    from exporter.manifest import load_manifest
    from graphs.modeldir import save_model_dir
    from runtimes.validation import export_model
    out = {}
    for name in NAMES:
        model = official_model(name)
        root = tmp_path_factory.mktemp("gen_ort")
        if name == "llama":
            save_model_dir(copy.deepcopy(model), root / "model")
            assert main(["export", str(root / "model"), "-o", str(root / name)]) == 0
            out[name] = (model, root / name, load_manifest(root / name))
        else:
            res = export_model(copy.deepcopy(model), root / name, precision="fp32")
            out[name] = (model, res.export_dir, res.manifest)
    return out


def _decoder(exports, name):
    model, export_dir, _ = exports[name]
    return model, open_decoder(export_dir, "ort")


def _same(ort, ref, where):
    np.testing.assert_array_equal(ort.tokens, ref.tokens, err_msg=where)
    np.testing.assert_array_equal(ort.lengths, ref.lengths, err_msg=where)
    assert rel_err(ort.scores, ref.scores) <= FP32, (where, rel_err(ort.scores, ref.scores))


@pytest.mark.parametrize("name", NAMES)
def test_export_validates_decode_graphs(exports, name):
    from exporter.weights import WEIGHTS_FILE
    from exporter.export import export_roles
    from graphs.contracts import GRAPH_FILES
    _, export_dir, manifest = exports[name]
    kind = manifest.model_config().kind
    roles = ("decode", "memory_write") if kind == "armt" else ("rmt_decode", "rmt_memory_write")
    assert set(manifest.graphs) == set(export_roles(manifest.model_config(), decode=True))  # the default (fp32: no causal twins)
    assert {p.name for p in export_dir.iterdir()} == {GRAPH_FILES[r] for r in manifest.graphs} | {
        "manifest.json", WEIGHTS_FILE, "sample_feeds.npz", "polygraphy_data_loader.py"}
    for role in roles:
        assert role in manifest.graphs
        v = manifest.validation["graphs"][role]
        assert v["status"] == "passed" and v["calls"] == 3, (role, v)
        assert all(o["rel"] <= 1e-5 for o in v["outputs"]), v
    assert manifest.validation["status"] == "passed"
    assert main(["inspect", str(export_dir), "--verify"]) == 0  # provenance of the decode graphs agrees


@pytest.mark.parametrize("name", NAMES)
def test_frozen_ort_equals_torch_and_official(exports, name):
    model, dec = _decoder(exports, name)
    schedules = ("diagonal", "sequential") if model.cfg.kind == "armt" else ("sequential",)
    for case in ("multi", "boundary", "single"):
        ref = np.load(FIXTURES / name / f"generate_{case}.npz")
        for schedule in schedules:
            got = generate(dec, ref["prompt_ids"], max_new_tokens=8, prefill_schedule=schedule)
            want = generate(model, ref["prompt_ids"], max_new_tokens=8, prefill_schedule=schedule)
            _same(got, want, f"{name}/{case}/{schedule}")
            np.testing.assert_array_equal(got.tokens, ref["tokens"])


@pytest.mark.parametrize("name", NAMES)
def test_recurrent_ort_equals_torch(exports, name):
    """Several segment boundaries while generating (the memory-write graphs), prompts ending mid-segment
    and on a boundary; the final states agree too."""
    model, dec = _decoder(exports, name)
    T = model.cfg.armt.segment_size
    ids = np.random.default_rng(5).integers(0, model.cfg.base.vocab_size, (2, 2 * T)).astype(np.int64)
    for n in (3, T, 2 * T - 1):
        got = generate(dec, ids[:, :n], max_new_tokens=2 * T + 2, policy="recurrent")
        want = generate(model, ids[:, :n], max_new_tokens=2 * T + 2, policy="recurrent")
        _same(got, want, f"{name}/{n}")
        for key, a in got.state.tensors().items():
            a, b = np.asarray(a), np.asarray(want.state.tensors()[key])
            if a.dtype == bool:
                np.testing.assert_array_equal(a, b)
            else:
                assert rel_err(a, b) <= FP32


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("policy", ["frozen", "recurrent"])
def test_padded_batch_ort_equals_torch(exports, name, policy):
    model, dec = _decoder(exports, name)
    T = model.cfg.armt.segment_size
    rng = np.random.default_rng(6)
    lengths = [2 * T + 1, 2, T]
    ids = np.zeros((3, max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(0, model.cfg.base.vocab_size, n)
        mask[b, :n] = 1
    n_new = 6 if policy == "frozen" else T + 3
    got = generate(dec, ids, mask, max_new_tokens=n_new, policy=policy, eos_ids=[int(ids[1, 0])])
    want = generate(model, ids, mask, max_new_tokens=n_new, policy=policy, eos_ids=[int(ids[1, 0])])
    _same(got, want, f"{name}/{policy}")


class _Traffic:
    """Counts the bytes the decode and memory-write runners copy host -> device (staging writes) and
    device -> host (reads), per call of `infer`."""

    def __init__(self, dec):
        self.calls = []  # (role, bytes written, bytes read) of each infer call, in order
        self.now = [0, 0]
        for role, runner in dec.runners.items():
            storage = runner._buffers.storage
            write, read = storage.write, storage.read
            storage.write = lambda block, data, write=write: (self._add(0, data.size), write(block, data))[1]
            storage.read = lambda block, read=read: self._add(1, read(block))
            infer = runner.infer
            runner.infer = lambda feeds, infer=infer, role=role: self._call(role, infer, feeds)

    def _add(self, i, x):
        self.now[i] += x if isinstance(x, int) else x.nbytes
        return x

    def _call(self, role, infer, feeds):
        self.now = [0, 0]
        out = infer(feeds)
        self.calls.append((role, *self.now))
        return out


@pytest.mark.parametrize("name", NAMES)
def test_cache_and_memory_stay_on_the_device(exports, name):
    """IO binding: per decode call only ids, positions, lengths (RMT: read) go in, nothing comes back
    inside `infer`; the decoder copies the logits out (nothing else); a memory write copies its small
    inputs in and reads nothing; the KV cache and memory are runner-owned buffers (the CPU provider's
    OrtValues here), uploaded once by `start`."""
    from runtimes.buffers import Buffer
    model, dec = _decoder(exports, name)
    T, M = model.cfg.armt.segment_size, model.cfg.armt.num_mem_tokens
    ids = np.random.default_rng(7).integers(0, model.cfg.base.vocab_size, (2, T + 2)).astype(np.int64)
    traffic = _Traffic(dec)
    reads = []
    to_numpy = dec.runners[dec.decode_role].to_numpy
    dec.runners[dec.decode_role].to_numpy = lambda buf: reads.append(buf.nbytes) or to_numpy(buf)
    got = generate(dec, ids, max_new_tokens=2 * T + 2, policy="recurrent")
    roles = [c[0] for c in traffic.calls]
    assert roles.count(dec.write_role) == 2 and roles.count(dec.decode_role) == 2 * T + 2, roles
    B, V = ids.shape[0], model.cfg.base.vocab_size
    small = 8 * B * (2 + (M + 2) + 1) + B  # ids (B, <= 2), positions (RMT: M + n places), lengths; read (bool)
    for i, (role, wrote, read) in enumerate(traffic.calls):
        assert read == 0 and (wrote <= small if role == dec.decode_role else wrote <= 8 * B * (M + 1) + B), \
            (i, role, wrote, read)
    assert reads[:-len(dec.memory)] == [B * w * V * 4 for w in [2] + [1] * (2 * T + 1)]  # the logits only
    assert isinstance(dec.cache.k, Buffer) and dec.runners[dec.decode_role].owns(dec.cache.k)
    assert all(dec.runners[dec.write_role].owns(b) for b in dec.memory.values())  # written twice: its outputs
    want = generate(model, ids, max_new_tokens=2 * T + 2, policy="recurrent")
    _same(got, want, name)


@pytest.mark.parametrize("name", NAMES)
def test_io_binding_equals_plain_session_run(exports, name):
    """Every call the decoder makes (recurrent, two memory writes, a padded batch), replayed with
    `InferenceSession.run` on host copies of its inputs: bitwise the same outputs (the former host
    path), so IO binding changes nothing but where the tensors live."""
    import onnxruntime as ort
    model, dec = _decoder(exports, name)
    T = model.cfg.armt.segment_size
    calls = []
    for role, runner in dec.runners.items():
        def infer(feeds, infer=runner.infer, runner=runner, role=role):
            host = {k: runner.to_numpy(v).copy() if hasattr(v, "ptr") else np.array(v) for k, v in feeds.items()}
            out = infer(feeds)
            calls.append((role, host, {k: runner.to_numpy(v).copy() for k, v in out.items()}))
            return out
        runner.infer = infer
    ids = np.random.default_rng(8).integers(0, model.cfg.base.vocab_size, (3, T + 3)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 2:] = 0
    generate(dec, ids, mask, max_new_tokens=T + 2, policy="recurrent")
    assert {c[0] for c in calls} == set(dec.runners)
    _, _, manifest = exports[name]
    sessions = {r: ort.InferenceSession(str(manifest.graph_path(r)), providers=["CPUExecutionProvider"])
                for r in dec.runners}
    for i, (role, feeds, outs) in enumerate(calls):
        plain = dict(zip(outs, sessions[role].run(list(outs), feeds)))
        for k, v in outs.items():
            assert v.dtype == plain[k].dtype and np.array_equal(v, plain[k]), (i, role, k)


def test_cli_generate_on_ort(exports, tmp_path):
    model, export_dir, _ = exports["llama"]
    ids = np.load(FIXTURES / "llama" / "generate_multi.npz")["prompt_ids"]
    np.save(tmp_path / "ids.npy", ids)
    assert main(["generate", str(export_dir), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy"),
                 "--max-new-tokens", "6", "--memory-policy", "recurrent", "--output", str(tmp_path / "t.npy")]) == 0
    want = generate(model, ids, max_new_tokens=6, policy="recurrent")
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), want.tokens)


@pytest.mark.parametrize("name", NAMES)
def test_verify_per_graph_covers_the_decode_graphs(exports, name, capsys):
    """`armt verify --graphs-only --per-graph`: every graph of the default export on its sample feed
    against the recorded torch outputs, the decode graphs included (caches compared whole: the places
    beyond each row's length + n are the input's, copied through)."""
    pytest.importorskip("polygraphy")
    _, export_dir, manifest = exports[name]
    capsys.readouterr()
    assert main(["verify", str(export_dir), "--graphs-only", "--per-graph"]) == 0
    out = capsys.readouterr().out
    outputs = sum(len(g.outputs) for g in manifest.graphs.values())
    assert f"{outputs}/{outputs} comparisons within bounds (fp32)" in out, out
    for role in manifest.graphs:
        assert f"graph {role} " in out


def test_export_of_some_roles_generates_frozen(tmp_path):
    """`export_model(..., only=...)` (as `armt bench --generate --export-to` writes): only the
    diagonal step and the decode graph; provenance agrees; frozen generation equals torch; the
    recurrent policy is refused with one line at its first memory write."""
    from exporter.export import export_roles
    from graphs.errors import ExportError
    from runtimes.validation import export_model
    model = official_model("llama")
    with pytest.raises(ExportError, match="cannot export only rmt_decode"):
        export_roles(model.cfg, True, ("decode", "rmt_decode"))
    with pytest.raises(ExportError, match="lm_head needs a step graph"):
        export_roles(model.cfg, True, ("lm_head", "decode"))
    res = export_model(copy.deepcopy(model), tmp_path / "e", precision="fp32", only=("decode", "diagonal_step"))
    assert list(res.manifest.graphs) == ["diagonal_step", "decode"]
    assert main(["inspect", str(tmp_path / "e"), "--verify"]) == 0
    dec = open_decoder(tmp_path / "e", "ort")
    ref = np.load(FIXTURES / "llama" / "generate_multi.npz")
    _same(generate(dec, ref["prompt_ids"], max_new_tokens=8), generate(model, ref["prompt_ids"], max_new_tokens=8),
          "some roles")
    T = model.cfg.armt.segment_size
    with pytest.raises(InputError, match="has no memory_write graph .*recurrent needs it"):
        generate(dec, ref["prompt_ids"], max_new_tokens=T + 1, policy="recurrent")


def test_other_backends_refused_with_one_line(exports):
    """open_decoder runs an export on ort or trt (tests/test_generate_trt.py); trt on the CPU: one line."""
    with pytest.raises(InputError, match="runs on --backend ort or trt, got 'torch'"):
        open_decoder(exports["llama"][1], "torch")
    with pytest.raises(InputError, match="use --device cuda"):
        open_decoder(exports["llama"][1], "trt")



@pytest.mark.trt
@pytest.mark.skipif(not _have_trt_rtx(), reason="tensorrt_rtx is not installed (pip install '.[trt]')")
def test_build_decode_engines_with_tensorrt_rtx(exports, tmp_path):
    """`armt build` builds the decode graphs (ahead of time: no GPU needed); their profiles carry the
    KV-cache capacity range (runtimes/trt_generate.py runs them where a supported GPU exists)."""
    import shutil

    from exporter.manifest import load_manifest
    d = tmp_path / "export"
    shutil.copytree(exports["llama"][1], d)
    assert main(["build", str(d), "--builder", "tensorrt_rtx", "--max-batch", "2", "--compute-capability", "8.9",
                 "--graph", "decode", "--graph", "memory_write", "--max-capacity", "40"]) == 0
    m = load_manifest(d, verify_checksums=True)
    T, M = m.dims["segment_size"], m.dims["mem_tokens"]
    for role in ("decode", "memory_write"):
        (e,) = m.graph(role).engines
        prof = e.profiles[0]
        assert prof["k_cache_in"].max[1] == 2 and prof["k_cache_in"].max[3] == 40
        assert (d / e.file).stat().st_size > 1000
    assert m.graph("decode").engines[0].profiles[0]["input_ids"].opt == (1, 1)
    assert m.graph("decode").engines[0].profiles[0]["input_ids"].max == (2, T)
    assert m.graph("memory_write").engines[0].profiles[0]["positions"].max == (2, M)
