"""Plots of evaluation results: the similarity matrix of a pair and the zero-shot confusion matrix (PNG files)."""

from __future__ import annotations

from typing import Any

import torch


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def similarity_plot(emb: dict[str, Any], pairs: list[tuple[str, str]], path: str, n: int = 32) -> None:
    """Cosine similarities of the first ``n`` samples of the first pair that has two, as an image (diagonal:
    matching pairs); nothing when no pair has two samples."""
    plt = pyplot()
    for a, b in pairs:
        (ea, pa), (eb, pb) = emb[a], emb[b]
        both = (pa & pb).nonzero()[:, 0][:n]
        if len(both) >= 2:
            break
    else:
        return
    sims = (ea[both] @ eb[both].T).numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(sims, cmap="viridis")
    ax.set_xlabel(f"{b} sample")
    ax.set_ylabel(f"{a} sample")
    ax.set_title(f"cosine similarity {a}-{b} (diagonal = matching pairs)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_plot(confusion: list[list[int]], classes: list[str], path: str) -> None:
    """The row-normalised confusion matrix [true, predicted] of a zero-shot classification."""
    plt = pyplot()
    m = torch.tensor(confusion, dtype=torch.float)
    m = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.35 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(m.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion (row-normalised)")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
