"""INT8 (explicit QDQ) and FP16 variants of one ONNX model, with the layers that lose accuracy kept float.

Layer: calibration (onnx, onnxruntime). Quantization is ONNX Runtime's own tooling, not
hand-written: ``quantize_static`` in QDQ format with symmetric int8 activations and per-channel
symmetric int8 weights (zero point 0: what TensorRT's explicit-quantization path accepts), ranges
from the recorded calibration inputs (``recording.py``); FP16 is ``onnxruntime.transformers``'
``convert_float_to_float16`` with float inputs and outputs kept, so the runtime feeds every
variant the same tensors.

Layers that lose accuracy stay float, found by measurement: the variant's outputs are compared
with the float model's on the calibration inputs (signal-to-quantization-noise ratio, SQNR, in
dB); below ``target_db``, the nodes whose lowering alone costs the outputs most are kept float
(int8: ``nodes_to_exclude``; fp16: ``node_block_list``), worst first, until the target is met.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

INT8 = "int8-qdq"
FP16 = "fp16"
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # where int8 arithmetic saves work; the rest stays float
DEFAULT_TARGET_DB = 30.0
MAX_SQNR_DB = 200.0  # an exact match (zero noise) reported as this


@dataclass(frozen=True)
class Variant:
    """One model's variant file and how it was made."""

    precision: str
    path: Path
    kept_float: tuple[str, ...]  # node names left float because they lost accuracy
    quantized_nodes: int  # nodes in low precision (int8: quantized ops; fp16: converted nodes)
    output_sqnr_db: dict[str, float]  # per model output, on the calibration inputs
    steps: list[dict] = field(default_factory=list)  # each exclusion: node, local drop, output SQNR

    def to_dict(self) -> dict:
        return {"precision": self.precision, "kept_float": list(self.kept_float),
                "low_precision_nodes": self.quantized_nodes,
                "output_sqnr_db": {k: round(v, 2) for k, v in self.output_sqnr_db.items()},
                "exclusion_steps": self.steps}


def sqnr_db(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """10 log10(signal power / error power) over all pairs (the same measure as ORT's debugger)."""
    signal = sum(float(np.sum(np.square(np.asarray(r, np.float64)))) for r in reference)
    noise = sum(float(np.sum(np.square(np.asarray(r, np.float64) - np.asarray(t, np.float64))))
                for r, t in zip(reference, test))
    if noise <= 0.0:
        return MAX_SQNR_DB
    if signal <= 0.0:
        return -MAX_SQNR_DB
    return min(MAX_SQNR_DB, 10.0 * math.log10(signal / noise))


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over recorded input dicts."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _name_nodes(model) -> None:
    """Give every unnamed node a name: the exclusion lists name nodes."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _candidate_nodes(model, precision: str) -> list[str]:
    """The nodes ``precision`` may lower (named by ``_name_nodes``)."""
    names = []
    for node in model.graph.node:
        if precision == INT8 and node.op_type not in QUANTIZED_OPS:
            continue
        if precision == FP16 and node.op_type in ("Constant", "Shape", "Cast"):
            continue
        names.append(node.name)
    return names


def _named_copy(src: Path, dst: Path) -> Path:
    """``src`` with every node named (the exclusion lists name nodes)."""
    import onnx

    model = onnx.load(str(src))
    _name_nodes(model)
    onnx.save(model, str(dst))
    return dst


class _NoPreprocessAdvice(logging.Filter):
    """Drops ONNX Runtime's advice to run its ``quant_pre_process`` first: that step folds our
    models' size-dependent Reshapes into the calibration shapes (measured: fp_encoder then fails
    at 200x232), so it is not used, and the advice would repeat for every trial."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def _make(src: Path, dst: Path, precision: str, feeds, kept_float: Sequence[str]) -> None:
    if precision == INT8:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        import onnx

        model = onnx.load(str(src))
        ops = sorted({n.op_type for n in model.graph.node} & set(QUANTIZED_OPS))
        advice = _NoPreprocessAdvice()
        logging.getLogger().addFilter(advice)
        try:
            quantize_static(
                str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=ops, nodes_to_exclude=list(kept_float),
                calibrate_method=CalibrationMethod.MinMax,
                # the mean of per-input ranges: one outlier input does not widen every step (measured
                # on the default decoder: 14.9 dB output SQNR against 7.3 with global min/max; ORT's
                # histogram methods need equal shapes, which the runtime's inputs are not); biases
                # stay float: TensorRT's parser takes int8 Q/DQ pairs, not an int32 bias DQ
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "CalibMovingAverage": True, "QuantizeBias": False},
            )
        finally:
            logging.getLogger().removeFilter(advice)
    elif precision == FP16:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                         node_block_list=list(kept_float) or None)
        onnx.save(model, str(dst))
    else:
        raise ValueError(f"precision {precision!r}: expected {INT8!r} or {FP16!r}")


