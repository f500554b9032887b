"""Image captioners: `from lightning_modules.captioning import Captioner, BLIPCaptioner, ViTGPT2Captioner, ...`.

The names are imported on first use, so that the CNN-RNN path does not pay for importing transformers.
"""

from importlib import import_module

_EXPORTS = {
    "Captioner": "inference",
    "BLIPCaptioner": "blip",
    "ViTGPT2Captioner": "vit_gpt2",
    "CNNRNNCaptioner": "cnn_rnn",
    "CaptioningModule": "base",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
