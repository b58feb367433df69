"""The state every part of :class:`~lookalike.catalog.Catalog` shares: the store, the
extractor, the engine set, the lock; model checks, key lookup and embedding."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
from PIL import Image

from ..errors import (
    AmbiguousIdError,
    LookalikeError,
    ModelMismatchError,
    ModelVersionError,
    NotFoundError,
)
from ..extract import NETWORK_EXTRACTORS, BaseExtractor, available_extractors, get_extractor
from ..images import decode_image, read_bytes
from ..store import Store
from ..types import (
    EngineKind,
    Key,
    ModelInfo,
    choices,
)
from .classifier import Classifier
from .engines import DEFAULT_SETTINGS as DEFAULT_SETTINGS  # re-exported
from .engines import EngineSet
from .validate import catalog_name, check_lookup_id

DEFAULT_EXTRACTOR = "cnn"
DEFAULT_K = 10

ImageInput = str | os.PathLike[str] | bytes | Image.Image
"""A query or an image to add: a file path, a URL, encoded bytes, or a PIL image."""


def version_message(name: str, uri: str, stored: ModelInfo, installed: ModelInfo) -> str:
    """The one line that says a catalog's vectors come from another version of the installed
    extractor, and which command re-extracts them."""
    return (
        f"catalog {name!r} holds vectors of {stored.tag} (d={stored.dim}), but this install's "
        f"{installed.name} extractor makes {installed.tag} (d={installed.dim}); re-extract them "
        f"with: lookalike reindex --catalog {uri} (searches by vector or stored id work meanwhile)"
    )


class CatalogBase:
    """The catalog's shared state and basics (see :class:`~lookalike.catalog.Catalog`).

    Args and raises: as :class:`~lookalike.catalog.Catalog`.
    """

    def __init__(
        self,
        store: Store,
        extractor: str | None = None,
        device: str = "auto",
        engine: str | None = None,
    ) -> None:
        self._store = store
        self.device = device
        self.engine_kind = engine or os.environ.get("LOOKALIKE_ENGINE") or EngineKind.AUTO
        if self.engine_kind not in choices(EngineKind):
            raise LookalikeError(
                f"unknown engine {self.engine_kind!r}; use one of {', '.join(choices(EngineKind))}"
            )
        stored = store.model()
        if stored is not None and extractor is not None and extractor != stored.name:
            raise ModelMismatchError(
                f"catalog {catalog_name(store.uri)!r} holds {stored.name!r} vectors"
                f" ({stored.tag}, d={stored.dim}); it cannot take {extractor!r} vectors."
                " Use another catalog folder, or migrate this one: lookalike reindex"
                f" --catalog {store.uri} --extractor {extractor}"
            )
        self._extractor_name = extractor or (stored.name if stored else DEFAULT_EXTRACTOR)
        self._pinned = extractor is not None  # else it follows the stored model's name
        self._extractor: BaseExtractor | None = None
        self._engines = EngineSet(store, self.engine_kind, self.ann_folder, self.folder / "engine")
        self._classifier: Classifier | None = None
        self._classifier_stamp: int | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ basics

    @property
    def uri(self) -> str:
        """Where the catalog lives (folder path or PostgreSQL URL)."""
        return self._store.uri

    @property
    def name(self) -> str:
        """The catalog's name for messages: its folder's basename or its PostgreSQL database's
        name, never an absolute path or a URL (:func:`.validate.catalog_name`)."""
        return catalog_name(self.uri)

    @property
    def folder(self) -> Path:
        """The catalog's local folder for its files (ANN indexes, thumbnails, models)."""
        return Path(self._store.folder)

    @property
    def ann_folder(self) -> Path:
        """Where ANN indexes are saved: ``<folder>/ann``."""
        return self.folder / "ann"

    @property
    def model(self) -> ModelInfo | None:
        """The model of the stored vectors (None for a new, empty catalog)."""
        return self._store.model()

    @property
    def extractor(self) -> BaseExtractor:
        """The extractor that embeds images for this catalog (built on first use), checked
        against the stored model on every use (a reindex may switch it while this object
        lives; opened without an extractor, the catalog follows the stored model's name).

        Raises:
            ModelVersionError: the catalog's vectors come from another version of it
                (``lookalike reindex`` re-extracts them; the message says so).
            ModelMismatchError: they come from another model (an extractor was given).
            LookalikeError: no installed extractor makes the stored model's vectors.
        """
        stored = self._store.model()
        with self._lock:
            name = self._extractor_name
            if stored is not None and not self._pinned:
                name = stored.name
            if self._extractor is None or self._extractor.name != name:
                if name not in available_extractors():
                    raise LookalikeError(
                        f"catalog {self.name!r} holds vectors of model {name!r}, which no "
                        "installed extractor makes; query it by vector or stored id"
                    )
                self._extractor = self.make_extractor(name)
            ext = self._extractor
        if stored is not None and stored.name == ext.name and stored != ext.info:
            raise ModelVersionError(
                version_message(self.name, self.uri, stored, ext.info), stored.tag, ext.info.tag
            )
        self._check_model(ext.info, stored)
        return ext

    def make_extractor(self, name: str) -> BaseExtractor:
        """A new extractor ``name`` with this catalog's device (the network extractors).

        Raises:
            LookalikeError: unknown name.
        """
        options = {"device": self.device} if name in NETWORK_EXTRACTORS else {}
        return get_extractor(name, **options)

    def _check_model(self, info: ModelInfo, stored: ModelInfo | None = None) -> None:
        stored = stored or self._store.model()
        if stored is not None and stored != info:
            raise ModelMismatchError(
                f"catalog {self.name!r} holds vectors of {stored.tag} (d={stored.dim}); "
                f"refusing vectors of {info.tag} (d={info.dim})"
            )

    def _claim(self, info: ModelInfo) -> None:
        self._check_model(info)
        # another process may have claimed first with another model
        self._check_model(info, self._store.claim_model(info))

    def close(self) -> None:
        """Save ANN indexes that followed new writes, and close the store."""
        self._engines.save_dirty()
        self._engines.save_files()
        self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _find_keys(self, image_id: str, listing_id: str | None, must_exist: bool) -> list[Key]:
        check_lookup_id(image_id, "image id")
        if listing_id is not None:
            check_lookup_id(listing_id, "listing id")
            keys = [(listing_id, image_id)]
            if must_exist and not self._store.existing(keys):
                raise NotFoundError(f"no image {image_id!r} in listing {listing_id!r}")
            return keys
        keys = self._store.find_image(image_id)
        if len(keys) > 1:
            raise AmbiguousIdError(
                f"image id {image_id!r} is in {len(keys)} listings "
                f"({', '.join(k[0] for k in keys[:5])}); give the listing id too"
            )
        if must_exist and not keys:
            raise NotFoundError(f"no image {image_id!r} in catalog {self.name!r}")
        return keys

    def embed(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed images with the catalog's extractor: ``n`` inputs -> ``(n, d) float32``.

        Raises:
            ImageError: an image cannot be read or decoded.
            ModelVersionError: the catalog holds another version of the extractor's vectors.
        """
        return self.embed_with(self.extractor, images)

    @staticmethod
    def embed_with(ext: BaseExtractor, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed images with ``ext``: ``n`` inputs -> ``(n, d) float32`` (see :meth:`embed`).

        Raises:
            ImageError: an image cannot be read or decoded.
        """
        arrays = []
        for im in images:
            if isinstance(im, Image.Image):
                pil = im.convert("RGB")
            elif isinstance(im, bytes):
                pil = decode_image(im, name="query image", draft_size=ext.draft_size).image
            else:
                loc = os.fspath(im)
                pil = decode_image(read_bytes(loc), name=loc, draft_size=ext.draft_size).image
            arrays.append(ext.preprocess(pil))
        return ext.embed(np.stack(arrays)) if arrays else np.zeros((0, ext.dim), np.float32)
