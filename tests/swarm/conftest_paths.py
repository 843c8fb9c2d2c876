"""Paths shared by the swarm tests."""

from pathlib import Path

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
