"""Compression on the session's Ray cluster: the pretrained MiniLM exported to ONNX, quantized, distilled and pruned,
the trained tiny-gpt quantized on a perplexity card; each child measured against its parent on one card, gated,
registered with its lineage, and served through the gateway; and every way it can be refused (before any work, at
the parity check, at the gate)."""

from __future__ import annotations

import numpy as np
import pytest

from mass.compression.convert import run_convert
from mass.compression.distill import training_precision
from mass.compression.job import run_compression
from mass.errors import ConfigError, ParityError
from mass.registry import ModelRegistry

CHILD = "minilm-onnx"  # not a version of minilm-l6: the other tests resolve its latest version


def _vectors(url: str, model: str, api_key: str) -> np.ndarray:
    """Two texts' embeddings by ``model`` through the gateway at ``url`` (over HTTP, as any client)."""
    import httpx

    texts = ["Return the number of items in a container.", "Open a file and return a stream."]
    resp = httpx.post(f"{url}/v1/embeddings", headers={"Authorization": f"Bearer {api_key}"}, timeout=60,
                      json={"model": model, "input": texts})
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]])


@pytest.fixture(scope="module")
def minilm_phases():
    """One ``Phases`` for the conversion and quantization jobs over minilm-l6@production: the parent is measured
    once for both cards, as a pipeline's steps share it."""
    from mass.compression.job import Phases

    return Phases()


@pytest.fixture(scope="module")
def converted(gateway, ray_cluster, minilm_phases):
    """minilm-l6@production converted to ONNX int8 (one throughput round: the figures are not the point here)."""
    from mass.events import open_bus

    bus = open_bus()
    start = bus.last_offset()
    result = run_convert("minilm-l6@production", name=CHILD, threads=2, rounds=1, address=ray_cluster.gcs_address,
                         phases=minilm_phases)
    events = [e for e in bus.replay(start, count=1000) if e.type == "compression.completed"]
    bus.close()
    return result, events


@pytest.fixture(scope="module")
def quantized(gateway, ray_cluster, converted, minilm_phases):
    """minilm-l6@production quantized by PyTorch dynamic int8 and bitsandbytes nf4 in one job (children made in
    parallel), registered under the default names; by method. After ``converted``, whose parent rows it reuses."""
    results = run_compression("minilm-l6@production", ["torch-int8", "bnb-nf4"], threads=2, rounds=1,
                              gate="quality >= 0.95 and (speedup > 1.05 or memory < 0.9)",
                              address=ray_cluster.gcs_address, phases=minilm_phases)
    return {r.method: r for r in results}


def test_the_int8_child_is_measured_against_its_parent_gated_and_registered_with_its_lineage(converted):
    result, events = converted
    assert result.passed and result.registered == f"{CHILD}/1", result.why
    assert [r["label"] for r in result.card["rows"]] == ["parent fp32", "parent bf16", "onnx fp32", "onnx int8"]
    figures = result.card["figures"]
    assert figures["quality"] >= 0.98 and figures["top10"] >= 0.8 and figures["size"] < 0.3, figures
    assert result.card["rows"][2]["quality"] >= 0.9999  # the float export itself is faithful
    info = ModelRegistry().resolve(result.registered)
    parent = ModelRegistry().resolve("minilm-l6@production")
    assert info.format == "onnx" and info.task == "embedding"
    assert info.lineage["parent"] == parent.ref and info.lineage["method"] == "onnx-int8"
    assert '"per_channel": true' in info.lineage["params"] and info.metrics["quality"] == figures["quality"]
    artifacts = {a.path for a in ModelRegistry().client.list_artifacts(result.run_id, "card")}
    assert artifacts == {"card/card.json", "card/card.md", "card/card.png"}
    assert events and events[-1].data.version == "1" and events[-1].data.parent == parent.ref


def test_the_child_serves_through_the_gateway_and_agrees_with_its_parent(converted, gateway, api_key):
    """A Serve app of its own serves the ONNX version (the runtime follows the artifact); its answers through the
    official client match the parent's from the demo app."""
    from ray import serve

    from mass.app import build_app, wait_ready

    args = {"models": [{"name": CHILD, "ref": f"{CHILD}/1", "engine": "embedding", "num_cpus": 0.25}],
            "gateway": {"num_cpus": 0.25, "ledger": False}}
    serve.run(build_app(args), name="mass-onnx", route_prefix="/onnx")
    try:
        wait_ready(f"{gateway}/onnx", timeout=180)
        child = _vectors(f"{gateway}/onnx", CHILD, api_key)
        parent = _vectors(gateway, "minilm", api_key)  # (demo.yaml's name)
        assert child.shape == parent.shape == (2, 384)
        assert (child * parent).sum(1).min() >= 0.97
    finally:
        serve.delete("mass-onnx")


