"""Graph -> Graph passes, one per file; compiler/pipeline.py gives their order."""
