"""The `kiln` command's answer to a user's mistake: one error line and exit status 2."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

import kiln
from kiln.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    tiny_model("qwen3").save_pretrained(src, safe_serialization=True)
    return src, kiln.compile(str(src), tmp_path_factory.mktemp("art") / "qwen3")


def fails(caplog, argv: list[str], message: str) -> None:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="kiln"):
        assert main(argv) == 2
    [record] = [r for r in caplog.records if r.name == "kiln"]
    assert message in record.getMessage() and not record.exc_info, record.getMessage()


def test_user_mistakes_are_one_line_errors(model, tmp_path, caplog):
    src, artifact = model
    (tmp_path / "afile").write_text("x")
    fails(caplog, ["compile", str(src), "-o", str(tmp_path)], "is not a Kiln artifact")
    fails(caplog, ["compile", str(src), "-o", str(tmp_path / "afile" / "sub")], "afile")
    fails(caplog, ["compile", str(src), "-o", str(tmp_path / "a"), "--max-model-len", "-5"],
          "max_model_len must be >= 2")  # fmt: skip
    fails(caplog, ["generate", str(tmp_path / "afile"), "hi"], "not a Kiln artifact")
    fails(caplog, ["generate", str(artifact), "hi", "--device", "tpu"], "device 'tpu'")
    fails(caplog, ["run", str(artifact), "--device", "tpu"], "device 'tpu'")  # the engine's process
    if not torch.cuda.is_available():
        fails(caplog, ["generate", str(artifact), "hi", "--device", "cuda"], "needs a CUDA GPU")


def test_compile_block_size_reaches_the_artifact_and_the_engine(model, tmp_path, capsys):
    src, _ = model
    out = tmp_path / "b32"
    assert main(["compile", str(src), "-o", str(out), "--block-size", "32"]) == 0
    llm = kiln.LLM(out)
    assert llm.engine.runner.block_size == 32
    # a 40-token prompt spans two blocks; greedy as at the default block size
    prompt = list(range(3, 43))
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ours = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
    assert ours == kiln.LLM(model[1]).generate([prompt], params, use_tqdm=False)[0].token_ids
    with pytest.raises(SystemExit):
        main(["compile", str(src), "-o", str(tmp_path / "b12"), "--block-size", "12"])
    assert "invalid choice: 12" in capsys.readouterr().err


@pytest.mark.parametrize("flag, enabled", [([], True), (["--no-enable-prefix-caching"], False)])
def test_prefix_caching_is_on_unless_turned_off(model, flag, enabled):
    from kiln.cli import _engine_config, _load_engine, parser

    args = parser().parse_args(["generate", str(model[1]), "hi", *flag])
    assert _engine_config(args).enable_prefix_caching is enabled
    engine = _load_engine(args)
    try:
        assert engine.scheduler.block_manager.enable_prefix_caching is enabled
    finally:
        engine.close()


def test_ports_outside_the_range_are_usage_errors(model, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(model[1]), "--port", "70000"])
    assert exit_.value.code == 2 and "port must be 0-65535" in capsys.readouterr().err


def test_a_server_that_cannot_listen_exits_with_its_engine_process(model):
    """No shutdown ran: the engine's process still stops, and `kiln run` exits."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "kiln.cli", "run", str(model[1]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert run.returncode == 2 and "address already in use" in run.stderr
    assert "loading" in run.stderr and "in the engine's process" in run.stderr


def test_out_of_gpu_memory_at_start_up_says_what_to_lower(model, caplog, monkeypatch):
    from runtime.distributed import TensorParallelError

    def out_of_memory(args):  # (its way out of an engine process: tests/runtime/test_engine.py)
        try:
            raise RuntimeError("CUDA error: out of memory")  # as AcceleratorError says it
        except RuntimeError as e:  # as a tensor-parallel rank 0 reports it
            raise TensorParallelError(f"an earlier step failed: {e}") from e

    monkeypatch.setattr("kiln.cli._start_engine", out_of_memory)
    with caplog.at_level(logging.ERROR, logger="kiln"):
        assert main(["run", str(model[1])]) == 1
    [record] = [r for r in caplog.records if r.name == "kiln"]
    assert "out of memory" in record.getMessage() and not record.exc_info
    assert "--gpu-memory-utilization" in record.getMessage()

    def broken(args):
        raise RuntimeError("something else")

    monkeypatch.setattr("kiln.cli._start_engine", broken)
    with pytest.raises(RuntimeError, match="something else"):  # other errors: the traceback
        main(["run", str(model[1])])


