"""`kiln.LLM` (offline generation over an artifact) and `kiln.compile`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

from compiler.artifact import load_artifact
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.outputs import RequestOutput, merge_update
from runtime.sampling_params import SamplingParams

Prompt = str | list[int]
MODULE_OPTIONS = ("tokenizer", "eos_token_ids", "name", "generation_defaults")


def compile(source: str | torch.nn.Module, out: str | Path, **options) -> Path:
    """Compile `source` into an artifact at `out`; returns `out`.

    `source`: an HF directory, a .gguf file or builtin:NAME; a transformers `…ForCausalLM`
    in memory (may take `tokenizer`); or a custom architecture, a `torch.nn.Module` in the
    flat-batch convention (`forward(token_ids, positions, logits_indices) -> logits`,
    attention through `kiln.attention`; see compiler/frontend/module.py), which needs
    `max_model_len` and may take `tokenizer`, `eos_token_ids`, `name` and
    `generation_defaults`. A model in memory compiles in its parameters' dtype. Other
    options: CompileOptions' fields.
    """
    # imported here: the compiler pulls in transformers' model classes, which serving and
    # offline generation never need (seconds of `kiln run` start-up)
    from compiler.compile import CompileOptions, compile_model, compile_module

    if not isinstance(source, torch.nn.Module):
        return compile_model(source, Path(out), CompileOptions(**options))
    described = {k: options.pop(k) for k in MODULE_OPTIONS if k in options}
    return compile_module(source, Path(out), CompileOptions(**options), **described)


class LLM:
    """Offline generation, vLLM-style: `LLM(artifact).generate(prompts, params)`."""

    def __init__(self, artifact: str | Path, **engine_options) -> None:
        """`engine_options`: EngineConfig's fields (num_kv_blocks, kv_cache_bytes,
        gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, max_model_len,
        cuda_graphs, async_scheduling, enable_prefix_caching, ...)."""
        known = {f.name for f in fields(EngineConfig)}
        if unknown := sorted(set(engine_options) - known):
            raise TypeError(f"unknown engine options {unknown}; known: {sorted(known)}")
        self.engine = Engine(load_artifact(Path(artifact)), EngineConfig(**engine_options))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Release the engine (tensor-parallel worker processes); the LLM is unusable after."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def default_params(self, **overrides) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults, then `overrides`."""
        names = {f.name for f in fields(SamplingParams)}
        defaults = {k: v for k, v in self.engine.artifact.generation_config.items() if k in names}
        return SamplingParams(**{**defaults, **overrides})

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); results in input order.
        Without `sampling_params`: default_params(), max_tokens capped at what fits."""
        prompts = _as_list(prompts)
        params = sampling_params if sampling_params is not None else self.default_params()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        order = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                request_id = str(next(self._ids))
                text, ids = (
                    (prompt, self._encode(prompt)) if isinstance(prompt, str) else (None, prompt)
                )
                room = self.engine.max_model_len - len(ids)
                if sampling_params is None and 0 < room < p.max_tokens:  # as the server's
                    p = replace(p, max_tokens=room)
                self.engine.add_request(request_id, ids, p, prompt=text)
                order.append(request_id)
        except Exception:
            for request_id in order:  # all or nothing: the prompts queued before it leave
                self.engine.abort(request_id)
            raise
        return self._run(order, use_tqdm)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this artifact has no tokenizer: pass prompts as token-id lists")
        return self.tokenizer.encode(text)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generate", unit="req", disable=not use_tqdm) as bar:
            try:
                while self.engine.has_unfinished():
                    for update in self.engine.step():
                        acc = merge_update(results.get(update.request_id), update)
                        results[update.request_id] = acc
                        bar.update(int(acc.finished))
            except BaseException:  # interrupted (Ctrl-C) or failed: its requests leave
                for request_id in order:
                    self.engine.abort(request_id)
                raise
        return [results[r] for r in order]


def _as_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts
