"""Images as the models see them: 8-bit RGB, whatever the file's pixel format (shared by the engine, the
harness's backends and the CLIP scorer)."""

from __future__ import annotations


def to_rgb(im, name: str):
    """`im` as 8-bit RGB. PIL's convert("RGB") clips every mode to 0..255 without scaling, so a 16-bit or
    32-bit integer image comes out all white and a float image in [0, 1] all black: those are scaled here.
    An image no scaling can render (NaN or infinite pixels) is a ValueError naming it and its mode, so
    callers fail that image rather than show a blank picture."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        import numpy as np
        from PIL import Image

        pixels = np.asarray(im)
        if mode == "F":
            pixels = pixels.astype(np.float64)
            if not np.isfinite(pixels).all():
                raise ValueError(f"image {name}: mode F (32-bit float) with NaN or infinite pixels cannot be shown "
                                 "as 8-bit RGB; save it as an 8- or 16-bit image")  # fmt: skip
            lo, hi = float(pixels.min()), float(pixels.max())
            # Floats in [0, 1] are the usual normalized intensities: x 255, as every tool shows them.
            # Any other range has no agreed meaning: stretch min..max over 0..255 (a constant image: 0).
            scaled = pixels * 255.0 if lo >= 0.0 and hi <= 1.0 else (pixels - lo) * (255.0 / (hi - lo or 1.0))
            eight = np.rint(scaled).astype(np.uint8)
        else:
            pixels = pixels.astype(np.int64)
            lo, hi = int(pixels.min()), int(pixels.max())
            if lo >= 0 and hi <= 65535:
                # A 16-bit file spans 0..65535 whatever its content, so /257 maps it exactly onto 0..255
                # (65535 -> 255, 257k -> k), as ImageMagick and libvips do; scaling by the image's own max
                # would brighten dark images. Mode "I" in this range is a 16-bit PNG in older Pillows.
                eight = ((pixels + 128) // 257).astype(np.uint8)
            else:
                # 32-bit integers beyond 16 bits have no fixed full scale: stretch min..max over 0..255.
                eight = ((pixels - lo) * 255 // (hi - lo or 1)).astype(np.uint8)
        return Image.fromarray(eight, "L").convert("RGB")
    return im.convert("RGB")
