"""Serving-based evaluation harness for hierarchical visual understanding."""

__version__ = "0.1.0"
