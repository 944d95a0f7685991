"""Generation on TensorRT (runtimes/trt_generate.py TrtDecoder) without a GPU: no machine here can
execute an engine, so each engine is replaced by a stand-in execution context that runs the engine's
ONNX graph with ONNX Runtime CPU on the TrtRunner's own (host) buffers. Everything else is the real
path: TrtRunner.__init__ (contract, engine selection), its per-call work (profile choice, input
shapes, tensor addresses, ping-pong outputs, CUDA-graph capture keys and replays), the shared
ExportDecoder bookkeeping, open_decoder and the CLI. The tokens and scores must equal the ORT
decoder's exactly (the same ONNX Runtime CPU arithmetic on the same inputs) and torch's within the
fp32 bound; a replay with stale addresses or a cache bound to the wrong parity would change them.
The error paths (no engines, no decode engines, no TensorRT, no GPU, --device cpu) are one line each."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from armt.cli import main
from graphs.errors import BackendUnavailable, InputError
from runtimes.generate import generate
from runtimes.decoders import open_decoder
from tests.helpers import rel_err
from tests.test_cuda_graphs import _FakeCudaGraph
from tests.test_generate import FIXTURES, official_model
from tests.test_runtime_core import _FakeTrtContext

ort = pytest.importorskip("onnxruntime")

FP32 = 1e-5  # as tests/test_generate_ort.py: ORT CPU vs torch on these trained fixtures, measured <= 2e-6
ROLES = {"llama": ("diagonal_step", "decode", "memory_write"),
         "rmt-gpt2-wrap-pos": ("rmt_segment", "rmt_decode", "rmt_memory_write")}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per fixture: the model and an export of its prefill step graph and decode graphs (no engines)."""
    from runtimes.validation import export_model
    out = {}
    for name, roles in ROLES.items():
        model = official_model(name)
        res = export_model(copy.deepcopy(model), tmp_path_factory.mktemp("gen_trt") / name, precision="fp32",
                           only=roles)
        out[name] = (model, res.export_dir, res.manifest)
    return out


def with_engines(manifest, roles=None, builder="tensorrt_rtx"):
    """A copy of the manifest whose graphs (`roles`, default all) list one engine each, with the
    profile `armt build` would record (exporter/engines.py profile_for, default limits)."""
    from exporter.engines import ShapeLimits, profile_for
    from exporter.manifest import EngineRecord
    from graphs.contracts import contract
    graphs = dict(manifest.graphs)
    for role in roles or tuple(graphs):
        c = contract(manifest.model_config(), role, manifest.precision)
        slot = c.derived_dims["slot"][1] if "slot" in c.derived_dims else 0
        prof = profile_for(graphs[role], manifest.dims, ShapeLimits(), slot, decode=c.schedule == "decode")
        graphs[role] = dataclasses.replace(graphs[role], engines=(
            EngineRecord(f"{role}.stand-in.engine", builder, "1.7", manifest.precision, (), (prof,)),))
    return dataclasses.replace(manifest, graphs=graphs)


class _OnnxEngine(_FakeTrtContext):
    """A TensorRT execution context stand-in: the engine's ONNX graph on ONNX Runtime CPU, reading
    and writing the buffers at the addresses set on it, whichever runner owns them (the memory-write
    engine reads the decode runner's cache, the decode engine the memory-write runner's memory)."""

    def __init__(self, runner, session, runners):
        super().__init__(runner, None)
        self.session, self.runners = session, runners

    def _buffer(self, name):
        for r in self.runners:
            for buf in r._buffers._flat.values():
                if buf.ptr == self.addresses[name]:
                    assert buf.shape == self.shapes.get(name, buf.shape), (name, buf.shape)
                    return r, buf
        raise AssertionError(f"{name} is not bound to a runner-owned buffer")

    def execute_async_v3(self, stream):
        feeds = {}
        for s in self.runner.input_specs:
            owner, buf = self._buffer(s.name)
            feeds[s.name] = owner._buffers.read(buf).copy()
        names = [s.name for s in self.runner.output_specs]
        for name, value in zip(names, self.session.run(names, feeds)):
            owner, buf = self._buffer(name)
            assert owner is self.runner and buf.shape == value.shape, (name, buf.shape, value.shape)
            owner._buffers.storage.write(buf.block, np.ascontiguousarray(value).reshape(-1).view(np.uint8))
        self.calls.append(dict(self.addresses))
        return True


