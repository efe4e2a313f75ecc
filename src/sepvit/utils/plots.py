"""Figures as PNG files: matplotlib without a display, written atomically."""

from __future__ import annotations

from pathlib import Path

from sepvit.utils.extras import require
from sepvit.utils.files import write_atomically


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    require("matplotlib", "train").use("Agg")
    return require("matplotlib.pyplot", "train")


def save_figure(figure, path: Path) -> Path:
    write_atomically({path: lambda temp: figure.savefig(temp, dpi=120, format="png")})
    return path
