"""Config validation: one message naming the key; paths resolve against the YAML's folder."""
from pathlib import Path

import pytest

from pipeline.cli import DEFAULT_CONFIG
from pipeline.config import ConfigError, load_config, parse_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_demo_config_validates():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.name == "demo" and cfg.ingest.allow_private_addresses
    assert cfg.root == (DEFAULT_CONFIG.parent / "../runs/demo").resolve()
    assert [s.name for _, s in cfg.sources.all()] == ["web", "demo-curated", "demo-eval"]


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.timout_s: unknown key"):
        load_config(_write(tmp_path, "root: out\ningest: {timout_s: 3}\n"))


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"ingest\.retries"):
        load_config(_write(tmp_path, "root: out\ningest: {retries: -1}\n"))
    with pytest.raises(ConfigError, match=r"sources\.uncurated\.0"):
        load_config(_write(tmp_path, "root: out\nsources: {uncurated: [{name: web}]}\n"))


def test_duplicate_source_names_rejected(tmp_path):
    with pytest.raises(ConfigError, match="used twice"):
        parse_config({"root": "x", "sources": {"uncurated": [{"name": "a", "images": "i"}],
                                                "curated": [{"name": "a", "images": "j"}]}}, base=tmp_path)


def test_relative_paths_resolve_against_config_dir(tmp_path):
    cfg = load_config(_write(tmp_path, "root: out\nsources: {uncurated: [{name: w, urls: u.txt, warc: ['w/*.warc.gz']}]}\n"))
    src = cfg.sources.uncurated[0]
    assert cfg.root == tmp_path / "out" and src.urls == tmp_path / "u.txt"
    assert src.warc == [str(tmp_path / "w/*.warc.gz")]
    assert cfg.name == "run"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "root: [unclosed\n"))


def test_cuda_embedding_needs_gpus_reserved(tmp_path):
    with pytest.raises(ConfigError, match=r"embed.*num_gpus is 0.*set num_gpus: 1"):
        load_config(_write(tmp_path, "root: out\nembed: {device: cuda}\n"))
    cfg = load_config(_write(tmp_path, "root: out\nembed: {device: cuda, num_gpus: 0.5}\nnsfw: {num_gpus: 0.25}\n"))
    assert cfg.embed.num_gpus == 0.5 and cfg.nsfw.num_gpus == 0.25 and cfg.face_blur.num_gpus == 0
