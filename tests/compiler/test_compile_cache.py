"""What makes a compiled artifact reusable (the demo's and C1's cache), and options checked
before the work starts."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import tiny_model

import kiln
from compiler.compile import CompileOptions, compiler_digest, is_current


def test_an_artifact_is_current_only_when_this_compiler_wrote_it(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, safe_serialization=True)
    art = kiln.compile(str(src), tmp_path / "art")
    assert json.loads((art / "manifest.json").read_text())["compiler"] == compiler_digest()
    assert is_current(art)
    assert not is_current(tmp_path / "missing")
    stale = tmp_path / "stale"
    shutil.copytree(art, stale)
    manifest = json.loads((stale / "manifest.json").read_text())
    (stale / "manifest.json").write_text(json.dumps({**manifest, "compiler": "0" * 16}))
    assert not is_current(stale)
    (stale / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    assert not is_current(stale)


@pytest.mark.parametrize("arch", ["90", "sm90", "sm_9", "compute_90", ""])
def test_a_malformed_arch_is_refused_up_front(arch):
    with pytest.raises(ValueError, match="sm_90"):
        CompileOptions(target="cuda", arch=arch)
    assert CompileOptions(target="cuda", arch="sm_100").arch == "sm_100"