@pytest.fixture
def stand_in(monkeypatch):
    """TrtRunner with stand-in engines: selection ignores what is installed, activation sets up host
    buffers, the engine's profiles and an _OnnxEngine context; captures are _FakeCudaGraph replays."""
    from runtimes import trt_runner
    runners, captured = [], []

    def activate(self):
        self._stream, self._graphs = None, {}
        self.use_host_storage()
        self._profiles = [{k: (r.min, r.opt, r.max) for k, r in p.items()} for p in self.engine_record.profiles]
        path = self.manifest.graph_path(self.role)
        self._context = _OnnxEngine(self, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), runners)
        self._causal = None  # decode engines have no causal twin
        self._capture = lambda ctx: captured.append(_FakeCudaGraph(ctx)) or captured[-1]
        runners.append(self)

    monkeypatch.setattr(trt_runner, "_importable", lambda module: True)
    monkeypatch.setattr(trt_runner.TrtRunner, "_activate", activate)
    return runners, captured


def _trt(exports, name):
    from runtimes.trt_generate import TrtDecoder
    model, _, manifest = exports[name]
    return model, TrtDecoder(with_engines(manifest), device="cuda")


def _exact(got, want, where):
    np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=where)
    np.testing.assert_array_equal(got.lengths, want.lengths, err_msg=where)
    assert np.isfinite(got.scores).all() and np.array_equal(got.scores, want.scores), where


@pytest.mark.parametrize("name", ROLES)
@pytest.mark.parametrize("policy", ["frozen", "recurrent"])
def test_trt_decoder_equals_ort_decoder_and_torch(exports, stand_in, name, policy):
    """A padded batch past a segment boundary (recurrent: two memory writes): tokens and scores equal
    the ORT decoder's bitwise and torch's within fp32; the KV cache and memory stay in the runners'
    buffers; repeated call keys were captured and replayed."""
    from runtimes.buffers import Buffer
    runners, captured = stand_in
    model, dec = _trt(exports, name)
    T = model.cfg.armt.segment_size
    ids = np.random.default_rng(11).integers(0, model.cfg.base.vocab_size, (3, T + 3)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 2:] = 0
    new = 2 * T + 2 if policy == "recurrent" else T + 2
    got = generate(dec, ids, mask, max_new_tokens=new, policy=policy)
    _exact(got, generate(open_decoder(exports[name][1], "ort"), ids, mask, max_new_tokens=new, policy=policy),
           f"{name} {policy} vs ort")
    want = generate(model, ids, mask, max_new_tokens=new, policy=policy)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.scores, want.scores) <= FP32, rel_err(got.scores, want.scores)
    assert {r.role for r in runners} == set(ROLES[name])  # the prefill ran on the step engine
    decode = dec.runners[dec.decode_role]
    assert isinstance(dec.cache.k, Buffer) and decode.owns(dec.cache.k) and decode.owns(dec.cache.v)
    owner = dec.runners[dec.write_role] if policy == "recurrent" else decode
    assert all(owner.owns(b) for b in dec.memory.values())
    calls = decode._context.calls
    assert all(calls[i + 1]["k_cache_in"] == calls[i]["k_cache_out"] for i in range(len(calls) - 1))  # no copy
    assert dec.cuda_graph and captured and sum(g.launches for g in captured) > 0
    state = dec.state()
    np.testing.assert_array_equal(state.written, got.state.written)
    dec.close()


