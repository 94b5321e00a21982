"""Config loading/overrides/errors and storage URIs (local and a real S3 endpoint: moto's server)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from synthfar_ray import storage
from synthfar_ray.cli import main as cli_main
from synthfar_ray.config import ConfigError, StrictModel, apply_overrides, load_config, parse_override


class Inner(StrictModel):
    steps: int = 15
    ratio: float = 0.5


class Outer(StrictModel):
    name: str
    inner: Inner = Inner()
    sizes: list[int] = [1]


def test_overrides_parse_yaml_values():
    assert parse_override("inner.steps=30") == (["inner", "steps"], 30)
    assert parse_override("sizes=[2, 3]") == (["sizes"], [2, 3])
    assert parse_override("name=abc") == (["name"], "abc")
    data = apply_overrides({"inner": {"steps": 1}}, ["inner.ratio=0.25", "new.deep.key=true"])
    assert data == {"inner": {"steps": 1, "ratio": 0.25}, "new": {"deep": {"key": True}}}


def test_load_config_applies_overrides_over_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: run1\ninner:\n  steps: 20\n")
    cfg = load_config(Outer, str(f), ["inner.ratio=0.75"])
    assert (cfg.name, cfg.inner.steps, cfg.inner.ratio) == ("run1", 20, 0.75)


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    ("name: r\ninner:\n  steps: many\n", [], "inner.steps"),   # wrong type
    ("name: r\ninner:\n  stepz: 3\n", [], "inner.stepz"),      # typo: unknown key
    ("inner: {}\n", [], "name"),                               # missing required
    ("name: r\n", ["inner.ratio=abc"], "inner.ratio"),        # bad override
])
def test_invalid_config_names_file_and_field(tmp_path, yaml_text, overrides, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(Outer, str(f), overrides)
    assert str(f) in str(e.value) and expected in str(e.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, str(tmp_path / "nope.yaml"))
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, str(f))
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("novalue")


def test_cli_reports_config_error_cleanly(tmp_path, capsys):
    f = tmp_path / "gen.yaml"
    f.write_text("output: x\nnum_images: -3\n")
    assert cli_main(["generate", str(f)]) == 2
    err = capsys.readouterr().err
    assert "num_images" in err and str(f) in err


def test_local_storage_roundtrip(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.read_bytes("file://" + uri) == b"hello"
    assert storage.list_files(str(tmp_path / "a")) == ["b.bin"]  # no temp files left behind
    assert storage.list_files(str(tmp_path / "missing")) == []
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(storage.StorageError, match="cannot read"):
        storage.read_bytes(uri)
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.resolve("nosuchscheme://host/x")


def test_s3_storage_roundtrip(s3_bucket):
    bucket, opts = s3_bucket
    uri = storage.join(bucket, "dir", "x.json")
    assert uri == f"{bucket}/dir/x.json"
    storage.write_bytes(uri, b"{}", opts)
    assert storage.exists(uri, opts) and storage.read_bytes(uri, opts) == b"{}"
    assert storage.list_files(storage.join(bucket, "dir"), opts, suffix=".json") == ["x.json"]
    storage.delete(uri, opts)
    assert not storage.exists(uri, opts)
    with pytest.raises(storage.StorageError, match="without a bucket"):
        storage.resolve("s3:///key", opts)


def test_ray_data_parquet_on_s3(ray_cluster, s3_bucket):
    """Ray Data reads and writes s3:// through the same filesystem objects the stages use."""
    import ray

    bucket, opts = s3_bucket
    fs, path = storage.resolve(storage.join(bucket, "table"), opts)
    ray.data.from_arrow(pa.table({"id": list(range(20))})).write_parquet(path, filesystem=fs)
    storage.write_bytes(storage.join(bucket, "table", "_manifest.json"), b"{}", opts)
    back = ray.data.read_parquet(path, filesystem=fs)
    assert sorted(r["id"] for r in back.take_all()) == list(range(20))
