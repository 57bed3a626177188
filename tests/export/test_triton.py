"""`export triton`: the real default bundle as a Triton model repository (every config parsed by
Triton's own protobuf, every ONNX file loaded and run with the batching its config declares),
models that cannot batch, TensorRT plans, and bundles that must be refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx", reason="export triton needs onnx: pip install 'medsec-edge[export]'")
model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="Triton's model config protobuf: pip install 'tritonclient[grpc]'"
)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from medsec_edge.export.triton import (  # noqa: E402
    BATCH_DIM,
    MAX_BATCH,
    check_batching,
    export_triton,
    triton_name,
    with_batch_dim,
)
from medsec_edge.runtime.bundle import (  # noqa: E402
    default_trust_dir,
    generate_signing_key,
    open_bundle,
    write_bundle,
)
from medsec_edge.runtime.cli.root import app  # noqa: E402
from medsec_edge.runtime.errors import BundleError, UsageError  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

DEFAULT_BUNDLE = default_trust_dir().parent / "default"
TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
runner = CliRunner()


def _config(repo, name):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _dims(shape):
    return [d if isinstance(d, int) else -1 for d in shape]


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    result = export_triton(DEFAULT_BUNDLE, repo)
    return repo, result


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    generate_signing_key(root / "signing.pem", root / "trusted" / "signing.pub")
    return root / "signing.pem", root / "trusted"


# --- the default bundle -----------------------------------------------------------------------


def test_every_config_parses_and_matches_the_manifest(default_repo):
    repo, result = default_repo
    manifest = open_bundle(DEFAULT_BUNDLE, check_compatibility=False).manifest
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(map(triton_name, manifest.models))
    assert {m.bundle_model for m in result.models} == set(manifest.models)
    for model in result.models:
        entry = manifest.models[model.bundle_model]
        config = _config(repo, model.name)
        assert config.name == model.name == triton_name(entry.name)
        assert config.platform == "onnxruntime_onnx"
        assert (repo / model.name / "1" / "model.onnx").is_file()
        assert config.max_batch_size == model.max_batch_size
        batched = config.max_batch_size > 0
        assert config.HasField("dynamic_batching") == batched
        for declared, got in ((entry.inputs, config.input), (entry.outputs, config.output)):
            assert [t.name for t in got] == [s.name for s in declared]
            for spec, tensor in zip(declared, got):
                assert model_config_pb2.DataType.Name(tensor.data_type) == TYPES[spec.dtype]
                assert list(tensor.dims) == _dims(spec.shape[1:] if batched else spec.shape)


def test_every_model_of_the_default_bundle_batches(default_repo):
    """The finding behind max_batch_size 8: all six graphs (image models exported with a batch of
    1 included) give for a batch what they give for its samples one by one."""
    _, result = default_repo
    assert {m.name: m.max_batch_size for m in result.models} == {
        name: MAX_BATCH for name in
        ("fp_encoder", "tamper_detector", "wm_decoder", "wm_message", "wm_readout", "wm_strength")}
    for model in result.models:
        assert model.batch.batchable and model.batch.max_rel_error is not None
        assert model.batch.max_rel_error <= 1e-5


def test_onnx_files_run_with_the_declared_batching(default_repo):
    repo, result = default_repo
    manifest = open_bundle(DEFAULT_BUNDLE, check_compatibility=False).manifest
    rng = np.random.default_rng(5)
    for model in result.models:
        config = _config(repo, model.name)
        entry = manifest.models[model.bundle_model]
        session = _session(repo / model.file)
        assert [i.name for i in session.get_inputs()] == [t.name for t in config.input]
        batch = 3  # not the 2 the export checked with
        feeds = {}
        for tensor, ort_input in zip(config.input, session.get_inputs()):
            if config.max_batch_size:
                assert ort_input.shape[0] == BATCH_DIM  # the rewritten file has the batch dim
            assert [d if isinstance(d, int) else -1 for d in ort_input.shape[1:]] == list(tensor.dims)
            shape = [batch] + [d if d > 0 else 48 for d in tensor.dims]
            feeds[tensor.name] = rng.random(shape, dtype=np.float32)
        together = session.run(None, feeds)
        alone = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(batch)]
        for k in range(len(entry.outputs)):
            assert together[k].shape[0] == batch
            np.testing.assert_allclose(together[k], np.concatenate([a[k] for a in alone]), rtol=1e-5, atol=1e-6)
        # the shipped graph still computes what the bundle's own file computes for one image
        original = _session(DEFAULT_BUNDLE / entry.file)
        first = original.run(None, {k: v[:1] for k, v in feeds.items()})
        for k in range(len(entry.outputs)):
            np.testing.assert_allclose(alone[0][k], first[k], rtol=1e-6, atol=1e-7)


def test_readme_lists_every_model(default_repo):
    repo, result = default_repo
    text = (repo / "README.md").read_text()
    assert result.key_id in text
    for model in result.models:
        assert f"| `{model.name}` | `{model.bundle_model}` |" in text


def test_cli_writes_the_repository_and_refuses_to_overwrite(tmp_path):
    repo = tmp_path / "repo"
    result = runner.invoke(app, ["export", "triton", str(DEFAULT_BUNDLE), "--out", str(repo), "--json"])
    assert result.exit_code == 0, result.output
    assert (repo / "wm_decoder" / "config.pbtxt").is_file()
    assert '"max_batch": 8' in result.output
    again = runner.invoke(app, ["export", "triton", str(DEFAULT_BUNDLE), "--out", str(repo)])
    assert again.exit_code == 2
    assert "--overwrite" in again.output


# --- models that do not batch -----------------------------------------------------------------


def _flatten_model():
    """y = Reshape(x, [1, -1]): a graph that hard-codes a batch of one."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n"])],
        [numpy_helper.from_array(np.array([1, -1], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _batch_norm_model():
    """y = x / mean(x over every axis): shapes batch, values mix the samples."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["m"], keepdims=1),
         helper.make_node("Div", ["x", "m"], ["y"])], "mix",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "height", "width"])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _spec(name, shape):
    from medsec_edge.runtime.bundle import TensorSpec

    return TensorSpec(name, "float32", tuple(shape))


def test_a_graph_that_hardcodes_the_batch_is_refused():
    data = _flatten_model().SerializeToString()
    inputs, outputs = [_spec("x", [1, 1, "height", "width"])], [_spec("y", [1, "n"])]
    batched = with_batch_dim(data, inputs, outputs)
    assert batched is not None
    check = check_batching(data, batched, inputs)
    assert not check.batchable
    assert "shape" in check.reason and "(1, " in check.reason


def test_a_graph_that_mixes_samples_is_refused():
    data = _batch_norm_model().SerializeToString()
    specs = [_spec("x", [1, 1, "height", "width"])], [_spec("y", [1, 1, "height", "width"])]
    check = check_batching(data, with_batch_dim(data, *specs), specs[0])
    assert not check.batchable
    assert "mixes samples" in check.reason and check.max_rel_error > 1e-3


def test_a_fixed_leading_dim_other_than_one_is_no_batch_dim():
    data = _batch_norm_model().SerializeToString()
    assert with_batch_dim(data, [_spec("x", [4, 1, 8, 8])], [_spec("y", [4, 1, 8, 8])]) is None


def _small_bundle(tmp_path, keys, models, files, export=None):
    key, _ = keys
    manifest = {"name": "small", "models": models, "budgets_ms": {"embed_512": 20}, "export": export or {}}
    return write_bundle(tmp_path / "bundle", manifest, files, key)


def test_unbatchable_model_is_exported_without_batching(tmp_path, keys):
    path = tmp_path / "flatten.onnx"
    onnx.save(_flatten_model(), path)
    model = {"file": "flatten.onnx", "precision": "fp32", "target": "onnxruntime",
             "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 1, "height", "width"]}],
             "outputs": [{"name": "y", "dtype": "float32", "shape": [1, "n"]}]}
    bundle = _small_bundle(tmp_path, keys, {"flatten": model}, {"flatten": path})
    repo = tmp_path / "repo"
    result = export_triton(bundle, repo, trusted_keys=keys[1])
    config = _config(repo, "flatten")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 1, -1, -1]
    assert list(config.output[0].dims) == [1, -1]
    # the file is the bundle's own, unchanged, and the reason is written down
    assert (repo / "flatten" / "1" / "model.onnx").read_bytes() == path.read_bytes()
    reason = result.models[0].batch.reason
    assert reason in (repo / "README.md").read_text()
    assert reason in (repo / "flatten" / "config.pbtxt").read_text()


def test_variants_and_tensorrt_plans(tmp_path, keys):
    """``@`` variants get valid Triton names; plans are ``tensorrt_plan``, batched only where the
    recorded optimization profile gives the leading dim a range."""
    onnx_file = DEFAULT_BUNDLE / "wm_message.onnx"
    plan = tmp_path / "wm_message.plan"
    plan.write_bytes(b"not really an engine")
    image_plan = tmp_path / "wm_decoder.plan"
    image_plan.write_bytes(b"not an engine either")
    bits = {"inputs": [{"name": "bits", "dtype": "float32", "shape": ["batch", 128]}],
            "outputs": [{"name": "tile", "dtype": "float32", "shape": ["batch", 1024]}]}
    image = {"inputs": [{"name": "image", "dtype": "float32", "shape": [1, 1, "height", "width"]}],
             "outputs": [{"name": "signal", "dtype": "float32", "shape": [1, 1, "height", "width"]}]}
    target = "tensorrt-10.8-sm_87"
    models = {
        "wm_message": {"file": "wm_message.plan", "precision": "fp32", "target": target, **bits},
        "wm_message@fp32": {"file": "wm_message.onnx", "precision": "fp32", "target": "onnxruntime", **bits},
        "wm_decoder": {"file": "wm_decoder.plan", "precision": "int8-qdq", "target": target, **image},
    }
    export = {"tensorrt": {"models": {
        "wm_message": {"profiles": {"bits": {"min": [1, 128], "opt": [1, 128], "max": [8, 128]}}},
        "wm_decoder": {"profiles": {"image": {"min": [1, 1, 16, 16], "opt": [1, 1, 512, 512],
                                              "max": [1, 1, 2048, 2048]}}}}}}
    bundle = _small_bundle(tmp_path, keys, models,
                           {"wm_message": plan, "wm_message@fp32": onnx_file, "wm_decoder": image_plan}, export)
    repo = tmp_path / "repo"
    export_triton(bundle, repo, trusted_keys=keys[1])
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == ["wm_decoder", "wm_message", "wm_message_fp32"]
    message = _config(repo, "wm_message")
    assert message.platform == "tensorrt_plan" and message.max_batch_size == 8
    assert list(message.input[0].dims) == [128] and message.HasField("dynamic_batching")
    assert (repo / "wm_message" / "1" / "model.plan").read_bytes() == plan.read_bytes()
    decoder = _config(repo, "wm_decoder")
    assert decoder.platform == "tensorrt_plan" and decoder.max_batch_size == 0
    assert list(decoder.input[0].dims) == [1, 1, -1, -1]
    variant = _config(repo, "wm_message_fp32")
    assert variant.platform == "onnxruntime_onnx" and variant.max_batch_size == 8


def test_triton_names():
    assert triton_name("wm_decoder@int8-qdq") == "wm_decoder_int8_qdq"
    assert triton_name("wm_decoder") == "wm_decoder"


def test_names_that_collide_are_refused(tmp_path, keys):
    model = {"precision": "fp32", "target": "onnxruntime",
             "inputs": [{"name": "bits", "dtype": "float32", "shape": ["batch", 128]}],
             "outputs": [{"name": "tile", "dtype": "float32", "shape": ["batch", 1024]}]}
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(DEFAULT_BUNDLE / "wm_message.onnx", copy)
    bundle = _small_bundle(tmp_path, keys, {"a@fp32": {**model, "file": "a.onnx"}, "a_fp32": {**model, "file": "b.onnx"}},
                           {"a@fp32": DEFAULT_BUNDLE / "wm_message.onnx", "a_fp32": copy})
    with pytest.raises(BundleError, match="both become Triton model 'a_fp32'"):
        export_triton(bundle, tmp_path / "repo", trusted_keys=keys[1])
    assert not (tmp_path / "repo").exists()


# --- bad bundles ------------------------------------------------------------------------------


def test_a_modified_model_file_is_refused(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_BUNDLE, bad)
    data = bytearray((bad / "wm_decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "wm_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="wm_decoder"):
        export_triton(bad, tmp_path / "repo")
    result = runner.invoke(app, ["export", "triton", str(bad), "--out", str(tmp_path / "repo")])
    assert result.exit_code == 3
    assert "sha256" in result.output
    assert not (tmp_path / "repo").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo")]  # no staging left


def test_a_modified_or_unsigned_manifest_is_refused(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(DEFAULT_BUNDLE, bad)
    (bad / "manifest.json").write_bytes((bad / "manifest.json").read_bytes().replace(b'"fp32"', b'"fp16"', 1))
    with pytest.raises(BundleError, match="signature"):
        export_triton(bad, tmp_path / "repo")
    (bad / "manifest.sig").unlink()
    with pytest.raises(BundleError, match="unsigned"):
        export_triton(bad, tmp_path / "repo")


def test_max_batch_must_be_positive(tmp_path):
    with pytest.raises(UsageError):
        export_triton(DEFAULT_BUNDLE, tmp_path / "repo", max_batch=0)
