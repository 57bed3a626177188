# ---------------------------------------------------------------------------------------------
# Hardware probes and a tiny ONNX graph (runtime backends and bundle tests).
#
# Tests marked `tensorrt` or `gpu` skip with the reason a real probe gives, unless
# MEDSEC_EDGE_REQUIRE_GPU=1, where missing hardware FAILS the test: a GPU run cannot pass by
# skipping. The probes are imported lazily so collecting tests stays cheap.
# ---------------------------------------------------------------------------------------------
import os as _medsec_os
import types as _medsec_types

import numpy as _medsec_np
import pytest as _medsec_pytest

REQUIRE_GPU_ENV = "MEDSEC_EDGE_REQUIRE_GPU"


def hardware_required() -> bool:
    """True where this machine must have the GPU hardware (env MEDSEC_EDGE_REQUIRE_GPU=1)."""
    return _medsec_os.environ.get(REQUIRE_GPU_ENV, "").strip() == "1"


def skip_or_fail_for_hardware(reason: str) -> None:
    """Skip with ``reason``, or fail where the hardware is required."""
    if hardware_required():
        _medsec_pytest.fail(f"{reason} ({REQUIRE_GPU_ENV}=1: this machine must have it)", pytrace=False)
    _medsec_pytest.skip(reason)


def tensorrt_unavailable_reason() -> "str | None":
    """None if TensorRT can run here (tensorrt imports and CUDA sees a device), else why not."""
    from medsec_edge.runtime.backends.tensorrt_backend import TensorRTBackend

    reason = TensorRTBackend.probe()
    return None if reason is None else f"TensorRT unavailable: {reason}"


def cuda_unavailable_reason() -> "str | None":
    """None if a CUDA GPU really runs a model here (an ONNX Runtime CUDA session, or cudart)."""
    reasons = []
    try:
        from medsec_edge.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

        session = OnnxRuntimeBackend().load(
            make_conv_relu_onnx().model_bytes, providers=["CUDAExecutionProvider"], threads=1
        )
        x = _medsec_np.zeros((1, 1, 8, 8), _medsec_np.float32)
        session.run({"x": x})
        session.close()
        return None
    except Exception as exc:  # any failure is a reason to skip, reported as such
        reasons.append(f"onnxruntime CUDA session: {exc}")
    trt_reason = tensorrt_unavailable_reason()
    if trt_reason is None:
        return None
    reasons.append(trt_reason)
    return "no CUDA GPU: " + "; ".join(reasons)


@_medsec_pytest.fixture(autouse=True)
def _medsec_private_registry(tmp_path, monkeypatch):
    """Every test gets its own (not yet existing) evidence registry: `run` would otherwise record
    into the user's data folder and `check` would read what other tests recorded there."""
    monkeypatch.setenv("MEDSEC_EDGE_REGISTRY", str(tmp_path / "medsec-registry" / "registry.sqlite3"))
    yield


@_medsec_pytest.fixture(autouse=True)
def _medsec_hardware_markers(request):
    if request.node.get_closest_marker("tensorrt") is not None:
        reason = tensorrt_unavailable_reason()
        if reason is not None:
            skip_or_fail_for_hardware(reason)
    if request.node.get_closest_marker("gpu") is not None:
        reason = cuda_unavailable_reason()
        if reason is not None:
            skip_or_fail_for_hardware(reason)
    yield


def make_conv_relu_onnx(seed: int = 0, channels: int = 2):
    """A real ONNX graph y = Relu(Conv3x3(x) + b), x: float32 [N, 1, 8, 8] with a dynamic batch.

    Returns a namespace with ``model_bytes``, ``weight``, ``bias`` and ``reference(x)`` (numpy).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = _medsec_np.random.default_rng(seed)
    weight = rng.standard_normal((channels, 1, 3, 3)).astype(_medsec_np.float32)
    bias = rng.standard_normal(channels).astype(_medsec_np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["y"]),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 8, 8])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by every onnxruntime we support
    onnx.checker.check_model(model)

    def reference(x):
        padded = _medsec_np.pad(x.astype(_medsec_np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = _medsec_np.zeros((x.shape[0], channels, x.shape[2], x.shape[3]))
        for c in range(channels):
            for dy in range(3):
                for dx in range(3):
                    window = padded[:, 0, dy : dy + x.shape[2], dx : dx + x.shape[3]]
                    out[:, c] += weight[c, 0, dy, dx] * window
            out[:, c] += bias[c]
        return _medsec_np.maximum(out, 0.0)

    return _medsec_types.SimpleNamespace(
        model_bytes=model.SerializeToString(), weight=weight, bias=bias, reference=reference
    )


@_medsec_pytest.fixture(scope="session")
def conv_relu_onnx():
    """The tiny Conv+Relu ONNX graph of ``make_conv_relu_onnx``, built once per test session."""
    return make_conv_relu_onnx()
