"""esft: fine-tune language models with Evolution Strategies, without forgetting."""

from esft.config import ESConfig

__version__ = "0.1.0"


def __getattr__(name: str):
    # Import lazily: `import esft` should not pay for torch + transformers.
    if name == "ESTrainer":
        from esft.trainer import ESTrainer

        return ESTrainer
    if name == "TrainerCallback":
        from esft.callbacks import TrainerCallback

        return TrainerCallback
    raise AttributeError(name)


__all__ = ["ESConfig", "ESTrainer", "TrainerCallback", "__version__"]
