"""Short NICE tries on MNIST in [0, 1] (no logit): the base, the optimizer and the partition.

Prints the test log-likelihood (nats, the density of the dequantized data in [0, 1]^784, as
in the NICE paper) on 1000 random test images at the start and after ``--steps`` Adam steps
on mini-batches of 100, one thread. The numbers on the Reproducibility page come from (on a
2-core x86_64 CPU, torch 2.13; the 150-step ones from an earlier copy of this script whose
logistic base was built by hand, so they may differ in the last digits)

    python benchmarks/reproduce/nice_tries.py --steps 150 --base normal            # -82549 at the start
    python benchmarks/reproduce/nice_tries.py --steps 150 --base normal --no-init  # -626 after 150
    python benchmarks/reproduce/nice_tries.py --steps 150                          # 953 at the start, 1237 after
    python benchmarks/reproduce/nice_tries.py --steps 300 --beta2 0.99 --eps 1e-4            # halves: 1321.7
    python benchmarks/reproduce/nice_tries.py --steps 300 --beta2 0.99 --eps 1e-4 --odd-even # 1349.1
    python benchmarks/reproduce/nice_tries.py --steps 150 --beta2 0.01 --eps 1e-4            # NaN
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from pyro_lvm import FlowModel
from pyro_lvm.data import read_idx

MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--base", default="logistic", choices=["normal", "logistic"])
    parser.add_argument("--beta2", type=float, default=0.999)
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument("--no-init", action="store_true", help="no data initialization of the diagonal scaling")
    parser.add_argument("--odd-even", action="store_true", help="couple odd and even pixels (the paper's split: mask 'alternate')")
    parser.add_argument("--data", default=str(MNIST))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    load = lambda name: torch.tensor(read_idx(Path(args.data) / name)).reshape(-1, 784).float() / 255  # noqa: E731
    train, test = load("train-images-idx3-ubyte.gz"), load("t10k-images-idx3-ubyte.gz")
    test = test[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:1000]]
    # --odd-even: the "alternate" mask (the docs' 1349.1 came from an earlier copy that reordered
    # the pixels evens-then-odds under the "half" mask: the same flow, see
    # tests/flows/test_flows_coupling.py::test_alternate_mask_is_the_half_mask_on_entries_ordered_evens_first)
    flow = FlowModel(784, "nice", hidden=[1000] * 5, dequantize=256, base=args.base,
                     mask="alternate" if args.odd_even else "half")
    if args.no_init:
        for module in flow.modules():
            if hasattr(module, "initialized"):
                module.initialized.fill_(True)
    else:
        flow.initialize(train[:100])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3, betas=(0.9, args.beta2), eps=args.eps)
    offset = 784 * math.log(256)  # log P(levels) -> density of y in [0, 1]^784

    def test_ll() -> float:
        with torch.no_grad():
            return float(flow.log_likelihood(test).mean()) + offset

    print(f"start: test log-likelihood {test_ll():.1f}", flush=True)
    for step in range(1, args.steps + 1):
        x = train[torch.randint(0, len(train), (100,))]
        loss = -flow.log_prob(flow.dequantize(x)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}: train log-likelihood {-float(loss.detach()):.1f}", flush=True)
    print(f"after {args.steps} steps: test log-likelihood {test_ll():.1f}", flush=True)


if __name__ == "__main__":
    main()
