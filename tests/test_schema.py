"""The JSON Schema in manifests/ agrees with the loader on the example manifests and on lies."""

import json
from pathlib import Path

import jsonschema
import pytest

from mlfs import manifest as mf
from mlfs.errors import ManifestError

DIR = Path(__file__).resolve().parents[1] / "manifests"
SCHEMA = json.loads((DIR / "mlfs.manifest-1.schema.json").read_text())


@pytest.mark.parametrize("path", sorted(DIR.glob("example-*.json")), ids=lambda p: p.name)
def test_examples_validate(path):
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    m = mf.loads(path.read_bytes())
    assert m.digest == doc["digest"] and m.files


@pytest.mark.parametrize("change", [
    lambda d: d.update(format="mlfs.manifest/2"),
    lambda d: d["files"][0].update(size=-1),
    lambda d: d["files"][0].update(mode=0o4755),
    lambda d: d["files"][0]["chunks"][0].__setitem__(0, "xyz"),
    lambda d: d.update(id="../x"),
])
def test_schema_and_loader_both_refuse(change):
    doc = json.loads((DIR / "example-minilm-v1.json").read_text())
    change(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, SCHEMA)
    with pytest.raises(ManifestError):
        mf.from_json(doc)
