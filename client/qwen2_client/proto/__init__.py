"""Stubs generated from proto/qwen2/serving/v1/serving.proto by client/regen_stubs.py (do not edit)."""