def test_cli_and_api_generate_on_trt(exports, stand_in, monkeypatch, tmp_path):
    """`armt generate EXPORT --backend trt` (device cuda by default) and armt.load(..., backend="trt")
    open the TrtDecoder through open_decoder; tokens equal torch's."""
    import armt
    from runtimes import loaders
    model, export_dir, manifest = exports["llama"]
    real = loaders.open_export
    monkeypatch.setattr(loaders, "open_export", lambda path, *a, **k: with_engines(real(path, *a, **k)))
    ids = np.load(FIXTURES / "llama" / "generate_multi.npz")["prompt_ids"]
    np.save(tmp_path / "ids.npy", ids)
    assert main(["generate", str(export_dir), "--backend", "trt", "--input-ids", str(tmp_path / "ids.npy"),
                 "--max-new-tokens", "6", "--memory-policy", "recurrent", "--output", str(tmp_path / "t.npy")]) == 0
    want = generate(model, ids, max_new_tokens=6, policy="recurrent")
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), want.tokens)
    loaded = armt.load(export_dir, backend="trt")
    assert loaded._decoder().backend == "trt"
    got = loaded.generate(ids, max_new_tokens=6, policy="recurrent")
    np.testing.assert_array_equal(got.tokens, want.tokens)


def test_no_engines_refused_with_one_line(exports, tmp_path):
    from runtimes.trt_generate import TrtDecoder
    _, export_dir, manifest = exports["llama"]
    with pytest.raises(InputError, match=r"has no TensorRT engines: run `armt build .*` first"):
        open_decoder(export_dir, "trt", device="cuda")
    with pytest.raises(InputError, match=r"no TensorRT engine for decode, memory_write .*--graph decode --graph memory_write"):
        TrtDecoder(with_engines(manifest, ("diagonal_step",)), device="cuda")
    with pytest.raises(InputError, match="use --device cuda"):
        TrtDecoder(with_engines(manifest), device="cpu")
    np.save(tmp_path / "ids.npy", np.ones((1, 4), dtype=np.int64))
    assert main(["generate", str(export_dir), "--backend", "trt", "--input-ids", str(tmp_path / "ids.npy")]) == 2


def test_prefill_without_its_step_engine_refused_with_one_line(exports, stand_in):
    """Decode engines only: a prompt that fits the last segment generates; one that completes a
    segment needs the schedule's step engine (one line naming `armt build`)."""
    from graphs.errors import ExportError
    from runtimes.trt_generate import TrtDecoder
    model, _, manifest = exports["llama"]
    dec = TrtDecoder(with_engines(manifest, ("decode", "memory_write")), device="cuda")
    T = model.cfg.armt.segment_size
    short = generate(dec, np.ones((1, 3), dtype=np.int64), max_new_tokens=2)
    np.testing.assert_array_equal(short.tokens, generate(model, np.ones((1, 3), dtype=np.int64), max_new_tokens=2).tokens)
    with pytest.raises(ExportError, match="no TensorRT engine for graph diagonal_step: run `armt build"):
        generate(dec, np.ones((1, T + 1), dtype=np.int64), max_new_tokens=2)


def test_no_tensorrt_refused_naming_the_extra(exports, monkeypatch, tmp_path):
    from runtimes import loaders, trt_runner
    from runtimes.trt_generate import TrtDecoder
    _, export_dir, manifest = exports["llama"]
    monkeypatch.setattr(trt_runner, "_importable", lambda module: False)
    with pytest.raises(BackendUnavailable, match=r"built by tensorrt_rtx.*pip install 'armt-deploy\[trt\]'"):
        TrtDecoder(with_engines(manifest), device="cuda")
    real = loaders.open_export
    monkeypatch.setattr(loaders, "open_export", lambda path, *a, **k: with_engines(real(path, *a, **k)))
    np.save(tmp_path / "ids.npy", np.ones((1, 4), dtype=np.int64))
    assert main(["generate", str(export_dir), "--backend", "trt", "--input-ids", str(tmp_path / "ids.npy")]) == 3


