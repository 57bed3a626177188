"""INT8 QDQ and FP16 variants: made with ONNX Runtime's tools, what TensorRT accepts, and the
layers that lose accuracy kept float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from medsec_edge.calibration.variants import FP16, INT8, make_variant, sqnr_db


def _conv_net(path, *, highpass: bool) -> None:
    """image -> conv 3x3 (8) -> relu -> conv 3x3 (1). With ``highpass`` the output is a high-pass
    residual, ``reference - box3x3(image)`` (``reference``: the same pixels as a second input),
    cut 1 px from each border, plus a small share of the conv branch: the box convolution looks
    exact on its own output, but its int8 steps swamp the residual the subtraction leaves."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(8, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (1, 8, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(np.zeros(1, np.float32), "b2")
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["branch"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [w1, b1, w2, b2]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, "h", "w"])]
    out = "branch"
    if highpass:
        inputs.append(helper.make_tensor_value_info("reference", TensorProto.FLOAT, [1, 1, "h", "w"]))
        inits += [numpy_helper.from_array(np.full((1, 1, 3, 3), 1 / 9, np.float32), "box"),
                  numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
                  numpy_helper.from_array(np.array([0.001], np.float32), "small"),
                  numpy_helper.from_array(np.array([1, 1], np.int64), "starts"),
                  numpy_helper.from_array(np.array([-1, -1], np.int64), "ends"),
                  numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
        nodes += [
            helper.make_node("Conv", ["image", "box", "zero"], ["mean"], name="boxmean", pads=[1, 1, 1, 1]),
            helper.make_node("Sub", ["reference", "mean"], ["hp"], name="sub"),
            helper.make_node("Mul", ["branch", "small"], ["tiny"], name="scale"),
            helper.make_node("Add", ["hp", "tiny"], ["sum"], name="add"),
            helper.make_node("Slice", ["sum", "starts", "ends", "axes"], ["out"], name="inner"),
        ]
        out = "out"
    graph = helper.make_graph(nodes, "net", inputs,
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 1, "oh", "ow"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _feeds(n=6, seed=1, *, two_inputs=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = 32 + 8 * i  # the runtime feeds many sizes: calibration must take them
        image = (rng.random((1, 1, side, side)) * 10.0 + 1000.0).astype(np.float32)
        out.append({"image": image, "reference": image.copy()} if two_inputs else {"image": image})
    return out


def _run(path, feed):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def test_int8_variant_is_symmetric_per_channel_qdq(tmp_path):
    src = tmp_path / "net.onnx"
    _conv_net(src, highpass=False)
    variant = make_variant(src, tmp_path / "net.int8.onnx", INT8, _feeds(), target_db=15.0)
    assert variant is not None and variant.kept_float == ()
    model = onnx.load(str(variant.path))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zero = inits.get(node.input[2])
            if zero is not None:
                assert zero.dtype == np.int8 and not zero.any(), "TensorRT needs zero point 0, int8"
    # per-channel weights: a weight's scale has one value per output channel
    weight_scales = [inits[n.input[1]] for n in model.graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]
    assert weight_scales and all(s.size == 8 or s.size == 1 for s in weight_scales)
    assert any(s.size == 8 for s in weight_scales)
    feed = _feeds(1, seed=7)[0]
    assert sqnr_db([_run(src, feed)], [_run(variant.path, feed)]) > 15.0


def test_fp16_variant_keeps_float_io(tmp_path):
    src = tmp_path / "net.onnx"
    _conv_net(src, highpass=False)
    variant = make_variant(src, tmp_path / "net.fp16.onnx", FP16, _feeds())
    model = onnx.load(str(variant.path))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)
    feed = _feeds(1, seed=3)[0]
    assert sqnr_db([_run(src, feed)], [_run(variant.path, feed)]) > 40.0


def test_the_layer_that_loses_accuracy_stays_float(tmp_path):
    """The 1x1 convolution looks exact on its own output, but its int8 rounding swamps the residual
    the subtraction takes: the measured sweep keeps it float, the rest is quantized."""
    src = tmp_path / "net.onnx"
    _conv_net(src, highpass=True)
    variant = make_variant(src, tmp_path / "net.int8.onnx", INT8, _feeds(two_inputs=True), target_db=30.0)
    assert variant is not None
    # worst first: the box convolution; its input's int8 copy is shared with conv1 (one Q/DQ
    # pair per tensor), so conv1 follows; conv2 stays int8
    assert variant.kept_float[0] == "boxmean"
    assert "conv2" not in variant.kept_float and variant.quantized_nodes >= 1
    assert min(variant.output_sqnr_db.values()) >= 30.0
    sweep = variant.steps[0]["sensitivity_db_when_alone"]
    assert min(sweep, key=sweep.get) == "boxmean"


def test_sqnr():
    a = [np.ones(100)]
    assert sqnr_db(a, a) == pytest.approx(200.0)
    assert sqnr_db(a, [np.ones(100) * 1.1]) == pytest.approx(20.0, abs=1e-6)
