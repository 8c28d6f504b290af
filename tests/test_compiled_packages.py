"""The torch detector's packages compiled at ``make engine``: which ones the server may load, and
the setting that asks for them. Runs without PyTorch or a GPU: the check is the model
repository's own (``retinaface_detector/1/compiled_packages.py``, standard library only), fed the
platform a GPU server would report."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from tests.conftest import configs
from tools.engine import record, repository
from tools.engine.backends.pytorch import servable_build
from tools.engine.plan import Plan
from tools.engine.record import COMPILED, PACKAGES
from tools.settings import GPU_OPTIONS, BuildSettings, SettingsError

H200 = {"torch": "2.11.0+cu130", "cuda": "13.0", "gpu": "NVIDIA H200", "capability": "9.0"}
BUCKETS = [1, 2, 4, 8, 16]


@pytest.fixture
def built(tmp_path):
    """A version folder holding one package per bucket and the record a build on an H200 writes."""
    files = {}
    for batch in BUCKETS:
        path = tmp_path / PACKAGES.package_name(batch)
        path.write_bytes(f"machine code for batch {batch}".encode())
        files[str(batch)] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return tmp_path, {**H200, "files": files}


def test_packages_built_for_this_platform_are_accepted(built):
    version_dir, record = built
    assert PACKAGES.refusal(record, dict(H200), BUCKETS, str(version_dir)) is None
    paths = PACKAGES.package_paths(record, BUCKETS, str(version_dir))
    assert paths == {b: str(version_dir / f"model.b{b}.pt2") for b in BUCKETS}


@pytest.mark.parametrize("field, running", [("torch", "2.12.0+cu130"), ("cuda", "12.8"), ("gpu", "NVIDIA H100 80GB HBM3"),
                                            ("capability", "10.0")])
def test_packages_for_another_torch_cuda_or_gpu_are_refused_in_one_line(built, field, running):
    version_dir, record = built
    why = PACKAGES.refusal(record, {**H200, field: running}, BUCKETS, str(version_dir))
    assert why and "\n" not in why
    assert f"{field} {H200[field]!r} (this server: {running!r})" in why and "make engine" in why


def test_a_build_without_packages_is_refused_and_says_so(tmp_path):
    why = PACKAGES.refusal(None, dict(H200), BUCKETS, str(tmp_path))
    assert "no compiled packages" in why
    assert PACKAGES.read_record(str(tmp_path)) is None  # no build.json at all
    (tmp_path / "build.json").write_text('{"backend": "torch"}')
    assert PACKAGES.read_record(str(tmp_path)) is None


def test_a_missing_bucket_or_a_changed_file_is_refused(built):
    version_dir, record = built
    assert "no package for batch 32" in PACKAGES.refusal(record, dict(H200), BUCKETS + [32], str(version_dir))
    (version_dir / "model.b8.pt2").write_bytes(b"another build's code")
    assert "model.b8.pt2 is missing or not the file the build recorded" in PACKAGES.refusal(
        record, dict(H200), BUCKETS, str(version_dir))
    (version_dir / "model.b8.pt2").unlink()
    assert "model.b8.pt2" in PACKAGES.refusal(record, dict(H200), BUCKETS, str(version_dir))


def test_the_record_is_read_from_build_json_under_its_key(built, tmp_path):
    _, compiled = built
    version_dir = tmp_path / "repo" / repository.DETECTOR / "1"
    version_dir.mkdir(parents=True)
    record.write(tmp_path / "repo", {"backend": "torch", COMPILED: compiled})
    assert PACKAGES.read_record(str(version_dir)) == compiled


def test_torch_compile_defaults_to_engine_and_reaches_the_detector_config(monkeypatch):
    monkeypatch.delenv("TORCH_COMPILE", raising=False)
    assert BuildSettings.from_env().torch_compile == "engine"
    for mode in ("engine", "load", "0"):
        monkeypatch.setenv("TORCH_COMPILE", mode)
        config = configs(BuildSettings.from_env(), "torch")[repository.DETECTOR]
        assert config.parameters["torch_compile"].string_value == mode
    monkeypatch.setenv("TORCH_COMPILE", "1")
    with pytest.raises(SettingsError, match="TORCH_COMPILE='1': use engine .* load .* or 0"):
        BuildSettings.from_env()


def test_cudnn_algorithms_reach_the_detector_config_and_bad_ones_are_refused(monkeypatch):
    monkeypatch.delenv("CUDNN_ALGORITHMS", raising=False)
    assert BuildSettings.from_env().cudnn_algorithms == BuildSettings.cudnn_algorithms
    for how in ("benchmark", "benchmark:3", "heuristics", "heuristics_b"):
        monkeypatch.setenv("CUDNN_ALGORITHMS", how)
        config = configs(BuildSettings.from_env(), "torch")[repository.DETECTOR]
        assert config.parameters["cudnn_algorithms"].string_value == how
    for bad in ("fastest", "benchmark:0", "benchmark:x", "heuristics:3"):
        monkeypatch.setenv("CUDNN_ALGORITHMS", bad)
        with pytest.raises(SettingsError, match=f"CUDNN_ALGORITHMS='{bad}': use benchmark .* heuristics_b"):
            BuildSettings.from_env()


def test_the_build_and_the_server_validate_the_gpu_settings_in_one_place():
    """The build's settings refuse what the server's ``gpu_options.py`` refuses, with its words."""
    assert GPU_OPTIONS.__file__.endswith("retinaface_detector/1/gpu_options.py")
    assert GPU_OPTIONS.cudnn_algorithms_problem("benchmark:4") is None and GPU_OPTIONS.cuda_waits_problem("spin") is None
    with pytest.raises(ValueError, match="cudnn_algorithms is 'fastest': use benchmark"):
        GPU_OPTIONS.choose_cudnn_algorithms("fastest")
    with pytest.raises(ValueError, match="cuda_waits is 'yield': use block"):
        GPU_OPTIONS.wait_for_gpu("yield")


def test_cuda_waits_reach_the_detector_config_and_bad_ones_are_refused(monkeypatch):
    monkeypatch.delenv("CUDA_WAITS", raising=False)
    settings = BuildSettings.from_env()
    config = configs(settings, "torch")[repository.DETECTOR]
    assert settings.cuda_waits == "block" and config.parameters["cuda_waits"].string_value == "block"
    monkeypatch.setenv("CUDA_WAITS", "spin")
    config = configs(BuildSettings.from_env(), "torch")[repository.DETECTOR]
    assert config.parameters["cuda_waits"].string_value == "spin"
    monkeypatch.setenv("CUDA_WAITS", "yield")
    with pytest.raises(SettingsError, match="CUDA_WAITS='yield': use block .* or spin"):
        BuildSettings.from_env()


def test_the_compile_setting_is_part_of_the_build_fingerprint():
    from tools.engine.source import load_source_model

    source = load_source_model()
    engine = record.fingerprint(Plan.resolve(BuildSettings(), "torch"), source)
    load = record.fingerprint(Plan.resolve(dataclasses.replace(BuildSettings(), torch_compile="load"), "torch"), source)
    assert engine["torch_compile"] == "engine" and load["torch_compile"] == "load"


def test_the_benches_refuse_a_repository_without_a_torch_build(tmp_path):
    with pytest.raises(LookupError, match="no torch build in .*: run make engine BACKEND=torch"):
        servable_build(tmp_path / "repo", BUCKETS)
    (tmp_path / "repo" / repository.DETECTOR / "1").mkdir(parents=True)
    record.write(tmp_path / "repo", {"backend": "onnxruntime"})
    with pytest.raises(LookupError, match="no torch build"):
        servable_build(tmp_path / "repo", BUCKETS)
