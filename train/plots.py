"""PNG pictures of a run: training curves and the validation confusion matrix."""

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_curves(history: list[dict], path: str):
    """Draw loss, accuracy and learning rate per epoch of `history` side by side into a PNG at `path`."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], label="train")
    ax_acc.plot(epochs, [r["val_acc"] for r in history], label="val")
    ax_acc.set(
        title="accuracy", xlabel="epoch", ylim=(max(0.0, min(r["val_acc"] for r in history) - 0.05), 1.0)
    )
    ax_lr.plot(epochs, [r["lr"] for r in history])
    ax_lr.set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # whatever the name ends with
    plt.close(fig)


def plot_confusion(confusion: np.ndarray, class_names: list[str], path: str, title: str = "validation"):
    """Draw the confusion matrix (counts in the cells up to 30 classes) into a PNG at `path`."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, n * 0.5 + 2), max(4, n * 0.5 + 1)))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title=f"{title} confusion matrix (acc {np.trace(confusion) / max(confusion.sum(), 1):.4f})",
    )
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if confusion[i, j] > confusion.max() / 2 else "black",
                    )
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # whatever the name ends with
    plt.close(fig)
