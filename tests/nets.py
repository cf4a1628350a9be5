"""Hand-set Q-networks for tests: a backend's score is one feature column, so a test knows what the
network prefers (a backend is known by its behaviour only: no network can prefer a slot)."""

from __future__ import annotations

import torch

from lbproxy.rl.network import QNetwork


def column_net(column: int, sign: float, hidden: int = 16, net: QNetwork | None = None) -> QNetwork:
    """Score = sign x row[column] (the column is >= 0, so it passes the ReLUs); `net` is set in place."""
    net = net if net is not None else QNetwork(hidden=hidden)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.row_x.weight[0, column] = 1.0
        net.row2.weight[0, 0] = 1.0
        net.score.weight[0, 0] = sign
    return net
