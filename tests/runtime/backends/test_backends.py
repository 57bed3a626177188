"""Backends: the ONNX Runtime session on a tiny real graph, input checks, provider fallback
detection, the registry, and TensorRT (real where TensorRT and a GPU exist, else skipped)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from medsec_edge.runtime.backends import (
    Backend,
    Session,
    TensorSpec,
    available_backends,
    get_backend,
)
from medsec_edge.runtime.backends import onnxruntime_backend as ort_backend
from medsec_edge.runtime.backends import tensorrt_backend as trt_backend
from medsec_edge.runtime.errors import (
    BackendUnavailableError,
    BundleError,
    ConfigError,
    UsageError,
)


@pytest.fixture
def session(conv_relu_onnx):
    with get_backend("onnxruntime").load(conv_relu_onnx.model_bytes, threads=1) as sess:
        yield sess


def _x(batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 1, 8, 8)).astype(np.float32)


# --- ONNX Runtime ---------------------------------------------------------------------------


def test_onnxruntime_matches_numpy(session, conv_relu_onnx):
    assert isinstance(session, Session)
    assert session.input_names == ["x"]
    assert session.output_names == ["y"]
    assert session.inputs[0] == TensorSpec("x", "float32", ("N", 1, 8, 8))  # symbolic dims keep names
    assert session.providers == ["CPUExecutionProvider"]
    for batch in (1, 3):  # the batch dim is dynamic
        x = _x(batch)
        out = session.run({"x": x})
        assert set(out) == {"y"}
        assert out["y"].shape == (batch, 2, 8, 8)
        assert out["y"].dtype == np.float32
        np.testing.assert_allclose(out["y"], conv_relu_onnx.reference(x), rtol=1e-5, atol=1e-5)
        assert (out["y"] == 0).any() and (out["y"] > 0).any()  # Relu really clipped something


def test_onnxruntime_loads_from_path(tmp_path, conv_relu_onnx):
    path = tmp_path / "model.onnx"
    path.write_bytes(conv_relu_onnx.model_bytes)
    x = _x()
    with get_backend("onnxruntime").load(path, threads=1) as sess:
        np.testing.assert_allclose(sess.run({"x": x})["y"], conv_relu_onnx.reference(x), atol=1e-5)
    assert sess.closed


def test_missing_model_file_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        get_backend("onnxruntime").load(tmp_path / "absent.onnx")


def test_garbage_model_is_refused():
    with pytest.raises(BundleError, match="ONNX Runtime cannot load"):
        get_backend("onnxruntime").load(b"not an onnx model")


@pytest.mark.parametrize(
    "inputs, pattern",
    [
        ({"image": np.zeros((1, 1, 8, 8), np.float32)}, r"missing \['x'\].*unexpected \['image'\]"),
        ({}, r"missing \['x'\]"),
        ({"x": np.zeros((1, 1, 8, 8), np.float32), "extra": np.zeros(1)}, r"unexpected \['extra'\]"),
        ({"x": np.zeros((1, 1, 8, 8), np.float64)}, r"input 'x': expected dtype float32, found float64"),
        ({"x": np.zeros((1, 1, 8, 8), np.uint16)}, r"input 'x': expected dtype float32, found uint16"),
        ({"x": np.zeros((1, 8, 8), np.float32)}, r"input 'x': expected rank 4 .*found rank 3"),
        ({"x": np.zeros((1, 1, 8, 9), np.float32)}, r"input 'x': expected shape \(N, 1, 8, 8\).*axis 3"),
        ({"x": [[0.0]]}, r"input 'x': expected a numpy array of float32, found list"),
    ],
)
def test_wrong_inputs_raise_usage_error(session, inputs, pattern):
    with pytest.raises(UsageError, match=pattern):
        session.run(inputs)


def test_closed_session_refuses_to_run(conv_relu_onnx):
    sess = get_backend("onnxruntime").load(conv_relu_onnx.model_bytes, threads=1)
    sess.close()
    sess.close()  # idempotent
    with pytest.raises(UsageError, match="closed"):
        sess.run({"x": _x()})


def test_cuda_fallback_is_refused(conv_relu_onnx):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to detect")
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("onnxruntime").load(
            conv_relu_onnx.model_bytes, providers=["CUDAExecutionProvider"], threads=1
        )
    message = str(info.value)
    assert "CUDAExecutionProvider" in message and "allow_fallback" in message
    assert "['CPUExecutionProvider']" in message  # what the session really got


def test_cuda_fallback_allowed_logs_warning(conv_relu_onnx, caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: no fallback to detect")
    with caplog.at_level(logging.WARNING, logger=ort_backend.__name__):
        sess = get_backend("onnxruntime").load(
            conv_relu_onnx.model_bytes,
            providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"],
            threads=1,
            allow_fallback=True,
        )
    with sess:
        assert sess.providers == ["CPUExecutionProvider"]
        x = _x()
        np.testing.assert_allclose(sess.run({"x": x})["y"], conv_relu_onnx.reference(x), atol=1e-5)
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


def test_threads_default_from_env(monkeypatch):
    monkeypatch.setenv(ort_backend.THREADS_ENV, "3")
    assert ort_backend.default_threads() == 3
    monkeypatch.delenv(ort_backend.THREADS_ENV)
    assert ort_backend.default_threads() >= 1
    for bad in ("zero", "0", "-2"):
        monkeypatch.setenv(ort_backend.THREADS_ENV, bad)
        with pytest.raises(ConfigError, match=ort_backend.THREADS_ENV):
            ort_backend.default_threads()


def test_thread_count_reaches_session_options(monkeypatch, conv_relu_onnx):
    import onnxruntime as ort

    seen = {}
    real = ort.InferenceSession

    def spy(source, sess_options=None, providers=None):
        seen["threads"] = sess_options.intra_op_num_threads
        seen["level"] = sess_options.graph_optimization_level
        return real(source, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setenv(ort_backend.THREADS_ENV, "2")
    get_backend("onnxruntime").load(conv_relu_onnx.model_bytes).close()
    assert seen == {"threads": 2, "level": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with pytest.raises(UsageError, match="threads"):
        get_backend("onnxruntime").load(conv_relu_onnx.model_bytes, threads=0)


# --- registry -------------------------------------------------------------------------------


def test_registry_resolves_by_name():
    backend = get_backend("onnxruntime")
    assert isinstance(backend, Backend) and backend.name == "onnxruntime"
    assert backend.is_available()
    assert "onnxruntime" in available_backends()
    with pytest.raises(UsageError, match="unknown backend 'nope'.*onnxruntime, tensorrt"):
        get_backend("nope")


def test_unavailable_backend_names_the_extra(monkeypatch):
    monkeypatch.setattr(trt_backend, "_probe", lambda: "no CUDA device found")
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("tensorrt")
    assert "no CUDA device found" in str(info.value)
    assert "pip install 'medsec-edge[tensorrt]'" in str(info.value)
    # Also when the backend is used directly, without the registry's check.
    with pytest.raises(BackendUnavailableError, match=r"medsec-edge\[tensorrt\]"):
        get_backend("tensorrt", check=False).load(b"engine")


def test_tensorrt_probe_gives_a_reason_here():
    reason = trt_backend.TensorRTBackend.probe()
    assert reason is None or isinstance(reason, str) and reason
    assert trt_backend.TensorRTBackend.is_available() == (reason is None)


# --- TensorRT targets (pure logic, no GPU) --------------------------------------------------


def test_engine_target_parsing():
    assert trt_backend.EngineTarget.parse("tensorrt-10.8-sm_87") == trt_backend.EngineTarget("10.8", "sm_87")
    assert trt_backend.EngineTarget.parse("tensorrt-10.8.0-sm90") == trt_backend.EngineTarget("10.8.0", "sm_90")
    assert trt_backend.EngineTarget.parse("tensorrt") == trt_backend.EngineTarget(None, None)
    assert str(trt_backend.EngineTarget.parse("tensorrt-10.8-sm_87")) == "tensorrt-10.8-sm_87"
    for bad in ("tensorrt-ten", "trt-10.8", "tensorrt-10.8-gfx90"):
        with pytest.raises(BundleError, match="malformed"):
            trt_backend.EngineTarget.parse(bad)


def test_target_problem_message():
    device = trt_backend.DeviceInfo("10.13.0.35", "sm_90")
    problem = trt_backend.target_problem(trt_backend.EngineTarget("10.8", "sm_87"), device)
    assert problem == (
        "engine built for TensorRT 10.8 / sm_87, this device has 10.13 / sm_90: "
        "rebuild with 'medsec-edge build'"
    )
    assert trt_backend.target_problem(trt_backend.EngineTarget("10.13", "sm_90"), device) is None
    assert trt_backend.target_problem(trt_backend.EngineTarget("10", None), device) is None
    assert trt_backend.target_problem(trt_backend.EngineTarget("10.13.1", "sm_90"), device) is not None
    assert trt_backend.target_problem(trt_backend.EngineTarget("10.1", "sm_90"), device) is not None


# --- TensorRT on real hardware --------------------------------------------------------------


def _build_engine(model_bytes: bytes) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model_bytes), [parser.get_error(i) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, 8, 8), (2, 1, 8, 8), (4, 1, 8, 8))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    assert serialized is not None
    return bytes(serialized)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_numpy(conv_relu_onnx):
    engine = _build_engine(conv_relu_onnx.model_bytes)
    device = trt_backend.probe_device()
    target = f"tensorrt-{'.'.join(device.tensorrt_version.split('.')[:2])}-{device.compute_capability}"
    with get_backend("tensorrt").load(engine, target=target) as sess:
        assert sess.input_names == ["x"] and sess.output_names == ["y"]
        for batch in (1, 3):
            x = _x(batch)
            out = sess.run({"x": x})["y"]
            assert out.shape == (batch, 2, 8, 8)
            np.testing.assert_allclose(out, conv_relu_onnx.reference(x), rtol=1e-2, atol=1e-2)
        with pytest.raises(UsageError, match="optimization profile"):
            sess.run({"x": _x(8)})
        with pytest.raises(UsageError, match="expected dtype float32"):
            sess.run({"x": _x().astype(np.float16)})


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_refuses_engine_for_another_device(conv_relu_onnx):
    with pytest.raises(BundleError, match=r"engine built for TensorRT 9.0 / sm_10.*rebuild"):
        get_backend("tensorrt").load(b"never deserialized", target="tensorrt-9.0-sm_10")
    with pytest.raises(BundleError, match="cannot deserialize"):
        get_backend("tensorrt").load(b"\x00" * 64)