def test_an_export_beyond_tolerance_is_refused_and_nothing_is_registered(converted, ray_cluster):
    before = len(ModelRegistry().get_model(CHILD).versions)
    with pytest.raises(ParityError, match=r"differs from it by up to .* \(tolerance 1e-09\).*nothing was registered"):
        run_convert("minilm-l6@production", name=CHILD, method="onnx", tolerance=1e-9, threads=2, rounds=1,
                    address=ray_cluster.gcs_address)
    assert len(ModelRegistry().get_model(CHILD).versions) == before


@pytest.mark.parametrize("kwargs, needle", [
    ({"ref": "minilm-l6@production", "gate": "quality >= "}, "does not parse"),
    ({"ref": "minilm-l6@production", "method": "pruning"}, "unknown method 'pruning'"),
    ({"ref": "minilm-l6@production", "tolerance": 0}, "tolerance must be in"),
    ({"ref": f"{CHILD}/1"}, r"already a compressed model \(onnx-int8\)"),
    ({"ref": "tiny-gpt/1"}, "is a text-generation model"),
])
def test_what_cannot_work_is_refused_before_any_work(converted, kwargs, needle):
    """Nothing is exported, measured or logged: the refusal comes before Ray is asked for anything."""
    registry = ModelRegistry()
    runs = len(registry.client.search_runs([registry.experiment_id()], max_results=1000))
    with pytest.raises(ConfigError, match=needle):
        run_convert(**kwargs)
    assert len(registry.client.search_runs([registry.experiment_id()], max_results=1000)) == runs


def test_quantization_methods_make_their_children_in_parallel_each_on_its_own_card(quantized, converted, ray_cluster):
    from ray.util.state import list_tasks

    parent = ModelRegistry().resolve("minilm-l6@production")
    for method, model in (("torch-int8", "minilm-l6-torch-int8"), ("bnb-nf4", "minilm-l6-bnb-nf4")):
        result = quantized[method]
        assert result.passed and result.registered == f"{model}/1", (method, result.why)
        assert [r["label"] for r in result.card["rows"]] == ["parent fp32", "parent bf16", result.card["rows"][2]["label"]]
        info = ModelRegistry().resolve(result.registered)
        assert info.lineage["parent"] == parent.ref and info.lineage["method"] == method
        assert info.lineage["source_run"] == result.run_id and info.format == {"torch-int8": "torch-int8",
                                                                               "bnb-nf4": "bnb"}[method]
        assert result.card["rows"][:2] == converted[0].card["rows"][:2]  # the parent measured once for both jobs
    figures = {m: r.card["figures"] for m, r in quantized.items()}
    assert figures["torch-int8"]["quality"] >= 0.98 and figures["torch-int8"]["memory"] < 0.45, figures
    assert 0.95 <= figures["bnb-nf4"]["quality"] < 1 and figures["bnb-nf4"]["memory"] < 0.7, figures
    # the two children were made by overlapping tasks (the measurements then ran one at a time)
    made = list_tasks(address=ray_cluster.dashboard_url, filters=[("func_or_class_name", "=", "_make")], detail=True,
                      raise_on_missing_output=False)
    spans = sorted((t.start_time_ms, t.end_time_ms) for t in made if t.state == "FINISHED")[-2:]
    assert len(spans) == 2 and spans[1][0] < spans[0][1], spans


