"""Result tables the notebooks save, each under a stable name in ``figures/``.

Importing this module also makes pandas print plain-text tables one line per row instead of
wrapping them at 80 columns: where a table wraps would otherwise depend on the width of the
numbers in it, which the notebook tests mask (they compare the text around the numbers). The
HTML view in JupyterLab is unaffected.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cirlib.core.io import atomic_path

pd.set_option("display.width", 100_000)


def to_markdown(df: pd.DataFrame, floatfmt: str = "{:.2f}", na_rep: str = "nan") -> str:
    """A GitHub-flavoured markdown table (pandas' own needs the optional ``tabulate``).

    Missing values print as ``na_rep``: ``"nan"`` by default, ``"—"`` where a column does not apply to a
    row (a metric one benchmark does not have)."""
    frame = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df
    cols = [" ".join(str(p) for p in c if str(p)) if isinstance(c, tuple) else str(c) for c in frame.columns]

    def fmt(v: object) -> str:
        if isinstance(v, (float, np.floating)) and np.isnan(v):
            return na_rep
        return floatfmt.format(v) if isinstance(v, (float, np.floating)) else str(v)

    rows = [[fmt(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, name: str, figdir: Path, floatfmt: str = "{:.2f}", na_rep: str = "nan") -> Path:
    """Save a result table as ``<name>.csv`` (machine-readable) and ``<name>.md`` (for the README).

    Missing values are empty cells in the CSV and ``na_rep`` in the markdown (:func:`to_markdown`)."""
    figdir = Path(figdir)
    with atomic_path(figdir / f"{name}.csv") as tmp:
        df.to_csv(tmp, float_format="%.4f")
    with atomic_path(figdir / f"{name}.md") as tmp:
        tmp.write_text(to_markdown(df, floatfmt, na_rep), encoding="utf-8")
    return figdir / f"{name}.csv"


def blank_missing(df: pd.DataFrame, mark: str = "—") -> pd.DataFrame:
    """``df`` for display with its missing values shown as ``mark`` (e.g. a metric a benchmark does not
    have), the other values unchanged: an object-dtype copy."""
    return df.astype(object).where(df.notna(), mark)
