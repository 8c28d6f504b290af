"""How a source network wants its input pixels: the input convention, as data.

A RetinaFace export takes float NCHW pixels in one channel order, each ``(pixel - mean) / std``:
the biubug6 exports BGR with the mean 104/117/123 subtracted, a TensorFlow export RGB 0-255 that
its graph normalises itself. The surgery folds the matching steps in front of the served graph's
uint8 NHWC BGR input (:func:`tools.engine.surgery.add_preprocessing`), so every network gets the
same input; the reference pipeline feeds the original graph the same way (:meth:`apply`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["InputConvention", "ConventionError", "BGR_MEAN", "RGB", "PRESETS", "parse_convention"]


class ConventionError(ValueError):
    """An input convention that cannot be read; the message says how to write one."""


@dataclass(frozen=True)
class InputConvention:
    """``order`` of the channels the network takes (``bgr`` or ``rgb``) and, per channel in that
    order, ``mean`` and ``std``: the network sees ``(pixel - mean) / std`` of 0-255 pixels."""

    order: str
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __str__(self) -> str:
        for name, preset in PRESETS.items():
            if preset == self:
                return name
        return f"{self.order}:mean={','.join(f'{v:g}' for v in self.mean)}:std={','.join(f'{v:g}' for v in self.std)}"

    @property
    def normalises(self) -> bool:
        """Whether anything is subtracted or divided (False: the network normalises 0-255 pixels itself)."""
        return self.mean != (0.0, 0.0, 0.0) or self.std != (1.0, 1.0, 1.0)

    def apply(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[N, H, W, 3]`` BGR -> the network's float32 NCHW input."""
        blob = images.astype(np.float32).transpose(0, 3, 1, 2)
        if self.order == "rgb":
            blob = blob[:, ::-1]
        mean = np.array(self.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.array(self.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((blob - mean) / std if self.normalises else blob)


BGR_MEAN = InputConvention("bgr", mean=(104.0, 117.0, 123.0))  # the biubug6 exports (PyTorch)
RGB = InputConvention("rgb")  # 0-255 RGB, normalised inside the graph (e.g. a TensorFlow export)
PRESETS = {"bgr-mean": BGR_MEAN, "rgb": RGB}
USAGE = ("write bgr-mean (BGR, mean 104/117/123 subtracted: the biubug6 exports), rgb (RGB 0-255, "
         "the graph normalises itself) or ORDER:mean=M,M,M:std=S,S,S (ORDER bgr or rgb, values per "
         "channel in that order)")


def _three(text: str, what: str, source: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConventionError(f"{source}: {what} {text!r} is not three numbers; {USAGE}") from None
    if len(values) != 3 or (what == "std" and 0.0 in values):
        detail = " (none zero)" if what == "std" else ""
        raise ConventionError(f"{source}: {what} {text!r} must be three numbers{detail}; {USAGE}")
    return values


def parse_convention(text: str, source: str = "ONNX_INPUT") -> InputConvention:
    """An input convention from its text: a preset name or ``ORDER:mean=..:std=..``."""
    text = text.strip().lower()
    if text in PRESETS:
        return PRESETS[text]
    order, *fields = text.split(":")
    if order not in ("bgr", "rgb"):
        raise ConventionError(f"{source}={text!r}: {USAGE}")
    values = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    for field in fields:
        key, _, value = field.partition("=")
        if key not in values:
            raise ConventionError(f"{source}={text!r}: unknown field {key!r}; {USAGE}")
        values[key] = _three(value, key, source)
    return InputConvention(order, values["mean"], values["std"])
