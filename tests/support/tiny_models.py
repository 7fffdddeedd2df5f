"""Tiny random-weight models for tests: the package's builders (harness/tinymodels.py)."""

from harness.demo_models import SEED, build_tiny_llava, build_tiny_qwen2vl, build_tokenizer, has_torchvision

__all__ = ["SEED", "build_tiny_llava", "build_tiny_qwen2vl", "build_tokenizer", "has_torchvision"]
