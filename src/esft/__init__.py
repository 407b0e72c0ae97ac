"""esft: fine-tune language models with Evolution Strategies, without forgetting."""

from esft.config import ESConfig

__version__ = "0.1.0"


def __getattr__(name: str):
    # Import the trainer lazily: `import esft` should not pay for torch + transformers.
    if name in ("ESTrainer", "TrainerCallback"):
        from esft import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["ESConfig", "ESTrainer", "TrainerCallback", "__version__"]
