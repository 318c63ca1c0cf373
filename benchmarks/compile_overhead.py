"""torch.compile with and without a Monitor: wall time of 20 training steps of a compiled 17-layer sigmoid
MLP (inductor, one thread) and dynamo's compiled frames and graphs. One process per case (dynamo's state is
global); run with TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 so that each case compiles from scratch:

    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/compile_overhead.py plain
    TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 python benchmarks/compile_overhead.py monitored
"""

import sys
import time

import torch
from torch import nn
from torch._dynamo.utils import counters


def main(monitored: bool, steps: int = 20) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.Sigmoid()]
    for _ in range(7):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    compiled = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = None
    if monitored:
        import gradmedic as gm

        monitor = gm.Monitor(compiled, opt)
    start = time.perf_counter()
    for _ in range(steps):
        x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        if monitor is not None:
            monitor.step(loss)
        opt.step()
        opt.zero_grad()
    elapsed = time.perf_counter() - start
    names = monitor.trace.layers[:3] if monitor is not None else None
    print(f"{'monitored' if monitored else 'plain'}: {elapsed:.1f} s, frames {counters['frames']['total']}, "
          f"graphs {counters['stats']['unique_graphs']}, first layers {names}")


if __name__ == "__main__":
    main(len(sys.argv) > 1 and sys.argv[1] == "monitored")
