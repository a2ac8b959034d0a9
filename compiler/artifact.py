"""The compiled artifact: a self-describing directory, written atomically, loaded safely.

Layout: manifest.json (versions, source and its hash, architecture, dtype, target, limits,
sha256 of every other file), graph.json, weights/*.safetensors (weights/rank{r}/*.safetensors
when tensor_parallel_size > 1), kernels/ (cuda target), tokenizer/ (when the source has one),
generation_config.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ir.graph import Graph
from ir.reference import TORCH_DTYPES
from ir.serialize import graph_from_json, graph_to_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# what the runtime reads from manifest.json (the one file without a checksum), by type
MANIFEST_FIELDS = {
    "target": str,
    "dtype": str,
    "max_model_len": int,
    "block_size": int,
    "vocab_size": int,
    "eos_token_ids": list,
    "files": dict,
}
# and what their values may be (the graph, checksummed, must agree on the vocabulary)
MANIFEST_VALUES = {
    "target": lambda v: v in ("cpu", "cuda"),
    "dtype": lambda v: v in TORCH_DTYPES,
    "max_model_len": lambda v: v >= 2,
    "block_size": lambda v: v >= 1,
    "vocab_size": lambda v: v >= 1,
    "eos_token_ids": lambda v: all(type(i) is int and i >= 0 for i in v),
}
SHARD_BYTES = 4 << 30


class ArtifactError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Artifact:
    path: Path
    manifest: dict
    graph: Graph
    params: dict[str, torch.Tensor]
    generation_config: dict = field(default_factory=dict)

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer").is_dir()

    def load_tokenizer(self):
        if not self.has_tokenizer:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path / "tokenizer", trust_remote_code=False)


def write_artifact(
    out: Path,
    manifest: dict,
    graph: Graph,
    params: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
    tokenizer=None,
    generation_config: dict | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write into a temporary sibling directory, then move it into place.

    `params` is one dict, or a list of one dict per tensor-parallel rank.
    """
    out = Path(out).resolve()
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        (tmp / "graph.json").write_text(graph_to_json(graph))
        if isinstance(params, dict):
            _write_weights(tmp / "weights", params)
        else:
            (tmp / "weights").mkdir()
            for rank, rank_params in enumerate(params):
                _write_weights(tmp / "weights" / f"rank{rank}", rank_params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config or {}, indent=1))
        for rel, data in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        files = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        doc = {"format_version": FORMAT_VERSION, **manifest, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def check_output(out: Path) -> None:
    """An artifact may be written to `out`: nothing is there (or an empty directory), or an
    artifact it replaces, holding nothing but what it wrote."""
    empty = out.is_dir() and not any(out.iterdir())
    if out.exists() and not empty and not (out.is_dir() and _only_artifact(out)):
        raise ArtifactError(
            f"{out} exists and is not a Kiln artifact (or holds files it did not write): "
            "name a new directory, or an artifact to replace"
        )


def _only_artifact(path: Path) -> bool:
    """`path` holds a Kiln manifest.json and nothing else but the files it lists (and the
    directories holding them): what write_artifact wrote, and may delete."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        return False
    if not isinstance(manifest.get("files"), dict):
        return False
    files = {"manifest.json", *manifest["files"]}
    directories = {str(parent) for rel in files for parent in Path(rel).parents}
    return all(
        str(p.relative_to(path)) in (files if p.is_file() else directories) for p in path.rglob("*")
    )


def _write_weights(directory: Path, params: dict[str, torch.Tensor]) -> None:
    directory.mkdir()
    shard: dict[str, torch.Tensor] = {}
    size, index = 0, 0
    for name in sorted(params):
        t = params[name].contiguous()
        if shard and size + t.nbytes > SHARD_BYTES:
            save_file(shard, directory / f"shard-{index:05d}.safetensors")
            shard, size, index = {}, 0, index + 1
        shard[name] = t
        size += t.nbytes
    save_file(shard, directory / f"shard-{index:05d}.safetensors")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict:
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ArtifactError(f"{path}: not a Kiln artifact (no manifest.json)") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}/manifest.json: invalid JSON: {e}") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format {version!r} is not {FORMAT_VERSION}; "
            "recompile with this version of kiln"
        )
    for name, kind in MANIFEST_FIELDS.items():
        value = manifest.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ArtifactError(
                f"{path}/manifest.json: {name!r} is missing or not {kind.__name__}; recompile"
            )
        if not MANIFEST_VALUES.get(name, lambda v: True)(value):
            raise ArtifactError(f"{path}/manifest.json: bad {name} {value!r}; recompile")
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file exists inside the artifact and matches its sha256."""
    root = path.resolve()
    files = manifest.get("files")
    if not isinstance(files, dict) or "graph.json" not in files:
        raise ArtifactError(f"{path}: manifest lists no files")
    for rel, expected in files.items():
        p = (root / rel).resolve()
        if root not in p.parents:
            raise ArtifactError(f"{path}: manifest entry {rel!r} points outside the artifact")
        if not p.is_file():
            raise ArtifactError(f"{path}: missing file {rel}")
        if sha256_file(p) != expected:
            raise ArtifactError(f"{path}: {rel} is corrupted (sha256 mismatch)")


def load_artifact(path: Path, verify_hashes: bool = True, rank: int = 0) -> Artifact:
    """The artifact with the weights of tensor-parallel `rank` (0 when it is not sharded)."""
    path = Path(path)
    start = time.perf_counter()
    manifest = read_manifest(path)
    weights = _weights_dir(path, manifest, rank)
    if verify_hashes:
        verify_files(path, manifest)
        log.info("%s: sha256 of every file checked in %.1f s", path, time.perf_counter() - start)
    try:
        graph = graph_from_json((path / "graph.json").read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}/graph.json: invalid graph: {e}") from e
    params: dict[str, torch.Tensor] = {}
    for shard in sorted(manifest["files"]):
        if shard.rpartition("/")[0] == weights and shard.endswith(".safetensors"):
            params.update(load_file(path / shard))
    _check_params(graph, params)
    vocab, eos = manifest["vocab_size"], manifest["eos_token_ids"]
    if graph.type_of(graph.outputs[0]).shape[-1] != vocab or any(i >= vocab for i in eos):
        raise ArtifactError(
            f"{path}/manifest.json: vocab_size {vocab} or eos_token_ids {eos} do not match "
            "the graph's logits; recompile"
        )
    log.info("%s: graph and weights loaded in %.1f s", path, time.perf_counter() - start)
    gen = json.loads((path / "generation_config.json").read_text())
    return Artifact(path, manifest, graph, params, gen if isinstance(gen, dict) else {})


def _weights_dir(path: Path, manifest: dict, rank: int) -> str:
    size = manifest.get("tensor_parallel_size", 1)
    if not isinstance(size, int) or size < 1:
        raise ArtifactError(f"{path}: bad tensor_parallel_size {size!r} in the manifest")
    if not 0 <= rank < size:
        raise ArtifactError(f"{path}: no rank {rank} (tensor_parallel_size is {size})")
    return "weights" if size == 1 else f"weights/rank{rank}"


def _check_params(graph: Graph, params: dict[str, torch.Tensor]) -> None:
    for p in graph.params:
        t = params.get(p.value.name)
        if t is None:
            raise ArtifactError(f"weight {p.value.name} is missing")
        expect = (tuple(p.value.type.shape), TORCH_DTYPES[p.value.type.dtype])
        if (tuple(t.shape), t.dtype) != expect:
            raise ArtifactError(f"weight {p.value.name}: {tuple(t.shape)} {t.dtype}, want {expect}")
