"""Data shared by the examples: scikit-learn's handwritten digits (they ship inside the package: no download).

Scripts in this folder import it as ``from _data import digits`` (Python puts a script's folder on its path).
"""

from __future__ import annotations

import torch


def digits(seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The 1,797 8x8 digits as 64 features in [0, 1] with their labels, split 70/15/15 by a seeded permutation.

    Returns:
        ``{"train": (x, y), "val": (x, y), "test": (x, y)}``; the same split for the same seed, on every rank.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    a, b = int(0.7 * len(y)), int(0.85 * len(y))
    return {name: (x[i], y[i]) for name, i in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:]))}