def _activations(path: Path, feeds, workdir: Path) -> dict[str, list[np.ndarray]]:
    """Every node input/output tensor of the model at ``path``, per calibration input (float64)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    names = []
    for node in model.graph.node:
        for name in node.output:
            if name and name not in present:
                names.append(name)
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    for name in names:
        if name in types:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    augmented = workdir / (path.stem + ".augmented.onnx")
    onnx.save(model, str(augmented))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    acts: dict[str, list[np.ndarray]] = {n: [] for n in out_names}
    for feed in feeds:
        for name, value in zip(out_names, session.run(out_names, dict(feed))):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                acts[name].append(value.astype(np.float64))
    return {k: v for k, v in acts.items() if v}


def _compare(float_acts, variant_acts) -> dict[str, float]:
    return {name: sqnr_db(ref, variant_acts[name]) for name, ref in float_acts.items()
            if name in variant_acts and all(r.shape == t.shape for r, t in zip(ref, variant_acts[name]))}


def _output_sqnr(named: Path, trial: Path, precision: str, feeds, kept: Sequence[str], float_acts,
                 outputs: Sequence[str], work: Path) -> float:
    _make(named, trial, precision, feeds, kept)
    sqnr = _compare(float_acts, _activations(trial, feeds, work))
    return min(sqnr.get(o, -MAX_SQNR_DB) for o in outputs)


def make_variant(src: Path, dst: Path, precision: str, feeds: Sequence[Mapping[str, np.ndarray]], *,
                 target_db: float = DEFAULT_TARGET_DB, sweep_inputs: int = 8) -> Variant | None:
    """The ``precision`` variant of ``src`` at ``dst``, or None when nothing of it can be lowered
    (no candidate op, or the output misses ``target_db`` until every candidate is float).

    Sensitivity is measured, not guessed: each candidate node is lowered alone (the others float)
    on ``sweep_inputs`` calibration inputs and the model outputs' SQNR noted; then nodes are kept
    float worst first until the variant's outputs reach ``target_db`` on all calibration inputs.
    A local measure misleads here: a box-filter convolution looks exact on its own output, yet its
    int8 rounding dominates the high-pass residual a later subtraction takes from it.
    """
    import onnx

    feeds = list(feeds)
    if not feeds:
        raise ValueError(f"{src.name}: no calibration inputs were recorded for this model")
    sweep = feeds[: max(1, sweep_inputs)]
    with tempfile.TemporaryDirectory(prefix="medsec-calib-") as tmp:
        work = Path(tmp)
        named = _named_copy(src, work / src.name)
        model = onnx.load(str(named))
        candidates = _candidate_nodes(model, precision)
        if not candidates:
            return None
        outputs = [o.name for o in model.graph.output]
        trial = work / f"trial.{precision}.onnx"
        float_acts = _activations(named, feeds, work)
        worst = _output_sqnr(named, trial, precision, feeds, [], float_acts, outputs, work)
        kept: list[str] = []
        steps: list[dict] = []
        if worst < target_db:
            sweep_acts = {k: v[: len(sweep)] for k, v in float_acts.items()}
            alone = {}
            for node in candidates:
                others = [c for c in candidates if c != node]
                alone[node] = _output_sqnr(named, trial, precision, sweep, others, sweep_acts, outputs, work)
            order = sorted(candidates, key=lambda n: alone[n])
            steps.append({"sensitivity_db_when_alone": {n: round(alone[n], 2) for n in order}})
            for node in order:
                kept.append(node)
                if len(kept) == len(candidates):
                    break
                worst = _output_sqnr(named, trial, precision, feeds, kept, float_acts, outputs, work)
                steps.append({"kept_float": node, "output_sqnr_db": round(worst, 2)})
                log.info("%s %s: %s kept float -> output SQNR %.1f dB", src.name, precision, node, worst)
                if worst >= target_db:
                    break
        if len(kept) >= len(candidates) or worst < target_db:
            log.info("%s %s: no variant (the outputs need every candidate float)", src.name, precision)
            return None
        _make(named, trial, precision, feeds, kept)
        out_sqnr = _compare({o: float_acts[o] for o in outputs if o in float_acts},
                            _activations(trial, feeds, work))
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(trial, dst)
    return Variant(precision, dst, tuple(kept), len(candidates) - len(kept), out_sqnr, steps)
