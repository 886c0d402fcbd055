"""What every report of rlzoo shares (the leaderboard's and the audit's): the confidence level and the two
intervals built on it, Markdown and HTML tables, the provenance block and JSON that holds numpy values.

A table is (title, note, header, rows) with rows of strings; a report section is a (Markdown, HTML) pair, which
the bench hands to the leaderboard page (``write_leaderboard(sections=...)``) so that neither report imports the other.
"""

from __future__ import annotations

import html
import math
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats

import rlzoo

CONFIDENCE = 0.95  # of every interval rlzoo reports
ALPHA = 1 - CONFIDENCE  # the level of every test

Table = tuple[str, str, list[str], list[list[str]]]  # (title, note, header, rows)


# ----------------------------------------------------------------------------------------- intervals


def mean_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided t confidence interval, n) of the finite values; half-width is
    nan for fewer than two values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, 0
    if n == 1:
        return float(x[0]), math.nan, 1
    sem = x.std(ddof=1) / math.sqrt(n)
    return float(x.mean()), float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sem), n


def bootstrap_ci(scores, clusters, resamples: int = 2000, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Mean of ``scores`` and its percentile-bootstrap interval, resampling whole clusters (problems) with
    replacement. No interval (None) with fewer than 2 clusters."""
    scores, clusters = np.asarray(scores, dtype=float), np.asarray(clusters)
    if len(scores) == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "clusters": 0}
    _, cluster = np.unique(clusters, return_inverse=True)
    sums, counts = np.bincount(cluster, weights=scores), np.bincount(cluster)
    ci = [None, None]
    if len(sums) > 1:
        picks = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))  # [R, C]
        means = sums[picks].sum(1) / counts[picks].sum(1)  # [R]
        ci = [float(q) for q in np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])]
    return {"mean": float(scores.mean()), "ci": ci, "n": int(len(scores)), "clusters": int(len(sums))}


def ci_text(m: dict, digits: int = 3) -> str:
    """A ``bootstrap_ci`` result as "mean [lo, hi]" ("–" without data, the mean alone without an interval)."""
    if m["mean"] is None:
        return "–"
    lo, hi = m["ci"]
    return f"{m['mean']:.{digits}f}" + (f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None else "")


# ------------------------------------------------------------------------------------------- tables


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def md_tables(tables: list[Table], level: int = 2) -> list[str]:
    """Markdown lines of each table under its title (a heading of ``level``) and note."""
    lines = []
    for title, note, header, rows in tables:
        lines += [f"{'#' * level} {title}", "", note, "", md_table(header, rows), ""]
    return lines


def html_tables(tables: list[Table], level: int = 2) -> list[str]:
    """HTML parts of each table under its title (``<h{level}>``) and note."""
    return [f"<h{level}>{html.escape(title)}</h{level}><p>{html.escape(note)}</p>{html_table(header, rows)}"
            for title, note, header, rows in tables]


# ------------------------------------------------------------------------------ provenance and JSON


# Only torch is pinned at install; these are lower-bounded, so their installed versions are part of what made a
# result (README, "Reproducibility and dependency versions"; benchmarks/constraints.txt pins them to reproduce it).
PROVENANCE_PACKAGES = ("torch", "transformers", "tokenizers", "math-verify", "deepspeed", "datasets", "numpy", "scipy",
                       "gin-config")


def provenance(command: str) -> dict:
    """Where and from what this leaderboard was made, including the installed versions of PROVENANCE_PACKAGES
    (None for one that is not installed)."""
    from importlib import metadata

    src = Path(rlzoo.__file__).resolve().parent.parent

    def installed(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = math.nan
    return {
        "command": command,
        "git_commit": commit or "unknown (not a git checkout)",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": f"{os.cpu_count()} cores, {cpu}, {mem_gib:.0f} GiB RAM, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "rlzoo_version": rlzoo.__version__,
        **{name: installed(name) for name in PROVENANCE_PACKAGES},
    }


def jsonable(x):
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x
