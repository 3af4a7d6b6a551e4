"""Tabular regression in plain functions: features and prices come from one numpy table,
batches are slices of it, and the loss is MSE written by hand, ``((pred - y) ** 2).mean()``.
One price is missing (NaN) in the table: row 13, which is sample 3 of the third batch."""

import numpy as np
import torch
import torch.nn as nn

BATCH = 5


def load_table():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 4)).astype(np.float32)
    prices = (features.sum(1, keepdims=True) * 3 + 10).astype(np.float32)
    prices[13] = np.nan  # a missing value in the CSV
    return torch.from_numpy(features), torch.from_numpy(prices)


def mse(pred, target):
    return ((pred - target) ** 2).mean()  # LOSS_LINE


def train(model, features, prices, epochs=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(epochs):
        for i in range(0, len(features), BATCH):
            x, y = features[i : i + BATCH], prices[i : i + BATCH]
            loss = mse(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"batch {i // BATCH} loss {loss.item():.3f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    features, prices = load_table()
    train(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)), features, prices)