def test_quantized_children_reload_without_their_source_and_serve_through_the_gateway(quantized, gateway, api_key):
    """Loaded back from the registry (the torch-int8 copy holds no float weights), and served by a Serve app of
    their own whose answers through HTTP agree with the parent's."""
    from ray import serve

    from mass.app import build_app, wait_ready

    model, _, info = ModelRegistry().load("minilm-l6-torch-int8/1")
    assert info.format == "torch-int8"
    assert type(model.encoder.layer[0].intermediate.dense).__module__.startswith("torch.ao.nn.quantized.dynamic")
    args = {"models": [{"name": "int8", "ref": "minilm-l6-torch-int8/1", "engine": "embedding", "num_cpus": 0.25},
                       {"name": "nf4", "ref": "minilm-l6-bnb-nf4/1", "engine": "embedding", "num_cpus": 0.25}],
            "gateway": {"num_cpus": 0.25, "ledger": False}}
    serve.run(build_app(args), name="mass-quantized", route_prefix="/quantized")
    try:
        wait_ready(f"{gateway}/quantized", timeout=180)
        parent = _vectors(gateway, "minilm", api_key)
        for name, floor in (("int8", 0.97), ("nf4", 0.9)):
            child = _vectors(f"{gateway}/quantized", name, api_key)
            assert child.shape == parent.shape and (child * parent).sum(1).min() >= floor, name
    finally:
        serve.delete("mass-quantized")


@pytest.fixture(scope="module")
def causal(gateway, ray_cluster):
    """tiny-gpt/1 (the causal LM the session's training job trained) quantized by bitsandbytes nf4 and int8 in one
    job, gated on perplexity; by method."""
    results = run_compression("tiny-gpt/1", ["bnb-nf4", "bnb-int8"], threads=2, rounds=1, gate="perplexity <= 1.05",
                              address=ray_cluster.gcs_address)
    return {r.method: r for r in results}


def test_a_causal_lm_is_quantized_on_a_perplexity_card_and_serves_through_the_gateway(causal, gateway, api_key):
    """Each child's card measures decoding (tokens/s) and perplexity on the corpus's test split against the parent;
    the nf4 child, registered as a text-generation model, generates through the gateway with the official client."""
    import openai
    from ray import serve

    from mass.app import build_app, wait_ready

    for method, result in causal.items():
        kind = method.removeprefix("bnb-")
        assert result.passed and result.registered == f"tiny-gpt-{method}/1", result.why
        rows = result.card["rows"]
        assert [r["label"] for r in rows] == ["parent fp32", "parent bf16", f"bnb {kind}"]
        assert all(r["unit"] == "tokens" and r["perplexity"] > 1 and r["throughput"] > 0 for r in rows), rows
        assert all(r["prefill_range"][0] <= r["prefill"] <= r["prefill_range"][1] for r in rows), rows
        figures = result.card["figures"]
        assert figures["prefill"] == round(rows[-1]["prefill"] / rows[0]["prefill"], 3), figures
        assert figures["perplexity"] == round(rows[-1]["perplexity"] / rows[0]["perplexity"], 4) <= 1.05
        assert figures["quality"] == round(rows[0]["perplexity"] / rows[-1]["perplexity"], 4)
        assert figures["top10"] is None and figures["memory"] < (0.6 if kind == "nf4" else 0.8), figures
        info = ModelRegistry().resolve(result.registered)
        assert (info.task, info.format, info.lineage["parent"], info.lineage["method"]) == \
            ("text-generation", "bnb", "tiny-gpt/1", method)
    args = {"models": [{"name": "nf4", "ref": "tiny-gpt-bnb-nf4/1", "engine": "llm", "num_cpus": 0.25}],
            "gateway": {"num_cpus": 0.25, "ledger": False}}
    serve.run(build_app(args), name="mass-causal", route_prefix="/causal")
    try:
        wait_ready(f"{gateway}/causal", timeout=180)
        client = openai.OpenAI(base_url=f"{gateway}/causal/v1", api_key=api_key)
        out = client.completions.create(model="nf4", prompt="Return the", max_tokens=8, temperature=0)
        assert out.usage.completion_tokens > 0 and isinstance(out.choices[0].text, str)
    finally:
        serve.delete("mass-causal")


def test_a_causal_lm_is_refused_by_the_methods_that_serve_encoders_only(gateway):
    with pytest.raises(ConfigError, match=r"tiny-gpt/1 is a text-generation model, which torch-int8, onnx-int8 "
                                          r"cannot compress .*methods for it: bnb-int8, bnb-nf4"):
        run_compression("tiny-gpt/1", ["torch-int8", "onnx-int8"])


