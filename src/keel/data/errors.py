"""What the data layer raises: the user-facing errors and the argument check they share.

Every other module of :mod:`keel.data` imports from here, and this module imports none of
them, so the errors can be raised anywhere without an import cycle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["DataError", "BadImageError"]


class DataError(ValueError):
    """A data source cannot be used; the message is one line, for the user."""


class BadImageError(Exception):
    """One image file could not be fully decoded."""


def _check_img_size(img_size: Any) -> None:
    if isinstance(img_size, bool) or not isinstance(img_size, (int, np.integer)) or img_size < 1:
        raise DataError(f"img_size must be a positive integer, got {img_size!r}")
