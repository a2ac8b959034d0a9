"""Artifacts: what is written, and loading refuses anything tampered with or out of place."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_model

import kiln
from compiler.artifact import ArtifactError, load_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    tiny_model("qwen2").save_pretrained(src, safe_serialization=True)
    dump = tmp_path_factory.mktemp("ir")
    path = kiln.compile(str(src), tmp_path_factory.mktemp("a") / "art", dump_ir=dump)
    return path, dump


def test_layout_manifest_and_ir_dumps(artifact):
    path, dump = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert manifest["architecture"]["model_type"] == "qwen2" and manifest["dtype"] == "float32"
    assert not (path / "tokenizer").exists()  # a model without one compiles to token ids only
    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps[0] == "00_trace.ir" and dumps[-1].endswith("fold_constants.ir")
    assert "RMSNorm" in (dump / dumps[-1]).read_text()
    assert load_artifact(path).graph.op_counts() == manifest["op_counts"]["after"]


def tampered(artifact, tmp_path, edit):
    copy = tmp_path / "copy"
    shutil.copytree(artifact[0], copy)
    edit(copy)
    return copy


def test_corrupted_weights_are_refused(artifact, tmp_path):
    def flip(path):
        shard = next((path / "weights").iterdir())
        data = bytearray(shard.read_bytes())
        data[-1] ^= 1
        shard.write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tampered(artifact, tmp_path, flip))


def test_manifest_paths_outside_the_artifact_are_refused(artifact, tmp_path):
    def escape(path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"]["../../etc/passwd"] = "0" * 64
        (path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match="outside"):
        load_artifact(tampered(artifact, tmp_path, escape))


def test_missing_or_foreign_directories_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not a Kiln artifact"):
        load_artifact(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArtifactError, match="not a Kiln artifact"):
        load_artifact(tmp_path / "afile")
    for manifest in ({"format_version": 99}, [1, 2]):
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match="recompile"):
            load_artifact(tmp_path)


@pytest.mark.parametrize("field", ["max_model_len", "block_size", "eos_token_ids"])
def test_manifest_fields_the_runtime_reads_are_checked(artifact, tmp_path, field):
    def garble(path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest[field] = "16"
        (path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match=f"'{field}' is missing or not"):
        load_artifact(tampered(artifact, tmp_path, garble))


@pytest.mark.parametrize(
    "field, value, error",
    [
        ("target", "tpu", "bad target"),
        ("dtype", "int3", "bad dtype"),
        ("max_model_len", 0, "bad max_model_len"),
        ("block_size", -16, "bad block_size"),
        ("block_size", True, "'block_size' is missing or not int"),
        ("eos_token_ids", [2, -1], "bad eos_token_ids"),
        ("eos_token_ids", [10**6], "do not match the graph's logits"),
        ("vocab_size", 7, "do not match the graph's logits"),
    ],
)
def test_manifest_values_are_checked(artifact, tmp_path, field, value, error):
    def garble(path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest[field] = value
        (path / "manifest.json").write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match=error):
        load_artifact(tampered(artifact, tmp_path, garble))


def test_compile_never_replaces_what_is_not_an_artifact(artifact, tmp_path):
    """Only an empty directory, or an artifact holding nothing but what it lists, is replaced:
    a manifest.json of another program's, or files added to an artifact, are kept."""
    source = tmp_path / "src"
    tiny_model("qwen2").save_pretrained(source, safe_serialization=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (tmp_path / "afile").write_text("x")
    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text(json.dumps({"name": "app", "files": {}}))
    (webapp / "index.html").write_text("<html>")
    annotated = tmp_path / "annotated"
    shutil.copytree(artifact[0], annotated)
    (annotated / "notes").mkdir()
    (annotated / "notes" / "run.txt").write_text("precious")
    for out in (mine, tmp_path / "afile", tmp_path, webapp, annotated):
        with pytest.raises(ArtifactError, match="is not a Kiln artifact"):
            kiln.compile(str(source), out)
    assert (mine / "notes.txt").read_text() == "precious" and (tmp_path / "src").is_dir()
    assert (webapp / "index.html").read_text() == "<html>" and (webapp / "manifest.json").is_file()
    assert (annotated / "notes" / "run.txt").read_text() == "precious"
    assert (annotated / "graph.json").is_file()
    (tmp_path / "empty").mkdir()
    kiln.compile(str(source), tmp_path / "empty")
    again = tampered(artifact, tmp_path, lambda path: None)
    kiln.compile(str(source), again, max_model_len=64)  # an artifact is replaced
    assert json.loads((again / "manifest.json").read_text())["max_model_len"] == 64
    with pytest.raises(ValueError, match="max_model_len must be >= 2"):
        kiln.compile(str(source), tmp_path / "new", max_model_len=0)


def test_cuda_artifacts_for_another_arch_are_refused(monkeypatch, tmp_path):
    import torch

    from compiler.artifact import Artifact
    from runtime.cubin import check_kernels

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    built_for_hopper = Artifact(
        tmp_path, {"target": "cuda", "kernels": {"arch": "sm_90"}}, None, {}
    )
    with pytest.raises(ArtifactError, match=r"sm_90 but this GPU is sm_80.*--arch sm_80"):
        check_kernels(built_for_hopper, torch.device("cuda"))
    older = Artifact(
        tmp_path, {"target": "cuda", "kernels": {"arch": "sm_80", "codegen": "0" * 16}}, None, {}
    )
    with pytest.raises(ArtifactError, match="another version of kiln's code generator"):
        check_kernels(older, torch.device("cuda"))
    cpu_only = Artifact(tmp_path, {"target": "cpu"}, None, {})
    with pytest.raises(ArtifactError, match="--target cuda"):
        check_kernels(cpu_only, torch.device("cuda"))


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_cuda_target_fuses_norms_into_projections(target, monkeypatch):
    """The cuda build runs its own passes after the pipeline: every norm that feeds Q/K/V or
    gate/up (and gate/up's SiLU-mul) becomes a NormLinear; the cpu build keeps them apart.
    (The cubins are not compiled here: only the graph is checked.)"""
    import compiler.kernels
    from compiler.compile import CompileOptions, build
    from compiler.frontend.loader import from_transformers

    monkeypatch.setattr(compiler.kernels, "compile_graph_kernels", lambda *a: ({}, {}))
    model = tiny_model("llama")
    layers = model.config.num_hidden_layers
    counts = build(from_transformers(model, None, "tiny", "-"), CompileOptions(target=target)).graph
    counts = counts.op_counts()
    if target == "cpu":
        assert "NormLinear" not in counts and counts["SiluMul"] == layers
    else:  # layer 0's first norm has no residual add: it stays an RMSNorm before its QKV
        assert counts["NormLinear"] == 2 * layers - 1
        assert "SiluMul" not in counts and counts["AddRMSNorm"] == 1  # the final norm


def test_cuda_target_without_nvidia_compilers_fails_before_loading(tmp_path, monkeypatch):
    """No NVRTC/NVVM/nvJitLink, or no numba-cuda: one line naming the install, before the
    model is read."""
    import importlib.util

    import cuda.pathfinder

    from codegen.toolchain import ToolchainError

    def missing(lib):
        raise cuda.pathfinder.DynamicLibNotFoundError(f"no {lib}")

    source = str(tmp_path / "no-such-model")
    monkeypatch.setattr(cuda.pathfinder, "load_nvidia_dynamic_lib", missing)
    with pytest.raises(ToolchainError, match=r"nvvm, nvrtc, nvJitLink .*kiln-llm\[cuda\]"):
        kiln.compile(source, tmp_path / "art", target="cuda")
    monkeypatch.undo()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "numba_cuda" else find_spec(name)
    )
    with pytest.raises(ToolchainError, match=r"needs numba-cuda .*kiln-llm\[cuda\]"):
        kiln.compile(source, tmp_path / "art", target="cuda")
