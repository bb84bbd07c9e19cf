"""The run's figures: mean insertion/deletion curves, the paper's Fig. 5 conservation scatter and a Fig. 4-style
grid of maps. Matplotlib's Agg backend, so it works without a display."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .runner import Evaluation  # noqa: E402


def curves(ev: Evaluation, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(ev.results), 2)))
    for color, (name, r) in zip(colors, ev.results.items()):
        x = np.linspace(0, 1, r.insertion_curves.shape[1])
        style = "-" if name.startswith("ours-") else "--"
        axes[0].plot(x, r.insertion_curves.mean(0), style, color=color, label=f"{name} ({r.insertion.mean():.3f})")
        axes[1].plot(x, r.deletion_curves.mean(0), style, color=color, label=f"{name} ({r.deletion.mean():.3f})")
    for ax, title in zip(axes, ("Insertion (higher is better)", "Deletion (lower is better)")):
        ax.set_title(title)
        ax.set_xlabel("fraction of steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method (AUC)", title_fontsize=7)
    axes[0].set_ylabel("p(labelled class), mean over images")
    fig.suptitle(f"{ev.model}: {ev.n} images, step {ev.step} px", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def conservation(ev: Evaluation, path: Path) -> None:
    data = ev.conservation
    places = [k for k in ("input", "first block input", "last block input") if k in data]
    fig, axes = plt.subplots(1, len(places), figsize=(4.2 * len(places), 4.2), squeeze=False)
    p = data["p"]
    for ax, place in zip(axes[0], places):
        ax.scatter(p, data[place], s=6, alpha=0.5)
        lo, hi = min(0.0, data[place].min()), max(1.0, data[place].max())
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, label="ΣR = p(ŷ)")
        ax.set_xlabel("p(ŷ)")
        ax.set_ylabel(f"ΣR at {place}")
        ax.set_title(place)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{ev.model}: relevance sums of ours-iv (ratio split, identity included), one point per image",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmaps(ev: Evaluation, path: Path) -> None:
    """Rows: images; columns: the image, then each method's pixel map as ranked (after quantization where the
    method quantizes), red positive / blue negative, each map scaled by its own largest magnitude."""
    sample = ev.heatmaps
    images, maps = sample["images"], sample["maps"]
    names = list(maps)
    rows, cols = len(images), len(names) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows + 0.4), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).numpy())
        axes[i, 0].set_ylabel(sample["titles"][i], fontsize=7)
        for j, name in enumerate(names, 1):
            m = maps[name][i].numpy()
            scale = np.abs(m).max() or 1.0
            axes[i, j].imshow(m / scale, cmap="bwr", vmin=-1, vmax=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=6, rotation=30, ha="left")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(ev: Evaluation, out_dir: Path) -> list[Path]:
    written = []
    if ev.results:
        curves(ev, out_dir / "curves.png")
        written.append(out_dir / "curves.png")
    if ev.conservation:
        conservation(ev, out_dir / "conservation.png")
        written.append(out_dir / "conservation.png")
    if ev.heatmaps.get("maps") and len(ev.heatmaps["images"]):
        heatmaps(ev, out_dir / "heatmaps.png")
        written.append(out_dir / "heatmaps.png")
    return written