@pytest.fixture(scope="module")
def causal_students(gateway, ray_cluster):
    """tiny-gpt/1 (2 layers) distilled into a 1-layer student by logit distillation, and pruned of a quarter of its
    FFN channels with a recovery epoch: short Ray Train runs (2 DDP workers, 256 blocks of 64 tokens). The two jobs
    share one ``Phases``, as a pipeline's steps do: the parent is measured once, for both cards."""
    from mass.compression.distill import run_distillation
    from mass.compression.job import Phases
    from mass.compression.prune import run_pruning

    common = {"max_texts": 256, "max_length": 64, "threads": 2, "rounds": 1, "address": ray_cluster.gcs_address,
              "phases": Phases()}
    student = run_distillation("tiny-gpt/1", layers=["1"], epochs=2, gate="perplexity < 10", **common)
    pruned = run_pruning("tiny-gpt/1", ffn=0.25, gate="perplexity <= 1.5", **common)
    return student[0], pruned[0]


def test_a_causal_lm_is_distilled_by_its_logits_and_pruned_each_on_a_perplexity_card(causal_students):
    """The student learns from its teacher (its perplexity ends far below the untrained 1-layer subset's, and its
    loss falls epoch to epoch); the pruned child's FFN is really narrower; both register as causal LMs."""
    import json
    import math

    import torch

    from mass.compression.card import PPL_BLOCK, PPL_BLOCKS, causal_texts, mean_loss
    from mass.compression.distill import student_state
    from mass.compression.prune import _build
    from mass.training.prep import pack

    registry = ModelRegistry()
    student, pruned = causal_students
    for result, label in ((student, "student 1L fp32"), (pruned, "pruned fp32")):
        assert result.passed, result.why
        assert [r["label"] for r in result.card["rows"]] == ["parent fp32", "parent bf16", label]
        assert result.card["rows"][-1]["unit"] == "tokens" and result.card["figures"]["perplexity"] is not None
    assert student.card["rows"][:2] == pruned.card["rows"][:2]  # the parent's rows, measured once
    info = registry.resolve(student.registered)
    assert (info.task, info.lineage["method"]) == ("text-generation", "distill")
    params = json.loads(info.lineage["params"])
    assert params["loss"] == "kl" and params["temperature"] == 2.0 and params["layers"] == [1]
    losses = [m.value for m in registry.client.get_metric_history(student.run_id, "distill_loss")]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    teacher, tokenizer, _ = registry.load("tiny-gpt/1")
    spec = teacher.config.to_dict()
    untrained = _build({**spec, "n_layer": 1}, student_state(teacher.state_dict(), [1]))
    blocks = pack(causal_texts(), tokenizer, PPL_BLOCK)[:PPL_BLOCKS]  # what the card measured on
    assert student.card["rows"][-1]["perplexity"] < 0.5 * math.exp(mean_loss(untrained, blocks))
    model, _, _ = registry.load(pruned.registered)
    assert model.config.n_inner == 384 and model.transformer.h[0].mlp.c_fc.weight.shape == (128, 384)
    assert json.loads(registry.resolve(pruned.registered).lineage["params"])["removed"] == {
        "ffn_channels": "128 of 512 per layer"}
    assert isinstance(model, torch.nn.Module) and type(model).__name__ == "GPT2LMHeadModel"


def test_a_task_killed_mid_way_leaves_no_version_and_says_which_method(gateway, ray_cluster):
    """The worker making the only child is killed (SIGKILL, as the OOM killer would): the job fails naming the
    method and the cause, before measuring anything; no model, version or work directory is left behind."""
    import glob
    import os
    import signal
    import tempfile
    import threading
    import time

    import psutil

    from mass.errors import JobFailed, ModelNotFound

    pattern = os.path.join(tempfile.gettempdir(), "mass-compress-*")  # where the job's tasks make their work dirs
    work_dirs = set(glob.glob(pattern))
    outcome: dict = {}

    def run() -> None:
        try:
            run_compression("minilm-l6@production", ["torch-int8"], name="minilm-killed", threads=2, rounds=1,
                            address=ray_cluster.gcs_address)
        except Exception as exc:  # the outcome is what the test checks
            outcome["error"] = exc

    job = threading.Thread(target=run)
    job.start()
    killed, deadline = None, time.monotonic() + 180
    while killed is None and time.monotonic() < deadline and job.is_alive():
        for proc in psutil.process_iter(["cmdline"]):
            if proc.info["cmdline"] and proc.info["cmdline"][0].startswith("ray::_make"):
                killed = proc.pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    job.join(timeout=300)
    assert killed is not None and not job.is_alive()
    error = outcome.get("error")
    assert isinstance(error, JobFailed), error
    assert "no child could be made: torch-int8:" in error.message and "nothing was measured or registered" in \
        error.message
    with pytest.raises(ModelNotFound):
        ModelRegistry().resolve("minilm-killed")
    assert set(glob.glob(pattern)) <= work_dirs  # the work directory went with the job