def test_run_takes_the_api_key_from_kiln_api_key_unless_given(monkeypatch, capsys):
    """As vLLM reads VLLM_API_KEY: a key that need not be on the command line (`ps` shows it)."""
    from kiln.cli import _server_config, parser

    def config(*flags: str):
        return _server_config(parser().parse_args(["run", "artifact", *flags]), "m")

    monkeypatch.delenv("KILN_API_KEY", raising=False)
    assert config().api_key is None
    monkeypatch.setenv("KILN_API_KEY", "sk-from-env")
    assert config().api_key == "sk-from-env"
    assert config("--api-key", "sk-flag").api_key == "sk-flag"
    monkeypatch.setenv("KILN_API_KEY", "")
    assert config().api_key is None  # set but empty: no key, not the empty one
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--help"])
    assert "KILN_API_KEY" in " ".join(capsys.readouterr().out.split())


def test_run_flags_reach_the_server_config():
    from kiln.cli import _server_config, parser

    def config(*flags: str):
        return _server_config(parser().parse_args(["run", "artifact", *flags]), "m")

    assert config().served_model_name == "m"
    assert not config().enable_prompt_tokens_details
    assert config("--enable-prompt-tokens-details").enable_prompt_tokens_details
    assert config("--tool-call-parser", "hermes").tool_call_parser is None  # not enabled
    auto = config("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert auto.tool_call_parser == "hermes"


def test_run_cors_flags_are_json_lists_with_vllms_defaults(capsys):
    from kiln.cli import _server_config, parser

    def config(*flags: str):
        return _server_config(parser().parse_args(["run", "artifact", *flags]), "m")

    default = config()
    assert default.allowed_origins == default.allowed_methods == default.allowed_headers == ("*",)
    assert not default.allow_credentials
    given = config(
        "--allowed-origins", '["http://a.example", "http://b.example"]',
        "--allowed-methods", '["GET", "POST"]', "--allowed-headers", "[]", "--allow-credentials",
    )  # fmt: skip
    assert given.allowed_origins == ("http://a.example", "http://b.example")
    assert (given.allowed_methods, given.allowed_headers) == (("GET", "POST"), ())
    assert given.allow_credentials
    for bad in ("http://a.example", '"*"', "[1]"):
        with pytest.raises(SystemExit) as exit_:
            parser().parse_args(["run", "artifact", "--allowed-origins", bad])
        assert exit_.value.code == 2 and "a JSON list of strings" in capsys.readouterr().err


def test_run_chat_template_is_a_file_or_the_template_itself(tmp_path, capsys):
    """As vLLM reads --chat-template: a readable file, else text that looks like a template."""
    from kiln.cli import _server_config, parser

    def config(*flags: str):
        return _server_config(parser().parse_args(["run", "artifact", *flags]), "m")

    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    (tmp_path / "chat.jinja").write_text(template)
    assert config().chat_template is None
    assert config("--chat-template", str(tmp_path / "chat.jinja")).chat_template == template
    assert config("--chat-template", template).chat_template == template
    with pytest.raises(SystemExit) as exit_:  # at once, before any model loads
        config("--chat-template", str(tmp_path / "missing.jinja"))
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 2 and "looks like a file's path, but it cannot be read" in err


def test_a_chat_template_for_a_model_without_a_tokenizer_fails_the_start(
    model, caplog, monkeypatch
):
    from kiln import cli

    def started(args):
        raise AssertionError("the engine started")

    monkeypatch.setattr(cli, "_start_engine", started)  # refused before the model loads
    # the tiny model's artifact has no tokenizer
    fails(caplog, ["run", str(model[1]), "--chat-template", "{{ 1 }}"],
          "a chat template needs a tokenizer, and this model has none")  # fmt: skip
