"""The `kiln` command: compile, run (OpenAI-compatible server), generate, bench."""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
from pathlib import Path

from runtime.logs import configure_logging
from server.reasoning import REASONING_PARSERS
from server.tool_parsers import TOOL_CALL_PARSERS

log = logging.getLogger("kiln")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:  # bad input, paths, ports: one line (-v: the traceback)
        log.error("%s", e, exc_info=args.verbose)
        return 2
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        log.error("%s\n%s", e, OUT_OF_MEMORY_ADVICE, exc_info=args.verbose)
        return 1


OUT_OF_MEMORY_ADVICE = (
    "out of GPU memory: lower --gpu-memory-utilization (what it leaves holds the CUDA "
    "graphs) or --max-num-seqs and --max-num-batched-tokens (the largest CUDA graphs), or pass "
    "--decode-graphs-only or --enforce-eager"
)


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether `exc`, or an error it came from (a tensor-parallel rank's), is the GPU
    running out of memory: torch raises OutOfMemoryError, or AcceleratorError when CUDA
    itself (a graph's instantiation) runs out."""
    while exc is not None:
        if "out of memory" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def json_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings, as vLLM's --allowed-origins and its kin take."""
    try:
        values = json.loads(text)
    except ValueError:
        values = None
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return tuple(values)


def chat_template(text: str) -> str:
    """The template --chat-template names, as vLLM reads it: the file at `text`, else `text`
    itself when it looks like a template (holds a brace or a newline)."""
    try:
        return Path(text).read_text(encoding="utf-8")
    except OSError as exc:
        if not any(c in text for c in "{}\n"):
            raise argparse.ArgumentTypeError(
                f"{text!r} looks like a file's path, but it cannot be read: {exc}"
            ) from None
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a model into an artifact")
    c.add_argument("source", help="HF model directory, .gguf file, or builtin:smollm2")
    c.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="artifact directory: new or empty, or an artifact to replace (nothing else)",
    )
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    c.add_argument("--arch", default="sm_90", help="cuda target: GPU architecture (no GPU needed)")
    c.add_argument(
        "--max-model-len", type=int, help="longest sequence served (default: the model's)"
    )
    c.add_argument(
        "--block-size",
        type=int,
        choices=[8, 16, 32],
        default=16,
        help="tokens a KV-cache block holds (default 16)",
    )
    c.add_argument("--dump-ir", type=Path, metavar="DIR", help="write the IR after each pass")
    c.add_argument(
        "--tensor-parallel-size", type=int, default=1, metavar="N", help="shard over N GPUs"
    )
    c.add_argument(
        "--quantization",
        choices=["int4", "fp8"],
        help="store the projections' weights as int4 (per group) or fp8 (per row)",
    )
    c.add_argument(
        "--group-size", type=int, default=128, help="int4: inputs sharing a scale (default 128)"
    )
    c.set_defaults(func=_compile)

    r = sub.add_parser("run", help="serve an artifact with the OpenAI-compatible API")
    r.add_argument("artifact", type=Path)
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=port, default=8000)
    r.add_argument(
        "--api-key",
        help="require this bearer key on /v1/* (default: the KILN_API_KEY environment "
        "variable, which keeps the key out of `ps`)",
    )
    r.add_argument("--served-model-name", help="model name clients use (default: artifact dir)")
    r.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds to drain")
    r.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="serve tool_choice 'auto' (the default with tools); needs --tool-call-parser",
    )
    r.add_argument(
        "--tool-call-parser",
        choices=TOOL_CALL_PARSERS,
        help="the model's tool-call format: hermes (<tool_call> blocks, as Qwen writes them), "
        "llama3_json (JSON calls, as Llama 3.1 writes them)",
    )
    r.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        help="split chat outputs' thinking into reasoning_content: qwen3 (an output that "
        "opens with <think>), deepseek_r1 (the template opens it: DeepSeek-R1, QwQ, "
        "Qwen3-Thinking)",
    )
    r.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens: the prompt tokens the prefix "
        "cache served",
    )
    r.add_argument(
        "--chat-template",
        type=chat_template,
        metavar="TEMPLATE",
        help="the Jinja chat template for chat requests (and /tokenize's messages), in place "
        "of the tokenizer's: a file's path, or the template itself",
    )
    for flag, what in (
        ("--allowed-origins", "the origins whose pages may call the server"),
        ("--allowed-methods", "the methods they may use"),
        ("--allowed-headers", "the request headers they may send (Accept, Accept-Language, "
         "Content-Language and Content-Type always)"),
    ):  # fmt: skip
        r.add_argument(
            flag,
            type=json_list,
            default=("*",),
            metavar="JSON",
            help=f'CORS: {what}, as a JSON list (default ["*"]: any; []: none)',
        )
    r.add_argument(
        "--allow-credentials",
        action="store_true",
        help="CORS: let those pages make requests with credentials (cookies, HTTP "
        "authentication) and read the answers",
    )
    r.add_argument(
        "--engine-thread",
        action="store_true",
        help="run the engine on a thread of the server's process (default: in a process of "
        "its own, so the server's work per streamed token does not wait on the engine's)",
    )
    _engine_args(r)
    r.set_defaults(func=_run)

    g = sub.add_parser("generate", help="complete one prompt without a server")
    g.add_argument("artifact", type=Path)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _engine_args(g)
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks (kernels: BENCH.md K1, K3, K4 on a GPU)")
    b.add_argument("what", choices=["kernels"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    b.set_defaults(func=_bench)
    return p


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument(
        "--max-model-len", type=int, help="at most the artifact's (default: the artifact's)"
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of the GPU's memory the engine may use: weights, the activations of "
        "the largest step (measured at start-up) and the KV cache, which gets the rest; CUDA "
        "graphs live in what it leaves (default 0.9)",
    )
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="CPU KV-cache size")
    p.add_argument("--device", help="cpu or cuda[:N] (default: the artifact's target)")
    p.add_argument(
        "--enforce-eager", action="store_true", help="run every step eagerly: no CUDA graphs"
    )
    p.add_argument(
        "--decode-graphs-only",
        action="store_true",
        help="replay only decode steps from CUDA graphs; steps with prefill chunks run eagerly "
        "instead of from piecewise graphs",
    )
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse earlier requests' KV blocks for a prompt's leading blocks whose tokens "
        "match theirs (automatic prefix caching; on by default)",
    )
    p.add_argument(
        "--scheduling-policy",
        choices=("fcfs", "priority"),
        default="fcfs",
        help="the order requests are served in: fcfs (arrival), or priority (each request's "
        "`priority`, lower first, then arrival; the least urgent running request is "
        "preempted first)",
    )
    p.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="on a GPU, read each step's tokens back before launching the next",
    )


