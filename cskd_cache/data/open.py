"""`open_source`: the image source a user's --data (or --val-data) names."""

from __future__ import annotations

import os

from ..errors import DataError
from .folder import ImageFolderSource
from .source import _HINT, ImageSource
from .webdataset import WebDatasetSource


def open_source(spec: str | list[str], flag: str = "--data") -> ImageSource:
    """An ImageFolder directory, or WebDataset shards (paths/URLs, brace patterns, space/'::'-separated).
    `flag` names the option the spec came from in every error message (--data, --val-data, ...)."""
    try:
        if isinstance(spec, (list, tuple)):
            spec = list(spec)[0] if len(spec) == 1 else list(spec)
        if not spec or (isinstance(spec, str) and not spec.strip()):
            raise DataError(f"--data: no dataset given; {_HINT}")
        if isinstance(spec, str) and os.path.isdir(os.path.expanduser(spec)):
            source = ImageFolderSource(spec)
        else:
            source = WebDatasetSource(spec)
    except DataError as e:
        msg = str(e)
        raise DataError(flag + msg[len("--data"):] if msg.startswith("--data") else msg) from None
    except ImportError as e:  # fsspec's protocol extras (s3fs, gcsfs, aiohttp, ...) missing
        raise DataError(f"{flag}: {spec!r} needs a package that is not installed ({str(e).splitlines()[0][:200]})") \
            from None
    source.flag = flag
    return source
