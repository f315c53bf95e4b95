"""Saving matplotlib figures as PNG files, atomically, with no display needed."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI or GPU servers
import matplotlib.pyplot as plt  # noqa: E402

from vtw_eval.files import write_atomically  # noqa: E402


def png_bytes(figure: plt.Figure, dpi: int = 100, tight_rect: tuple = (0, 0, 1, 1)) -> bytes:
    """``figure`` as PNG bytes, laid out tight within ``tight_rect`` (room left for a legend below);
    the figure is closed."""
    png = io.BytesIO()
    figure.tight_layout(rect=tight_rect)
    figure.savefig(png, format="png", dpi=dpi)
    plt.close(figure)
    return png.getvalue()


def save_png(figure: plt.Figure, path: str | Path, dpi: int = 100, tight_rect: tuple = (0, 0, 1, 1)) -> Path:
    """Write ``figure`` to ``path`` as a PNG (never half-written) and close it."""
    write_atomically(Path(path), png_bytes(figure, dpi, tight_rect))
    return Path(path)
