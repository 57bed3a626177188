"""``runtime.bench`` and ``medsec-edge bench``: every model and stage of a bundle timed, the budget
gate with its margin, the JSON the CI step reads.

Small and fast: one inference thread, 512x512 only, two timed rounds after one warm-up. The gate's
bundles are the default bundle's models re-signed with a fresh key (trusted through
``MEDSEC_EDGE_TRUSTED_KEYS``) and budgets no machine meets (0.001 ms) or every machine meets
(10 minutes), so the exit codes do not depend on how loaded the machine is.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medsec_edge.runtime.bench import budget_verdict, noise_margin, run_bench
from medsec_edge.runtime.bundle import ModelEntry, generate_signing_key, open_bundle, write_bundle
from medsec_edge.runtime.cli import app
from tests.tamper_fixtures import REPO, restore_logging  # noqa: F401 - fixture

DEFAULT = REPO / "bundles" / "default"
FAST = ["--sizes", "512", "--repeats", "2", "--threads", "1"]
TOP_KEYS = {"bundle", "bundle_path", "version_id", "key_id", "machine", "threads", "repeats", "warmup", "sizes",
            "margin", "reference", "models", "stages", "misses", "errors", "budgets_not_measured", "ok", "wall_s"}
LATENCY_KEYS = {"p50", "p99", "min", "max", "n"}
TRT_TARGET = "tensorrt-10.8-sm_87"  # a Jetson Orin engine: never runs on a CPU machine


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The default models re-signed with budgets no machine meets and budgets every machine
    meets; the second also has an onnxruntime '@int8-qdq' variant and a TensorRT variant."""
    root = tmp_path_factory.mktemp("bench")
    generate_signing_key(root / "signing.key", root / "trusted" / "signing.pub")
    default = open_bundle(DEFAULT)
    files = {name: DEFAULT / entry.file for name, entry in default.manifest.models.items()}
    stages = [f"{stage}_{size}" for stage in ("check", "embed", "extract") for size in (512, 2048)]
    made = {"trusted": root / "trusted"}
    tiny = replace(default.manifest, name="bench-tiny", budgets_ms={k: 0.001 for k in stages})
    made["tiny"] = write_bundle(root / "tiny", tiny, files, root / "signing.key")
    message = default.manifest.models["wm_message"]
    variants = {
        "wm_message@int8-qdq": replace(message, name="wm_message@int8-qdq", precision="int8-qdq",
                                       file="wm_message_int8.onnx"),
        "wm_decoder@fp16": ModelEntry(name="wm_decoder@fp16", file="wm_decoder_fp16.engine", sha256="0" * 64,
                                      precision="fp16", target=TRT_TARGET,
                                      inputs=default.manifest.models["wm_decoder"].inputs,
                                      outputs=default.manifest.models["wm_decoder"].outputs),
    }
    engine = root / "wm_decoder_fp16.engine"
    engine.write_bytes(b"not an engine: never loaded, the target cannot run here")
    huge = replace(default.manifest, name="bench-huge", budgets_ms={k: 600_000 for k in stages},
                   models={**default.manifest.models, **variants})
    made["huge"] = write_bundle(root / "huge", huge,
                                {**files, "wm_message@int8-qdq": files["wm_message"], "wm_decoder@fp16": engine},
                                root / "signing.key")
    return made


@pytest.fixture
def cli(monkeypatch, bundles, restore_logging):  # noqa: F811
    monkeypatch.setenv("MEDSEC_EDGE_TRUSTED_KEYS", str(bundles["trusted"]))
    monkeypatch.delenv("MEDSEC_EDGE_BUNDLE", raising=False)

    def invoke(*args):
        return CliRunner().invoke(app, ["bench", *[str(a) for a in args]], env={"COLUMNS": "80"})

    return invoke


def test_the_default_bundle_has_every_model_and_stage_timed():
    report = run_bench(DEFAULT, repeats=2, warmup=1, sizes=[512], threads=1)
    manifest = open_bundle(DEFAULT).manifest
    assert sorted(m.model for m in report.models) == sorted(manifest.models)
    for m in report.models:
        assert m.status == "ok" and m.size == 512 and m.backend == "onnxruntime", m
        assert m.providers == ("CPUExecutionProvider",) and m.latency.n == 2
        assert 0 < m.latency.min <= m.latency.p50 <= m.latency.p99 <= m.latency.max
    shapes = {m.model: m.input_shape for m in report.models}
    # what the runtime feeds them at 512: the watermark networks a 256 working image, the
    # detector the frame itself, the bits models one code word
    assert shapes["wm_decoder"] == shapes["wm_strength"] == (1, 1, 256, 256)
    assert shapes["tamper_detector"] == (1, 1, 512, 512)
    assert shapes["wm_message"] == (1, 128)
    assert [(s.stage, s.size) for s in report.stages] == [("check", 512), ("embed", 512), ("extract", 512)]
    for s in report.stages:
        assert s.latency.p50 > 0 and s.budget_ms == manifest.budgets_ms[f"{s.stage}_512"]
        assert s.limit_ms == pytest.approx(s.budget_ms * (1 + report.margin))
        assert s.status in ("met", "within margin", "missed")
        assert s.vs_reference == pytest.approx(s.latency.p50 / report.reference.p50)
    assert {s.stage: s.result for s in report.stages}["extract"] == "payload read back"
    assert report.reference.p50 > 0 and report.reference.n == 2  # one reference per round
    assert report.budgets_not_measured == ("check_2048", "embed_2048", "extract_2048")
    assert report.threads == 1 and report.wall_s > 0
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == TOP_KEYS


def test_the_gate_counts_only_a_miss_beyond_the_margin():
    assert budget_verdict(20.0, 20, 0.25) == "met"
    assert budget_verdict(25.0, 20, 0.25) == "within margin"
    assert budget_verdict(25.01, 20, 0.25) == "missed"
    assert budget_verdict(20.01, 20, 0.0) == "missed"
    assert budget_verdict(1e9, None, 0.25) == "no budget"


def _run(reference: float, **p50s: float) -> dict:
    return {"reference": {"latency_ms": {"p50": reference}},
            "stages": [{"budget_key": key, "latency_ms": {"p50": p50}} for key, p50 in p50s.items()]}


def test_the_noise_margin_is_twice_the_worst_run_to_run_spread_rounded_up():
    runs = [_run(5.0, check_512=100.0, embed_512=10.0), _run(5.5, check_512=113.0, embed_512=10.5),
            _run(5.0, check_512=104.0, embed_512=10.2)]
    margin, spreads = noise_margin(runs)
    assert spreads["check_512"]["p50_spread"] == pytest.approx(0.13)
    assert spreads["check_512"]["vs_reference_spread"] == pytest.approx((104 / 5) / (100 / 5) - 1, abs=1e-4)
    assert spreads["embed_512"]["runs"] == 3
    assert margin == pytest.approx(0.3)  # 2 x 0.13 = 0.26, rounded up to 0.30
    assert noise_margin(runs[:2], factor=1.0, step=0.01)[0] == pytest.approx(0.13)
    with pytest.raises(Exception, match="at least two runs"):
        noise_margin(runs[:1])


def test_budgets_no_machine_meets_fail_the_gate_with_exit_1(cli, bundles):
    res = cli("--bundle", bundles["tiny"], *FAST, "--margin", "0.5")
    assert res.exit_code == 1, res.output
    misses = [line for line in res.stderr.splitlines() if line.startswith("error: budget missed")]
    assert len(misses) == 3, res.stderr
    check = next(line for line in misses if "check_512" in line)
    # the stage, its p50, the budget and the margin are named
    assert "p50 " in check and "budget 0.001 ms" in check and "50% margin" in check
    assert "MISSED check_512" in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) <= 80


def test_budgets_every_machine_meets_pass_and_json_has_the_documented_keys(cli, bundles):
    res = cli("--bundle", bundles["huge"], *FAST, "--json")
    assert res.exit_code == 0, res.output
    (line,) = res.stdout.strip().splitlines()  # one object
    data = json.loads(line)
    assert set(data) == TOP_KEYS and data["ok"] is True and data["misses"] == [] and data["errors"] == []
    assert data["bundle"] == "bench-huge" and data["sizes"] == [512] and data["repeats"] == 2
    assert set(data["reference"]) == {"name", "description", "latency_ms"}
    assert set(data["reference"]["latency_ms"]) == LATENCY_KEYS
    stages = {(s["stage"], s["size"]): s for s in data["stages"]}
    assert set(stages) == {("check", 512), ("embed", 512), ("extract", 512)}
    for s in stages.values():
        assert s["status"] == "met" and s["budget_ms"] == 600_000 and s["latency_ms"]["p50"] > 0
        assert set(s) == {"stage", "size", "budget_key", "budget_ms", "limit_ms", "status", "vs_reference",
                          "result", "latency_ms"}
    models = {m["model"]: m for m in data["models"]}
    # a variant runs with its base model's inputs; one that cannot run here is listed, not run
    variant = models["wm_message@int8-qdq"]
    assert variant["status"] == "ok" and variant["variant"] == "int8-qdq" and variant["precision"] == "int8-qdq"
    assert variant["input_shape"] == models["wm_message"]["input_shape"] == [1, 128]
    trt = models["wm_decoder@fp16"]
    assert trt["status"] == "skipped" and trt["backend"] == "tensorrt" and trt["latency_ms"] is None
    assert TRT_TARGET in trt["reason"]
    assert all(m["status"] == "ok" and math.isfinite(m["latency_ms"]["p50"])
               for name, m in models.items() if name != "wm_decoder@fp16")


def test_usage_and_bundle_errors_have_their_exit_codes(cli, tmp_path):
    assert cli("--sizes", "512,big").exit_code == 2
    assert cli("--sizes", "32", "--repeats", "1").exit_code == 2
    res = cli("--bundle", tmp_path / "nowhere", "--sizes", "512")
    assert res.exit_code == 3 and "does not exist" in res.stderr
