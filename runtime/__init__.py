"""Kiln runtime: paged KV cache, scheduler, sampler, engine."""