@pytest.fixture(scope="module")
def distilled(gateway, ray_cluster, tmp_path_factory):
    """minilm-l6@production distilled into a 2-layer student by a short Ray Train run (2 DDP workers, 256 texts of
    the user's file ``--data``, 2 epochs), submitted as users do: ``ray job submit -- python jobs/distill.py``. That
    is enough to lift the student well above where it starts (cosine 0.30 to its teacher before any training)."""
    import json
    import subprocess

    from mass.compression.distill import train_texts
    from mass.compression.job import CompressionResult
    from tests.integration.support import ROOT, VENV_BIN, last_json

    data = tmp_path_factory.mktemp("distill-data") / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in train_texts(256)))
    cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", ".",
           "--", "python", "jobs/distill.py", "minilm-l6@production", "--layers", "2", "--data", str(data),
           "--epochs", "2", "--max-length", "64", "--threads", "2", "--rounds", "1",
           "--gate", "quality >= 0.5 and speedup > 1.2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return CompressionResult(**last_json(proc.stdout))


def test_a_distilled_student_learns_from_its_teacher_and_is_registered_with_its_lineage(distilled):
    import json

    from mass.compression.job import check_parent

    result, registry = distilled, ModelRegistry()
    assert result.passed and result.registered == "minilm-l6-distill-2l/1", result.why
    assert [r["label"] for r in result.card["rows"]] == ["parent fp32", "parent bf16", "student 2L fp32"]
    figures = result.card["figures"]
    assert figures["quality"] >= 0.5 and figures["speedup"] > 1.2 and figures["size"] < 0.75, figures
    info = registry.resolve(result.registered)
    assert info.format == "transformers" and info.task == "embedding" and info.lineage["method"] == "distill"
    params = json.loads(info.lineage["params"])
    assert params["layers"] == [2, 5] and params["workers"] == 2 and params["loss"] == "cosine"
    assert params["layer_loss"] == 1.0 and params["attention_loss"] == 1.0  # an encoder's defaults
    assert params["precision"] == training_precision("auto")  # bf16 on a CPU with native bfloat16: that path ran
    assert params["data"].endswith("texts.jsonl")  # trained on the user's file, and its lineage says so
    losses = [m.value for m in registry.client.get_metric_history(result.run_id, "distill_loss")]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    model, _, _ = registry.load(result.registered)
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
    check_parent(registry, result.registered)  # a student is a float encoder: it can be quantized in turn


@pytest.fixture(scope="module")
def foreign_encoder(gateway):
    """A small encoder with a tokenizer of its own (BPE trained on the corpus), registered: no student of MiniLM."""
    from transformers import BertConfig, BertModel

    from mass.compression.distill import train_texts
    from mass.data.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(train_texts(400), vocab_size=400, model_max_length=128)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=384, num_hidden_layers=1,
                                 num_attention_heads=12, intermediate_size=64, max_position_embeddings=128))
    return ModelRegistry().register((model.eval(), tokenizer), "foreign-encoder", "embedding").ref


@pytest.mark.parametrize("kwargs, needle", [
    ({"layers": ["6"]}, r"a student of 6 layers is not smaller than its teacher \(6 layers\)"),
    ({"layers": ["3", "0,2,4"]}, "two students of 3 layers"),
    ({"student": "foreign-encoder/1"}, r"tokenizer \(\d+ tokens\) differs from the teacher's \(30522 tokens\)"),
    ({"student": "tiny-gpt/1"}, "is a text-generation model"),
    ({"student": "foreign-encoder/1", "layers": ["2"]}, "not both"),
    ({"loss": "hinge"}, "unknown loss 'hinge'"),
    ({"loss": "kl"}, r"loss 'kl' is for causal LMs; minilm-l6/1 is an encoder: use cosine or mse"),
    ({"max_texts": 10}, "10 training texts cannot fill one batch of 32 on each of 2 workers"),
    ({"layer_loss": -1.0}, r"layer_loss \(a weight\) must be 0 or more, got -1.0"),
    ({"student": "foreign-encoder/1", "attention_loss": 1.0},
     "attention_loss needs a student made of the teacher's layers"),
    ({"gate": "speedup >"}, "does not parse"),
])
def test_a_student_that_cannot_be_is_refused_before_any_work(foreign_encoder, kwargs, needle):
    from mass.compression.distill import run_distillation

    registry = ModelRegistry()
    runs = len(registry.client.search_runs([registry.experiment_id()], max_results=1000))
    with pytest.raises(ConfigError, match=needle):
        run_distillation("minilm-l6@production", **kwargs)
    assert len(registry.client.search_runs([registry.experiment_id()], max_results=1000)) == runs


@pytest.mark.parametrize("job", ["distill", "prune"])
def test_a_data_file_that_cannot_be_read_is_refused_before_any_work(gateway, tmp_path, job):
    from mass.compression.distill import run_distillation
    from mass.compression.prune import run_pruning
    from mass.errors import DataError

    registry = ModelRegistry()
    runs = len(registry.client.search_runs([registry.experiment_id()], max_results=1000))
    with pytest.raises(DataError, match=r"data file not found: .*chats\.jsonl"):
        run = run_distillation if job == "distill" else run_pruning
        run("minilm-l6@production", data=str(tmp_path / "chats.jsonl"))
    assert len(registry.client.search_runs([registry.experiment_id()], max_results=1000)) == runs


@pytest.mark.parametrize("kwargs, needle", [
    ({"sparsity": 0}, r"sparsity must be in \(0, 1\), got 0"),
    ({"sparsity": 1.5}, r"sparsity must be in \(0, 1\)"),
    ({"sparsity": 0.5, "ffn": 0.25}, "not both"),
    ({"ffn": 1.0}, r"ffn \(the fraction of FFN channels removed\) must be in \(0, 1\)"),
    ({"drop_layers": 6}, r"drop_layers must be in 0..5 \(the parent has 6 layers\)"),
    ({"recover_epochs": -1}, "recover_epochs must be 0 or more"),
    ({"ref": "tiny-gpt/1", "drop_layers": 2}, r"drop_layers must be in 0..1 \(the parent has 2 layers\)"),
])
def test_what_cannot_be_pruned_is_refused_before_any_work(gateway, kwargs, needle):
    from mass.compression.prune import run_pruning

    registry = ModelRegistry()
    runs = len(registry.client.search_runs([registry.experiment_id()], max_results=1000))
    with pytest.raises(ConfigError, match=needle):
        run_pruning(**{"ref": "minilm-l6@production", **kwargs})
    assert len(registry.client.search_runs([registry.experiment_id()], max_results=1000)) == runs


PIPELINE = """
parent: minilm-l6@production
rounds: 1
threads: 2
steps:
  - id: pruned
    kind: prune
    options: {ffn: 0.5, recover_epochs: 1, max_texts: 256, max_length: 64, name: pipe-pruned,
              gate: "quality >= 0.8 and memory < 0.9"}
  - id: pruned-int8
    kind: quantize
    after: pruned
    options: {methods: [torch-int8], name: pipe-pruned-int8, gate: "quality >= 0.9"}
  - id: int8
    kind: quantize
    options: {methods: [torch-int8], name: pipe-int8, gate: "quality >= 0.9"}
  - id: sparse
    kind: prune
    options: {sparsity: 0.5, name: pipe-sparse, gate: "memory < 0.9 or size < 0.9"}
  - id: after-sparse
    kind: quantize
    after: sparse
    options: {methods: [torch-int8]}
"""


@pytest.fixture(scope="module")
def pipeline(gateway, ray_cluster, tmp_path_factory):
    """One pipeline over minilm-l6@production (the compression tests' one run of structured and magnitude pruning):
    half of every layer's FFN channels removed by importance and one recovery epoch (Ray Train, 2 workers, 256
    texts), then its int8 child; beside it the parent's int8 child, and a 50 % magnitude prune that its gate refuses
    (so the step after it never runs). By step id, with the phases' spans."""
    from mass.compression.pipeline import PipelineConfig, run_pipeline

    path = tmp_path_factory.mktemp("pipeline") / "pipeline.yaml"
    path.write_text(PIPELINE)
    steps, spans = run_pipeline(PipelineConfig.load(path), address=ray_cluster.gcs_address)
    return {s.id: s for s in steps}, spans


