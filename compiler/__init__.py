"""Kiln compiler: frontend (trace -> IR), passes, artifact writer."""
