"""GPU check: the bundle's image models on one CUDA GPU, ONNX Runtime beside a torch reference.

For each image model of a bundle (an input [1, 1, height, width]) at each size (default 512 and
2048): ONNX Runtime's CUDA provider in FP32 and FP16 (the bundle's ``<model>@fp16`` variant if it
has one, else ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``),
plus the ``@int8-qdq`` variant where the bundle has one; batch 1 at every size, and a batch of
``--batch`` (8) at ``--batch-at`` (512) through the symbolic-batch rewrite of ``export triton``
where the model passes its batch check. Beside each, a torch reference that is timing only: the
model's own convolutions (weights and attributes read from the ONNX file) run with
``torch.nn.functional.conv2d`` in graph order, each on a tensor of the input shape it has in the
model (found by running the model once with those tensors as extra outputs); everything that is
not a convolution (activations, pooling, resizing, normalisation) is left out, so it is a floor of
what the convolutions cost, not the model.

Checked, not assumed: the session's providers (``get_providers()``, CUDA first, else exit 1: a
silent CPU fallback would make every number a lie), and every result: a batch against its first
sample alone (tolerances of ``export triton``), FP16 and INT8 against FP32 (reported). Timings are
``run_with_iobinding`` with inputs and outputs on the device (``host p50`` adds the copies:
``session.run`` from numpy), after warm-up, with output sync; p50 and p99 in milliseconds.

One markdown table on stdout; JSON to ``$OUT/gpu_check.json`` if ``OUT`` is set, or ``--json``.
Needs numpy, onnx, onnxruntime-gpu and torch only: the bundle's manifest is read as JSON and each
file's sha256 checked against it (its signature is not: that needs ``cryptography``, which this
script does without; it only times). ``medsec_edge`` is imported from the checkout when it is not
installed. Without CUDA it exits 3, unless ``--allow-cpu`` (a dry run on the CPU provider: try
``--sizes 64,96 --batch-at 64 --batch 2 --iters 3 --warmup 1``).

    python benchmarks/gpu_check.py [--bundle bundles/default] [--sizes 512,2048] [--models a,b]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EXIT_CHECK_FAILED = 1
EXIT_NO_CUDA = 3
# A batch may get other cuDNN algorithms than one image, and the CUDA provider computes FP32
# convolutions in TF32 (10-bit mantissa) by default: sums differ more than on the CPU.
CUDA_BATCH_TOLERANCE = {"fp32": 5e-3, "fp16": 1e-2, "int8-qdq": 2e-2}


def _batching_module() -> Any:
    """``medsec_edge.export.triton`` (symbolic-batch rewrite and check), installed or from the checkout.

    Without an install, the checkout's folders are mapped to the packages as pyproject.toml's
    ``package-dir`` does; only ``runtime/errors.py`` and ``export/triton.py`` are executed.
    """
    try:
        from medsec_edge.export import triton

        return triton
    except ImportError:
        pass
    top = types.ModuleType("medsec_edge")
    top.__path__ = []  # a namespace for the two subpackages below
    sys.modules["medsec_edge"] = top
    for sub in ("runtime", "export"):
        folder = ROOT / sub
        spec = importlib.util.spec_from_file_location(
            f"medsec_edge.{sub}", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    from medsec_edge.export import triton

    return triton


@dataclass(frozen=True)
class Spec:
    """A manifest tensor, as ``export/triton.py``'s helpers read it."""

    name: str
    dtype: str
    shape: tuple


@dataclass
class Row:
    model: str
    size: int
    batch: int
    engine: str
    precision: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    per_image_ms: float | None = None
    host_p50_ms: float | None = None
    vs_torch: float | None = None
    check: str = ""
    ok: bool = True
    providers: list = field(default_factory=list)


def _percentiles(times_s: list[float]) -> tuple[float, float]:
    ms = np.asarray(times_s) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(got64 - want64)) / max(float(np.max(np.abs(want64))), 1e-12))


# --- the bundle -------------------------------------------------------------------------------


