"""Generation on an export with ONNX Runtime: runtimes/export_decoder.py's ExportDecoder with one
`OrtRunner` per decode role (IO binding on runner-owned OrtValues, runtimes/buffers.py). Needs only
onnxruntime and numpy (no torch). The CPU provider takes the same path as CUDA (OrtValues on the
CPU), so the tests run it. `cuda_graph=True` (CUDA only, opt-in as for the runner) replays each step
shape as a CUDA graph (the runner's call keys: the two cache parities are two graphs).
"""

from __future__ import annotations

from runtimes.export_decoder import ExportDecoder


class OrtDecoder(ExportDecoder):
    backend = "ort"

    def _open_runner(self, role: str, prefill: bool):
        from runtimes.ort_runner import OrtRunner
        graphs = {} if prefill else {"cuda_graph": self.cuda_graph_option}  # the prefill: no CUDA graphs (as before)
        return OrtRunner(self.manifest, role, device=self.device_name, verify_checksums=False,
                         threads=self.threads, **graphs)