def test_a_pipeline_chains_steps_runs_independent_ones_side_by_side_and_never_measures_while_making(pipeline):
    """prune -> quantize the pruned child, beside quantize the parent and a magnitude prune the gate refuses: the
    pruned child's int8 child descends from it; the parent's int8 step worked while the pruned child recovered;
    no card was measured while anything else was made or measured; the step after the refused one did not run."""
    by_id, spans = pipeline
    assert by_id["pruned"].registered == ["pipe-pruned/1"], by_id["pruned"]
    assert by_id["pruned-int8"].parent == "pipe-pruned/1" and by_id["pruned-int8"].registered == \
        ["pipe-pruned-int8/1"], by_id["pruned-int8"]
    assert ModelRegistry().resolve("pipe-pruned-int8/1").lineage["parent"] == "pipe-pruned/1"
    assert by_id["int8"].registered == ["pipe-int8/1"] and by_id["int8"].parent == "minilm-l6@production"
    assert by_id["sparse"].results and not by_id["sparse"].registered
    assert by_id["after-sparse"].error == "not run: step 'sparse' gave it no parent (it registered no child)"
    # side by side: the parent's int8 step was at work before the pruned child had recovered (in order, it would
    # have waited for the pruned child and its int8 child)
    recovered = max(b for label, phase, _, b in spans if label == "pruned" and phase == "make")
    assert min(a for label, _, a, _ in spans if label == "int8") < recovered, spans
    # the parent was measured once for the three steps over it: their cards share its rows
    from mass.compression.job import CompressionResult

    firsts = [CompressionResult(**by_id[i].results[0]).card["rows"][:2] for i in ("pruned", "int8", "sparse")]
    assert firsts[0] == firsts[1] == firsts[2] and [r["label"] for r in firsts[0]] == ["parent fp32", "parent bf16"]
    # and every card was measured alone
    measures = [(a, b) for _, phase, a, b in spans if phase == "measure"]
    assert len(measures) == 4
    for a, b in measures:
        others = [(c, d) for _, _, c, d in spans if (c, d) != (a, b)]
        assert not any(c < b and d > a for c, d in others), (a, b, spans)


def test_structured_pruning_really_shrinks_the_model_and_recovers_and_registers_it(pipeline):
    import json

    from mass.compression.job import CompressionResult

    result, registry = CompressionResult(**pipeline[0]["pruned"].results[0]), ModelRegistry()
    assert result.passed and result.registered == "pipe-pruned/1", result.why
    assert [r["label"] for r in result.card["rows"]] == ["parent fp32", "parent bf16", "pruned fp32"]
    figures = result.card["figures"]
    assert figures["quality"] >= 0.8 and 0.8 < figures["memory"] < 0.9 and figures["size"] < 0.9, figures
    info = registry.resolve(result.registered)
    params = json.loads(info.lineage["params"])
    assert info.lineage["method"] == "prune" and params["removed"] == {"ffn_channels": "768 of 1536 per layer"}
    assert params["recover_epochs"] == 1 and len(registry.client.get_metric_history(result.run_id,
                                                                                    "distill_loss")) == 1
    model, _, _ = registry.load(result.registered)
    assert model.config.intermediate_size == 768 and model.encoder.layer[0].intermediate.dense.out_features == 768


def test_magnitude_pruning_is_reported_as_it_is_and_a_gate_asking_for_savings_refuses_it(pipeline):
    """A child that fails its gate is reported with its card and not registered: magnitude pruning leaves dense
    tensors as large as they were."""
    from mass.compression.job import CompressionResult
    from mass.errors import ModelNotFound

    result = CompressionResult(**pipeline[0]["sparse"].results[0])
    assert not result.passed and result.registered is None and "memory=1.0" in result.why
    figures = result.card["figures"]
    assert figures["memory"] == 1.0 and 0.99 <= figures["size"] <= 1.01, figures  # zeros in dense tensors
    assert 0.1 < result.card["params"]["zeros"] < 0.5 and result.card["params"]["sparsity"] == 0.5
    assert result.card["rows"][-1]["label"] == "magnitude 50% fp32"
    with pytest.raises(ModelNotFound):
        ModelRegistry().resolve("pipe-sparse")
