"""A manifest that cannot be edited unseen (issue 13): every graph of an export records its model id,
config hashes, dims, precision and roles (ONNX metadata_props); each edit of manifest.json that
disagrees is refused when the export is loaded (one line naming the field, exit 2 from the CLI),
and `armt inspect --verify` lists the fields."""

import json

import numpy as np
import onnx
import pytest

from exporter.manifest import check_export, load_manifest
from exporter.provenance import read_metadata_props
from graphs.errors import ExportError
from armt.cli import main
from tests.test_runtime_ort import export_copy, exported

EDITS = {  # name -> (edit of the manifest dict, the field the refusal names)
    "segment_size": (lambda m: m["model"]["armt_config"].update(segment_size=7), "model.armt_config"),
    "base config": (lambda m: m["model"]["config"].update(rms_norm_eps=1e-2), "model.config"),
    "dims": (lambda m: m["dims"].update(segment_size=7), "dims"),
    "model id": (lambda m: m["model"].update(model_id="0123456789abcdef-0123456789abcdef"), "model.model_id"),
    "deleted graph": (lambda m: m["graphs"].pop("diagonal_step"), "graphs"),
    "precision": (lambda m: m.update(precision="fp16"), "precision"),
    "graph inputs": (lambda m: m["graphs"]["segment"]["inputs"][0].update(shape=["batch", 5]), "graphs.segment"),
}


def _edited(tmp_path, name):
    d = export_copy("llama", tmp_path / name.replace(" ", "_"))
    raw = json.loads((d / "manifest.json").read_text())
    EDITS[name][0](raw)
    (d / "manifest.json").write_text(json.dumps(raw, indent=2))
    return d


def test_graphs_carry_the_provenance_of_their_export():
    export_dir, _ = exported("llama")
    m = load_manifest(export_dir)
    for role, g in m.graphs.items():
        meta = read_metadata_props(export_dir / g.file)
        assert meta == {p.key: p.value for p in onnx.load(str(export_dir / g.file), load_external_data=False).metadata_props}
        assert meta["armt.model_id"] == m.model_id and meta["armt.role"] == role
        assert meta["armt.roles"].split(",") == list(m.graphs) and json.loads(meta["armt.dims"]) == m.dims
    assert check_export(export_dir)[1] == []


@pytest.mark.parametrize("name", list(EDITS))
def test_each_manifest_edit_is_refused(tmp_path, name, capsys):
    d = _edited(tmp_path, name)
    field = EDITS[name][1]
    with pytest.raises(ExportError, match=f"field '{field}'") as info:
        load_manifest(d, verify_checksums=False)  # the cheap load refuses too
    assert "\n" not in str(info.value)
    np.save(tmp_path / "ids.npy", np.zeros((1, 7), np.int64))
    assert main(["run", str(d), "--backend", "ort", "--input-ids", str(tmp_path / "ids.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"field '{field}'" in err, err
    assert main(["inspect", str(d), "--verify"]) == 2
    out = capsys.readouterr()
    assert f"{field}: " in out.out and "problem(s)" in out.out, out.out


def test_inspect_verify_reports_an_intact_export(capsys):
    export_dir, _ = exported("llama")
    assert main(["inspect", str(export_dir), "--verify"]) == 0
    assert "agree with what the 3 graphs record" in capsys.readouterr().out  # segment, diagonal_step, lm_head
