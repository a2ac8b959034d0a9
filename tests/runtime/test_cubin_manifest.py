"""A cuda artifact's kernels section is checked before anything is loaded from it: a malformed
section, or a kernel whose cubin is not among the manifest's checksummed files, is an
ArtifactError saying what is wrong. No GPU needed."""

from __future__ import annotations

import pytest
import torch

from codegen.plan import codegen_digest
from compiler.artifact import Artifact, ArtifactError
from runtime.cubin import check_kernels, cubin_paths, load_kernel

NAME = "rms_norm_0123456789ab"
MISSING = object()  # a key the edit removes
META = {"symbol": "entry", "toolkit": "13.5", "ptx_isa": "9.5", "nvjitlink": "13.5.0"}


def cuda_artifact(tmp_path, names=(NAME,), files=None, **section) -> Artifact:
    """An artifact built for sm_80 by this code generator, with these kernels (each listed in
    `files`, unless given)."""
    section = {
        "arch": "sm_80",
        "codegen": codegen_digest(),
        "kernels": {name: dict(META) for name in names},
        "nodes": {"0": list(names)},
        **section,
    }
    if files is None:
        files = {"graph.json": "0" * 64, **{f"kernels/{n}.cubin": "0" * 64 for n in names}}
    return Artifact(tmp_path, {"target": "cuda", "kernels": section, "files": files}, None, {})


@pytest.fixture(autouse=True)
def ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))


def test_a_well_formed_section_names_its_checksummed_cubins(tmp_path):
    artifact = cuda_artifact(tmp_path)
    check_kernels(artifact, torch.device("cuda"))
    assert cubin_paths(artifact) == {NAME: tmp_path / "kernels" / f"{NAME}.cubin"}


def test_a_kernels_section_that_is_not_an_object_is_refused(tmp_path):
    artifact = cuda_artifact(tmp_path)
    artifact.manifest["kernels"] = ["sm_80"]
    with pytest.raises(ArtifactError, match="'kernels' is not an object"):
        check_kernels(artifact, torch.device("cuda"))


@pytest.mark.parametrize(
    "edit, error",
    [
        ({"arch": MISSING}, "'kernels' is not an object with an 'arch' string"),
        ({"arch": 80}, "'kernels' is not an object with an 'arch' string"),
        ({"kernels": MISSING}, "'kernels.kernels' is missing or not an object"),
        ({"kernels": [NAME]}, "'kernels.kernels' is missing or not an object"),
        ({"kernels": {NAME: "entry"}}, f"kernel '{NAME}' has no 'symbol' string"),
        ({"kernels": {NAME: {"toolkit": "13.5"}}}, f"kernel '{NAME}' has no 'symbol' string"),
        ({"nodes": MISSING}, "'kernels.nodes' is missing or not an object"),
        ({"nodes": {"first": [NAME]}}, "node 'first' does not list the section's kernels"),
        ({"nodes": {"0": NAME}}, "node '0' does not list the section's kernels"),
        ({"nodes": {"0": ["other"]}}, "node '0' does not list the section's kernels"),
    ],
)
def test_malformed_kernel_sections_are_refused(tmp_path, edit, error):
    artifact = cuda_artifact(tmp_path)
    section = {**artifact.manifest["kernels"], **edit}
    artifact.manifest["kernels"] = {k: v for k, v in section.items() if v is not MISSING}
    with pytest.raises(ArtifactError, match=error):
        check_kernels(artifact, torch.device("cuda"))


@pytest.mark.parametrize("name", ["../../../etc/passwd", "sub/kernel", ".hidden", "..", ""])
def test_kernel_names_that_are_not_plain_file_names_are_refused(tmp_path, name):
    artifact = cuda_artifact(tmp_path, names=(name,))  # listed among the files, even
    check_kernels(artifact, torch.device("cuda"))
    with pytest.raises(ArtifactError, match="is not a plain file name"):
        cubin_paths(artifact)


def test_kernels_whose_cubin_is_not_checksummed_are_refused(tmp_path):
    artifact = cuda_artifact(tmp_path, files={"graph.json": "0" * 64})
    with pytest.raises(ArtifactError, match=f"kernels/{NAME}.cubin is not among its checksummed"):
        cubin_paths(artifact)
    del artifact.manifest["files"]  # an artifact built in memory, its files never listed
    with pytest.raises(ArtifactError, match="it lists no checksummed files"):
        cubin_paths(artifact)


def test_a_cubin_the_driver_refuses_says_to_recompile(tmp_path, monkeypatch):
    cuda_core = pytest.importorskip("cuda.core")

    class RefusingObjectCode:
        @staticmethod
        def from_cubin(code):
            raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    monkeypatch.setattr(cuda_core, "ObjectCode", RefusingObjectCode)
    cubin = tmp_path / "kernels" / f"{NAME}.cubin"
    cubin.parent.mkdir()
    cubin.write_bytes(b"\x7fELF")
    with pytest.raises(ArtifactError, match=r"toolkit 13\.5.*--target cuda --arch sm_80") as e:
        load_kernel(cuda_artifact(tmp_path), cubin, META)
    assert "UNSUPPORTED_PTX_VERSION" in str(e.value.__cause__)