def _read_bundle(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _model_bytes(bundle: Path, manifest: dict, name: str) -> bytes:
    entry = manifest["models"][name]
    data = (bundle / entry["file"]).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise SystemExit(f"error: {bundle / entry['file']} has sha256 {digest[:12]}, the manifest says "
                         f"{entry['sha256'][:12]}: the bundle was modified")
    return data


def _specs(items: list[dict]) -> list[Spec]:
    return [Spec(t["name"], t["dtype"], tuple(t["shape"])) for t in items]


def image_models(manifest: dict) -> list[str]:
    """Plain (not ``@``) ONNX models whose inputs include an image [1, 1, height, width]."""
    names = []
    for name, entry in sorted(manifest["models"].items()):
        if "@" in name or entry["target"] != "onnxruntime":
            continue
        if any(len(t["shape"]) == 4 and all(isinstance(d, str) for d in t["shape"][2:]) for t in entry["inputs"]):
            names.append(name)
    return names


def _fp16(data: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(onnx.load_model_from_string(data), keep_io_types=True).SerializeToString()


# --- ONNX Runtime -----------------------------------------------------------------------------


class ProviderError(RuntimeError):
    pass


def _session(data: bytes, use_cuda: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(data, options, providers=providers)
    got = session.get_providers()
    if use_cuda and (not got or got[0] != "CUDAExecutionProvider"):
        raise ProviderError(f"asked for CUDAExecutionProvider, the session got {got}")
    return session


def _inputs(specs: list[Spec], size: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [batch] + [d if isinstance(d, int) else size for d in spec.shape[1:]]
        feeds[spec.name] = rng.random(shape, dtype=np.float32).astype(spec.dtype)
    return feeds


def time_ort(session: Any, feeds: dict[str, np.ndarray], use_cuda: bool, warmup: int, iters: int):
    """(device-resident times, host times, outputs): run_with_iobinding with inputs and outputs on the
    device, then session.run from numpy (copies included)."""
    import onnxruntime as ort

    device = "cuda" if use_cuda else "cpu"
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)
    for _ in range(warmup):
        session.run_with_iobinding(binding)
    binding.synchronize_outputs()
    device_s = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        device_s.append(time.perf_counter() - start)
    outputs = binding.copy_outputs_to_cpu()
    host_s = []
    for _ in range(max(3, iters // 3)):
        start = time.perf_counter()
        session.run(None, feeds)
        host_s.append(time.perf_counter() - start)
    return device_s, host_s, outputs


# --- the torch reference ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConvLayer:
    weight: np.ndarray
    bias: np.ndarray | None
    input_shape: tuple  # (N, C, H, W) as the model feeds it, before the conv's own padding
    strides: tuple
    pads: tuple  # (top, left, bottom, right)
    dilations: tuple
    group: int


def conv_layers(data: bytes, feeds: dict[str, np.ndarray], use_cuda: bool) -> tuple[list[ConvLayer], int]:
    """The model's convolutions and the input shape each gets for ``feeds``; and how many were
    skipped (weights computed in the graph, or not 2-D)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_model_from_string(data)
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for node in graph.node:  # fixed filters (a Gaussian, say) are exported as Constant nodes
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            weights.setdefault(node.output[0], node.attribute[0].t)
    graph_inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    convs, skipped = [], 0
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        if node.input[1] not in weights or len(weights[node.input[1]].dims) != 4:
            skipped += 1
            continue
        convs.append(node)
        if node.input[0] not in graph_inputs and node.input[0] not in outputs:
            graph.output.append(helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None))
            outputs.add(node.input[0])
    session = _session(model.SerializeToString(), use_cuda)
    names = [o.name for o in session.get_outputs()]
    shapes = {name: value.shape for name, value in zip(names, session.run(names, feeds))}
    shapes.update({name: array.shape for name, array in feeds.items()})
    layers = []
    for node in convs:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            skipped += 1
            continue
        bias = numpy_helper.to_array(weights[node.input[2]]) if len(node.input) > 2 and node.input[2] in weights else None
        layers.append(ConvLayer(
            weight=numpy_helper.to_array(weights[node.input[1]]).astype(np.float32),
            bias=None if bias is None else bias.astype(np.float32),
            input_shape=tuple(shapes[node.input[0]]),
            strides=tuple(attrs.get("strides", (1, 1))),
            pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
            dilations=tuple(attrs.get("dilations", (1, 1))),
            group=int(attrs.get("group", 1)),
        ))
    return layers, skipped


def time_torch(layers: list[ConvLayer], batch_factor: int, half: bool, use_cuda: bool, warmup: int, iters: int):
    """Times of the convolutions in graph order, each on a random tensor of its (padded) input shape."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.float16 if half else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)
    prepared = []
    for layer in layers:
        n, c, h, w = layer.input_shape
        top, left, bottom, right = layer.pads
        # Padding is done once here (the input is made at its padded size): only the conv is timed.
        x = torch.rand((n * batch_factor, c, h + top + bottom, w + left + right), generator=generator)
        prepared.append((
            x.to(device, dtype),
            torch.from_numpy(layer.weight).to(device, dtype),
            None if layer.bias is None else torch.from_numpy(layer.bias).to(device, dtype),
            layer,
        ))

    def once():
        for x, weight, bias, layer in prepared:
            F.conv2d(x, weight, bias, stride=layer.strides, padding=0, dilation=layer.dilations, groups=layer.group)

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(warmup):
            once()
        sync()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            once()
            sync()
            times.append(time.perf_counter() - start)
    return times


# --- the run ----------------------------------------------------------------------------------


def _cuda_state() -> tuple[bool, str]:
    """Whether both ONNX Runtime and torch can use CUDA here, and what is missing otherwise."""
    import onnxruntime as ort

    problems = []
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        problems.append(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers "
                        f"{ort.get_available_providers()}): pip install onnxruntime-gpu")
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append(f"torch {torch.__version__} sees no CUDA device")
    except ImportError:
        problems.append("torch is not installed")
    return not problems, "; ".join(problems)


def run(args: argparse.Namespace) -> int:
    import onnxruntime as ort
    import torch

    batching = _batching_module()
    cuda, missing = _cuda_state()
    if not cuda and not args.allow_cpu:
        print(f"error: no CUDA here: {missing}. This check times the CUDA provider; pass --allow-cpu "
              "for a dry run on the CPU provider.", file=sys.stderr)
        return EXIT_NO_CUDA
    if cuda:
        torch.backends.cudnn.benchmark = True  # as ONNX Runtime's exhaustive conv search
    bundle = Path(args.bundle)
    manifest = _read_bundle(bundle)
    names = image_models(manifest)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"error: {unknown} are not image models of {bundle}: choose from {names}", file=sys.stderr)
            return 2
        names = wanted
    sizes = [int(s) for s in args.sizes.split(",")]
    engine = "ort-cuda" if cuda else "ort-cpu"
    rows: list[Row] = []

    for name in names:
        entry = manifest["models"][name]
        inputs, outputs = _specs(entry["inputs"]), _specs(entry["outputs"])
        fp32 = _model_bytes(bundle, manifest, name)
        variants = {"fp32": fp32}
        if f"{name}@fp16" in manifest["models"]:
            variants["fp16"] = _model_bytes(bundle, manifest, f"{name}@fp16")
        else:
            variants["fp16"] = _fp16(fp32)
        if f"{name}@int8-qdq" in manifest["models"]:
            variants["int8-qdq"] = _model_bytes(bundle, manifest, f"{name}@int8-qdq")
        # The batched graph, where export triton's check (on the CPU, small random images) passes.
        batched: dict[str, bytes | str] = {}
        if args.batch > 1 and args.batch_at in sizes:
            for precision, model_bytes in variants.items():
                graph = batching.with_batch_dim(model_bytes, inputs, outputs)
                verdict = (batching.check_batching(model_bytes, graph, inputs, precision) if graph is not None
                           else None)
                batched[precision] = (graph if verdict is not None and verdict.batchable
                                      else f"not batched: {verdict.reason if verdict else 'a fixed leading dim'}")

        for size in sizes:
            cases = [1] + ([args.batch] if size == args.batch_at and args.batch > 1 else [])
            for batch in cases:
                feeds = _inputs(inputs, size, batch, seed=size)
                reference: dict[str, list[np.ndarray]] = {}
                for precision, model_bytes in variants.items():
                    row = Row(name, size, batch, engine, precision)
                    rows.append(row)
                    graph = batched[precision] if batch > 1 else model_bytes
                    if isinstance(graph, str):
                        row.check = graph
                        continue
                    try:
                        session = _session(graph, cuda)
                    except ProviderError as exc:
                        row.check, row.ok = f"FAIL: {exc}", False
                        continue
                    except Exception as exc:  # noqa: BLE001 - e.g. no FP16 kernel on the CPU provider
                        row.check, row.ok = f"not run: {' '.join(str(exc).split())[:120]}", not cuda
                        continue
                    row.providers = session.get_providers()
                    device_s, host_s, result = time_ort(session, feeds, cuda, args.warmup, args.iters)
                    row.p50_ms, row.p99_ms = _percentiles(device_s)
                    row.per_image_ms = row.p50_ms / batch
                    row.host_p50_ms = _percentiles(host_s)[0]
                    checks = []
                    if batch > 1:
                        alone = session.run(None, {k: v[:1] for k, v in feeds.items()})
                        worst = max(_relative(result[k][:1], alone[k]) for k in range(len(alone)))
                        tolerance = (CUDA_BATCH_TOLERANCE if cuda else batching.BATCH_TOLERANCE).get(precision, 1e-5)
                        row.ok = worst <= tolerance
                        checks.append(f"batch[0] vs alone {worst:.1e}" + ("" if row.ok else f" > {tolerance:.0e} FAIL"))
                    if precision == "fp32":
                        reference = {"out": result}
                    elif reference:
                        worst = max(_relative(result[k], reference["out"][k]) for k in range(len(result)))
                        checks.append(f"vs fp32 {worst:.1e}")
                    row.check = "; ".join(checks) or ("providers " + ",".join(p.replace("ExecutionProvider", "")
                                                                            for p in row.providers))

                layers, skipped = conv_layers(fp32, {k: v[:1] for k, v in feeds.items()}, cuda)
                for half in (False, True):
                    row = Row(name, size, batch, "torch-convs", "fp16" if half else "fp32")
                    rows.append(row)
                    try:
                        times = time_torch(layers, batch, half, cuda, args.warmup, args.iters)
                    except RuntimeError as exc:  # e.g. FP16 convolution on a CPU build of torch
                        row.check = f"not run: {' '.join(str(exc).split())[:120]}"
                        continue
                    row.p50_ms, row.p99_ms = _percentiles(times)
                    row.per_image_ms = row.p50_ms / batch
                    row.check = f"{len(layers)} convs" + (f", {skipped} skipped" if skipped else "")
                    for other in rows:
                        if (other.engine == engine and other.model == name and other.size == size
                                and other.batch == batch and other.precision == row.precision and other.p50_ms):
                            other.vs_torch = other.p50_ms / row.p50_ms

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    print(table(rows, device, cuda))
    report = {
        "device": device,
        "cuda": cuda,
        "dry_run_reason": None if cuda else missing,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "tf32": {"torch_cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)},
        "bundle": str(bundle),
        "bundle_name": manifest.get("name"),
        "torch_reference": "the model's convolutions only (weights from the ONNX file, F.conv2d in graph "
                           "order at the input shapes the model gives them); timing only",
        "args": vars(args),
        "rows": [asdict(r) for r in rows],
    }
    target = Path(args.json) if args.json else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nJSON: {target}", file=sys.stderr)
    failed = [r for r in rows if not r.ok]
    if failed:
        print(f"error: {len(failed)} checks failed: " + "; ".join(f"{r.model} {r.size} b{r.batch} {r.precision}: "
                                                               f"{r.check}" for r in failed), file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def _ms(value: float | None) -> str:
    return "" if value is None else (f"{value:.3f}" if value < 10 else f"{value:.1f}")


def table(rows: list[Row], device: str, cuda: bool) -> str:
    lines = [
        f"GPU check on {device}" + ("" if cuda else " (DRY RUN on the CPU provider: no CUDA here)"),
        "",
        "| model | size | batch | engine | precision | p50 ms | p99 ms | ms/image | host p50 ms | vs torch | check |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "" if r.vs_torch is None else f"{r.vs_torch:.2f}x"
        lines.append(f"| {r.model} | {r.size} | {r.batch} | {r.engine} | {r.precision} | {_ms(r.p50_ms)} | "
                     f"{_ms(r.p99_ms)} | {_ms(r.per_image_ms)} | {_ms(r.host_p50_ms)} | {ratio} | {r.check} |")
    lines += ["", "p50/p99: inputs and outputs on the device (IO binding); host p50: session.run from numpy, "
              "copies included. vs torch: ONNX Runtime p50 / torch-convs p50 at the same model, size, batch "
              "and precision (torch-convs: the model's convolutions alone, a floor, not the model)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=str(ROOT / "bundles" / "default"))
    parser.add_argument("--models", default="", help="comma-separated image models (default: all)")
    parser.add_argument("--sizes", default="512,2048", help="image sides, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="the batched case's batch size")
    parser.add_argument("--batch-at", type=int, default=512, help="the size the batched case runs at")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, dry-run on the CPU provider")
    parser.add_argument("--json", default="", help="write the JSON here (default: $OUT/gpu_check.json if OUT is set)")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