def test_no_cuda_device_refused_with_one_line(exports, monkeypatch):
    """TensorRT importable (a stand-in module) but no GPU visible: BackendUnavailable at activation
    (exit 3), before any engine file is read."""
    from runtimes import trt_runner
    from runtimes.trt_generate import TrtDecoder
    _, _, manifest = exports["llama"]
    pytest.importorskip("polygraphy")
    monkeypatch.setattr(trt_runner, "_importable", lambda module: True)
    monkeypatch.setattr(trt_runner, "import_tensorrt", lambda module: object())
    monkeypatch.setattr(trt_runner, "cuda_device_count", lambda: 0)
    with pytest.raises(BackendUnavailable, match="execute on a CUDA GPU and none is visible") as err:
        TrtDecoder(with_engines(manifest), device="cuda")
    assert err.value.exit_code == 3


def _cuda_gpu() -> bool:
    from runtimes.trt_runner import cuda_device_count
    return cuda_device_count() > 0


@pytest.mark.gpu
@pytest.mark.trt
def test_trt_decoder_on_real_engines(exports, tmp_path):
    """On a GPU the installed TensorRT builder supports: `armt build` the export, then the TrtDecoder
    on the real engines against the ORT decoder (fp32: same tokens, scores within the fp32 bound)."""
    import importlib.util
    import shutil
    if not any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx")):
        pytest.skip("no TensorRT builder installed (pip install '.[trt]')")
    if not _cuda_gpu():
        pytest.skip("needs a CUDA GPU")
    import torch
    cc = torch.cuda.get_device_capability()
    if importlib.util.find_spec("tensorrt") is None and cc[0] == 9:
        pytest.skip(f"only TensorRT-RTX is installed, and it does not support compute capability {cc[0]}.{cc[1]}")
    model, export_dir, _ = exports["llama"]
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    assert main(["build", str(d), "--max-batch", "3"]) == 0
    T = model.cfg.armt.segment_size
    ids = np.random.default_rng(12).integers(0, model.cfg.base.vocab_size, (3, T + 3)).astype(np.int64)
    got = generate(open_decoder(d, "trt", device="cuda"), ids, max_new_tokens=T + 2, policy="recurrent")
    want = generate(open_decoder(d, "ort"), ids, max_new_tokens=T + 2, policy="recurrent")
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert rel_err(got.scores, want.scores) <= FP32


@pytest.mark.gpu
@pytest.mark.trt
def test_engines_this_gpu_cannot_run_refused_with_one_line(exports, tmp_path, capsys):
    """Where only TensorRT-RTX is installed and the GPU has compute capability 9.x (the H200): engines
    built for 8.9 are refused when the decoder opens them (the real import, device and deserialize
    path): one line, exit 3."""
    import importlib.util
    import shutil
    if importlib.util.find_spec("tensorrt_rtx") is None or importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("checks TensorRT-RTX alone (installed: neither, or the full tensorrt too)")
    if not _cuda_gpu():
        pytest.skip("needs a CUDA GPU")
    import torch
    cc = torch.cuda.get_device_capability()
    if cc[0] != 9:
        pytest.skip(f"compute capability {cc[0]}.{cc[1]}: TensorRT-RTX may run these engines here")
    _, export_dir, _ = exports["llama"]
    d = tmp_path / "export"
    shutil.copytree(export_dir, d)
    assert main(["build", str(d), "--builder", "tensorrt_rtx", "--max-batch", "2", "--compute-capability", "8.9"]) == 0
    with pytest.raises(BackendUnavailable, match="cannot load .* on this GPU"):
        open_decoder(d, "trt", device="cuda")
    np.save(tmp_path / "ids.npy", np.ones((1, 4), dtype=np.int64))
    capsys.readouterr()
    assert main(["generate", str(d), "--backend", "trt", "--input-ids", str(tmp_path / "ids.npy")]) == 3
