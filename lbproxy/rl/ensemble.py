"""`lbproxy average OUT MODEL MODEL...`: K trained models as ONE network whose Q-values are their mean.

Why: models trained by the same command with different seeds fail on different clusters. Their
mean routes better than either in the tail, measured on the validation clusters
(benchmarks/results/general_model.md). The mean is exact and needs no new runtime. Every layer of
the Q-network (rl/network.py) is a linear map followed by an elementwise ReLU, and the pooling
(masked mean and max) works one channel at a time. So K networks side by side are one network K
times as wide, with block-diagonal weights:
- the layers that read a state's features stack their output channels;
- the layers between hidden channels are block-diagonal;
- the two output layers (score, value) concatenate their inputs and are divided by K.
The result is a plain QNetwork. It serves, evaluates, learns online and checkpoints like any other,
with the same weights-only format. Once it learns, its blocks are free to mix: it is just a wider
network that starts from the average.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lbproxy.observe import STATIC_CONTEXT
from lbproxy.rl.network import QNetwork

EXIT_USAGE = 2


def average_networks(nets: Sequence[QNetwork]) -> QNetwork:
    """One QNetwork whose Q-values are the mean of `nets`' (all of the same shape), for every state."""
    if not nets:
        raise ValueError("average_networks needs at least one network")
    h, s = nets[0].hidden, nets[0].summary
    if any(n.hidden != h or n.summary != s for n in nets):
        shapes = sorted({(n.hidden, n.summary) for n in nets})
        raise ValueError(f"networks of different shapes (hidden, summary) {shapes} cannot be averaged")
    k = len(nets)
    out = QNetwork(k * h, k * s)
    sds = [n.state_dict() for n in nets]
    new = {name: torch.zeros_like(v) for name, v in out.state_dict().items()}

    def stack(name: str) -> None:
        """A layer that reads the state: member j's output channels are block j."""
        new[name] = torch.cat([sd[name] for sd in sds], dim=0)

    def block(name: str, width_in: int, width_out: int) -> None:
        """A layer from hidden channels to hidden channels: member j's block j -> j."""
        for j, sd in enumerate(sds):
            new[name][j * width_out : (j + 1) * width_out, j * width_in : (j + 1) * width_in] = sd[name]

    for name in ("static.weight", "static.bias", "row_x.weight", "row_x.bias", "cluster.bias", "row2.bias"):
        stack(name)
    stack("value1.bias")
    block("row_u.weight", s, h)
    block("row2.weight", h, h)
    # cluster reads [mean z (k*s), max z (k*s), static context]: member j reads its own mean and max
    # blocks and the shared context.
    for j, sd in enumerate(sds):
        w = sd["cluster.weight"]  # (s, 2s + STATIC_CONTEXT)
        rows = slice(j * s, (j + 1) * s)
        new["cluster.weight"][rows, j * s : (j + 1) * s] = w[:, :s]
        new["cluster.weight"][rows, k * s + j * s : k * s + (j + 1) * s] = w[:, s : 2 * s]
        new["cluster.weight"][rows, 2 * k * s :] = w[:, 2 * s :]
        # value1 reads [u (k*s), dynamic context].
        v = sd["value1.weight"]  # (s, s + dynamic)
        new["value1.weight"][rows, j * s : (j + 1) * s] = v[:, :s]
        new["value1.weight"][rows, k * s :] = v[:, s:]
    for name in ("score", "value2"):
        new[f"{name}.weight"] = torch.cat([sd[f"{name}.weight"] for sd in sds], dim=1) / k
        new[f"{name}.bias"] = sum(sd[f"{name}.bias"] for sd in sds) / k
    assert new["cluster.weight"].shape[1] == 2 * k * s + STATIC_CONTEXT
    out.load_state_dict(new)
    return out.eval()


def load_member(path: Path) -> tuple[QNetwork, dict[str, Any]]:
    """A model file named on the command line (average, distill): CheckpointError, one line, when missing or bad."""
    from lbproxy.rl.checkpoint import CheckpointError, load_model

    if not path.is_file():
        raise CheckpointError(f"no model at {path}; pass dqn_final.pth files written by lbproxy --mode train")
    return load_model(path)


def main(argv: Sequence[str] | None = None) -> int:
    from lbproxy.rl.checkpoint import CheckpointError, save_model

    parser = argparse.ArgumentParser(
        prog="lbproxy average",
        description="Write ONE model whose Q-values are the mean of the given models' (same shape, e.g. the "
        "same training command with different --seed): a network K times as wide, served like any other.",
    )
    parser.add_argument("out", type=Path, help="model file to write (e.g. runs/avg/dqn_final.pth)")
    parser.add_argument("models", type=Path, nargs="+", help="dqn_final.pth models or training checkpoints")
    args = parser.parse_args(list(argv) if argv is not None else None)
    nets, metas = [], []
    try:
        for path in args.models:
            net, meta = load_member(path)
            nets.append(net)
            metas.append(meta)
        avg = average_networks(nets)
    except (CheckpointError, ValueError) as exc:
        print(f"lbproxy average: {exc}", file=sys.stderr)
        return EXIT_USAGE
    meta = {
        "trained_by": "lbproxy average",
        "averaged_from": [str(p) for p in args.models],
        "members": metas,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_model(args.out, avg, meta)
    print(f"lbproxy average: wrote {args.out} (mean of {len(nets)} models, hidden {avg.hidden}, summary {avg.summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
