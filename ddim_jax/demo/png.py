"""Image grids for the demo, written as PNG files through Pillow."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["write_png", "image_grid"]


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Writes an 8-bit grayscale ``(H, W)`` or RGB ``(H, W, 3)`` uint8 image as a PNG file (Pillow).

    Example:
      >>> import os, tempfile, numpy as np
      >>> from PIL import Image
      >>> from ddim_jax.demo.png import write_png
      >>> path = os.path.join(tempfile.mkdtemp(), "x.png")
      >>> write_png(path, np.zeros((4, 6), np.uint8))
      >>> Image.open(path).size, Image.open(path).mode
      ((6, 4), 'L')
    """
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8, got dtype {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be non-empty, got shape {image.shape}")
    Image.fromarray(image, "L" if image.ndim == 2 else "RGB").save(path, format="PNG", optimize=True)


def image_grid(images: np.ndarray, ncols: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tiles ``(N, H, W)`` or ``(N, H, W, 1)`` images in [0, 1] into one uint8 grid image.

    Each image is upscaled ``scale`` times (nearest) and framed by ``pad`` pixels of gray.

    Example:
      >>> import numpy as np
      >>> from ddim_jax.demo.png import image_grid
      >>> image_grid(np.zeros((6, 8, 8, 1)), ncols=3, scale=2, pad=1).shape
      (35, 52)
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, 1), got {images.shape}")
    if ncols < 1 or scale < 1 or pad < 0:
        raise ValueError(f"need ncols >= 1, scale >= 1, pad >= 0, got {ncols}, {scale}, {pad}")
    n, h, w = images.shape
    nrows = -(-n // ncols)
    tiles = np.kron(np.clip(images, 0.0, 1.0), np.ones((scale, scale), np.float32))
    th, tw = h * scale, w * scale
    grid = np.full((nrows * (th + pad) + pad, ncols * (tw + pad) + pad), 0.5, np.float32)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        grid[y : y + th, x : x + tw] = tiles[i]
    return np.round(grid * 255).astype(np.uint8)
