"""`Media`: the six multimodal arrays of one sequence (or a stacked batch of them), written once.

The model's `embed`, `__call__`, `hidden_states`, `prefill`, `g4.generate`, the NNX reference and
`g4.batching` all take the same six arrays; they take them as a `Media` (`media=`) or as the same-named keywords
(transformers' spelling, e.g. `**processor_output`), and `Media.of` turns either into one checked value. A
misspelled keyword is refused with the names that exist.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Bool, Float, Int

# Public entry points take numpy arrays (e.g. from the Processor) as well as JAX arrays.
InputArray = jax.Array | np.ndarray


class Media(eqx.Module):
    """Images, video frames and audio clips of one sequence (every field optional).

    Images and video frames are patchified (`patch_dim = 48*48*3` for the 12B) with `(x, y)` patch positions,
    `(-1, -1)` marking padding patches; audio comes as 640-sample frames with a mask of real frames.
    """

    pixel_values: Float[InputArray, "images patches patch_dim"] | None = None
    image_position_ids: Int[InputArray, "images patches 2"] | None = None
    pixel_values_videos: Float[InputArray, "frames vpatches patch_dim"] | None = None
    video_position_ids: Int[InputArray, "frames vpatches 2"] | None = None
    input_features: Float[InputArray, "clips aframes samples"] | None = None
    input_features_mask: Bool[InputArray, "clips aframes"] | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The six keyword names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, media: Media | Mapping[str, Any] | None = None, **kwargs: Any) -> Media:
        """One `Media` from a `Media`, a mapping and/or keywords (None values are absent).

        Raises `TypeError` for a name that is not one of `Media.keys()` (with the closest name), and `ValueError`
        when a field is given twice or an array comes without its companion (positions, mask).
        """
        given: dict[str, Any] = {}
        if isinstance(media, Media):
            given.update(media.present())
        elif isinstance(media, Mapping):
            given.update(media)
        elif media is not None:
            raise TypeError(f"media: expected a g4.Media, a mapping of media arrays or None, found "
                            f"{type(media).__name__}")
        for name, value in kwargs.items():
            if name in given and given[name] is not None and value is not None:
                raise ValueError(f"{name}: given twice (in media= and as a keyword)")
            given[name] = value
        unknown = [k for k in given if k not in cls.keys()]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, cls.keys(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{name}: not a media keyword{hint} (the model takes {', '.join(cls.keys())})")
        out = cls(**{k: v for k, v in given.items() if v is not None})
        for array, companion, what in (("pixel_values", "image_position_ids", "(x, y) per patch, (-1, -1) = padding"),
                                       ("pixel_values_videos", "video_position_ids", "(x, y) per patch"),
                                       ("input_features", "input_features_mask", "True = real frame")):
            if getattr(out, array) is not None and getattr(out, companion) is None:
                raise ValueError(f"{companion}: required with {array} ({what})")
        return out

    def present(self) -> dict[str, Any]:
        """The fields that are set, by name (keywords for `model(...)`)."""
        return {k: getattr(self, k) for k in self.keys() if getattr(self, k) is not None}

    @property
    def empty(self) -> bool:
        return not self.present()