def _engine_config(args):
    from runtime.config import EngineConfig

    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_bytes=int(args.kv_cache_gib * 2**30),
        device=args.device,
        cuda_graphs=not args.enforce_eager,
        mixed_graphs=not args.decode_graphs_only,
        async_scheduling=False if args.no_async_scheduling else None,
        policy=args.scheduling_policy,
        enable_prefix_caching=args.enable_prefix_caching,
    )


def _compile(args) -> None:
    from compiler.compile import CompileOptions, compile_model

    options = CompileOptions(
        args.dtype,
        args.target,
        args.max_model_len,
        block_size=args.block_size,
        dump_ir=args.dump_ir,
        tensor_parallel_size=args.tensor_parallel_size,
        arch=args.arch,
        quantization=args.quantization,
        group_size=args.group_size,
    )
    path = compile_model(args.source, args.output, options)
    log.info("artifact written to %s", path)


def _load_engine(args):
    from runtime.engine import Engine

    log.info("loading %s", args.artifact)
    return Engine.load(args.artifact, _engine_config(args))


def _start_engine(args):
    """The engine loop's core: on a thread of this process, or in a process of its own,
    which starts loading the model at once."""
    if args.engine_thread:
        from runtime.async_engine import ThreadCore

        return ThreadCore(_load_engine(args))
    from runtime.engine_process import ProcessCore, load_engine

    log.info("loading %s in the engine's process", args.artifact)
    return ProcessCore(functools.partial(load_engine, args.artifact, _engine_config(args)))


def _generate(args) -> None:
    import time

    from runtime.outputs import merge_update
    from runtime.sampling_params import SamplingParams

    engine = _load_engine(args)
    if engine.tokenizer is None:
        raise ValueError("this artifact has no tokenizer; use the server with token ids")
    text = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": text}]
        text = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
    ids = engine.tokenizer.encode(text, add_special_tokens=not args.chat)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    engine.add_request("cli", ids, params, prompt=text)
    start, result = time.perf_counter(), None
    while engine.has_unfinished():
        for update in engine.step():
            result = merge_update(result, update)
            sys.stdout.write(update.outputs[0].text)
            sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    log.info(
        "%d tokens in %.2f s (%.1f tok/s)",
        len(result.token_ids),
        elapsed,
        len(result.token_ids) / elapsed,
    )


def _bench(args) -> None:
    from benchmarks import kernels

    kernels.main(args.rest)


def _server_config(args, name: str):
    """The server's options from `kiln run`'s; the API key from KILN_API_KEY when --api-key
    is not given (as vLLM reads VLLM_API_KEY)."""
    from server.app import ServerConfig

    return ServerConfig(
        served_model_name=name,
        api_key=args.api_key or os.environ.get("KILN_API_KEY") or None,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        reasoning_parser=args.reasoning_parser,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        chat_template=args.chat_template,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
    )


def _run(args) -> int:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if args.tool_call_parser and not args.enable_auto_tool_choice:
        log.warning("--tool-call-parser reads calls only with --enable-auto-tool-choice")
    if args.chat_template is not None and not (args.artifact / "tokenizer").is_dir():
        raise ValueError("a chat template needs a tokenizer, and this model has none")
    core = _start_engine(args)  # an engine process loads while the server's modules import
    import asyncio

    from runtime.async_engine import AsyncEngine
    from server.app import create_app
    from server.lifecycle import serve

    name = args.served_model_name or args.artifact.resolve().name
    engine = AsyncEngine(core, model_name=name)
    log.info(
        "KV cache: %d tokens; maximum concurrency at %d tokens per request: %.1fx",
        engine.kv_cache_tokens,
        engine.max_model_len,
        engine.max_concurrency,
    )
    app = create_app(engine, _server_config(args, name))
    # the start-up heap lives as long as the server: keep full collections from walking it
    gc.collect()
    gc.freeze()
    healthy = asyncio.run(serve(app, args.host, args.port, args.shutdown_timeout, engine))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
