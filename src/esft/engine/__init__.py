"""Generation backends. Engines only generate: they never change weights or score text."""

from esft.engine.hf import Generation, HFEngine

__all__ = ["Generation", "HFEngine"]
