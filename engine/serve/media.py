"""Images from requests, read with limits before the engine sees them.

This server fetches nothing: an image comes as a `data:image/...;base64,` URL, or as a local file
(`file://` URL in chat, `<img>path</img>` in a completions prompt) only under
--allowed-local-media-path (symbolic links resolved first, so a link cannot point out of it). Every
image is checked before it is decoded: its bytes (--max-image-bytes), then its width x height from the
file's header (--max-image-pixels: a small file may declare a huge picture, a decompression bomb),
and only a few well-known raster formats are opened (PIL's EPS reader would start Ghostscript).
Decoded images become 8-bit RGB the way the engine reads files (engine.image_utils.to_rgb), so a
data: URL of a file gives the same pixels, and the same answers, as the file's path offline.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..image_utils import to_rgb
from .protocol import ServeError

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
IMG_SPAN = re.compile(r"<img>(.*?)</img>", re.DOTALL)  # a Qwen-VL image span in a raw prompt


@dataclass(frozen=True)
class MediaLimits:
    max_image_bytes: int = 20 << 20  # OpenAI's per-image limit
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # per request
    allowed_local_media_path: Path | None = None

    def image_from_url(self, url: str, param: str):
        """An image_url part's image (RGB PIL image), or a ServeError naming `param`."""
        if url.startswith("data:"):
            return self._decode(_data_url_bytes(url, self.max_image_bytes, param), "the data: URL", param)
        if url.startswith(("http://", "https://")):
            raise ServeError("image URLs are not fetched by this server: send the image inline as a data: URL "
                             "(data:image/jpeg;base64,...)", param=param)  # fmt: skip
        if url.startswith("file:"):
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise ServeError(f"file URL {url[:100]!r} names a host; use file:///absolute/path", param=param)
            return self.local_image(unquote(parsed.path), param)
        raise ServeError(f"unsupported image URL {url[:40]!r}...: send a data: URL (data:image/jpeg;base64,...)",
                         param=param)  # fmt: skip

    def local_image(self, path: str, param: str):
        """A local file's image, only from under allowed_local_media_path (a relative path is taken from
        there)."""
        root = self.allowed_local_media_path
        if root is None:
            raise ServeError(f"local image {path[:100]!r} refused: this server reads no local files unless started "
                             "with --allowed-local-media-path DIR; send the image as a data: URL", param=param)  # fmt: skip
        if path.startswith(("http://", "https://")):
            raise ServeError("image URLs are not fetched by this server: use /v1/chat/completions with the image as "
                             "a data: URL", param=param)  # fmt: skip
        base = os.path.realpath(root)
        real = os.path.realpath(os.path.join(base, path))
        if os.path.commonpath([real, base]) != base:
            raise ServeError(f"local image {path[:100]!r} is outside --allowed-local-media-path {root}", param=param)
        if not os.path.isfile(real):
            raise ServeError(f"local image {path[:100]!r} not found (or not a file)", param=param)
        size = os.path.getsize(real)
        if size > self.max_image_bytes:
            raise ServeError(f"local image {path[:100]!r} is {size} bytes, more than --max-image-bytes "
                             f"{self.max_image_bytes}", param=param)  # fmt: skip
        with open(real, "rb") as f:
            return self._decode(f.read(), repr(path[:100]), param)

    def check_count(self, n: int, param: str) -> None:
        if n > self.max_images:
            raise ServeError(f"{n} images in one request; this server takes at most {self.max_images} "
                             "(--limit-mm-per-prompt)", param=param)  # fmt: skip

    def _decode(self, data: bytes, name: str, param: str):
        """Open (header only), check the pixel count, decode, convert to RGB."""
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
                with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                    w, h = im.size
                    if w * h > self.max_image_pixels:
                        raise ServeError(f"image {name} is {w}x{h} = {w * h} pixels, more than --max-image-pixels "
                                         f"{self.max_image_pixels}", param=param)  # fmt: skip
                    im.load()
                    return to_rgb(im, name)
        except Image.DecompressionBombError as e:
            raise ServeError(f"image {name} refused: {e}", param=param) from None
        except UnidentifiedImageError:
            raise ServeError(f"image {name} is not an image this server reads ({', '.join(FORMATS)})",
                             param=param) from None  # fmt: skip
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data; NaN pixels (to_rgb)
            raise ServeError(f"image {name} could not be decoded: {e}", param=param) from None


def _data_url_bytes(url: str, limit: int, param: str) -> bytes:
    """The bytes of a `data:[image/...];base64,...` URL, its size checked before decoding."""
    header, sep, payload = url.partition(",")
    media, _, encoding = header[len("data:"):].partition(";")
    if not sep or encoding != "base64":
        raise ServeError("a data: URL must be base64: data:image/jpeg;base64,...", param=param)
    if media and not media.startswith("image/"):
        raise ServeError(f"data: URL of type {media!r}; send an image (image/jpeg, image/png, ...)", param=param)
    if len(payload) * 3 // 4 > limit + 2:
        raise ServeError(f"image is about {len(payload) * 3 // 4} bytes, more than --max-image-bytes {limit}",
                         param=param)  # fmt: skip
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError("the data: URL's base64 payload is not valid base64", param=param) from None
    if len(data) > limit:
        raise ServeError(f"image is {len(data)} bytes, more than --max-image-bytes {limit}", param=param)
    return data
