"""Decode windows on the device: `eager_decode` launches each step from Python (the reference, and what CPU runs);
`GraphedDecode`, the cuda_graphs fast path, captures the step once per padded batch size as a CUDA graph and replays
it, one launch per step instead of hundreds of kernels. Both take ssd.py's `step(tokens, positions, tables, seq_ids)`,
which returns the next tokens, and return (steps, rows) drawn tokens; they draw the same ones (tests/test_graphs.py).
"""

import torch

from .fast_paths import FAST_PATHS, fall_back

GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # CUDA: a decode batch is padded up to one of these (or to rows)


class GraphedDecode:
    """CUDA: the decode step captured once per padded batch size as a CUDA graph, then replayed: a step launches one
    graph instead of hundreds of kernels from Python. Inputs live in static buffers; padding rows point at block 0."""

    def __init__(self, step, width: int, rows: int, device):
        self.step, self.width, self.device, self.graphs, self.pool = step, width, device, {}, None
        self.sizes = sorted({s for s in GRAPH_BATCHES if s < rows} | {rows})
        self.eager = eager_decode(step)

    def __call__(self, tokens, positions, tables, seq_ids, steps: int) -> torch.Tensor:
        n = len(tokens)
        size = next(s for s in self.sizes if s >= n)
        if size not in self.graphs and FAST_PATHS["cuda_graphs"]:
            try:
                self.capture(size)
            except Exception as e:  # nothing ran in the capture: the eager steps start from the same state
                fall_back("cuda_graphs", e, f"to capture a decode graph of {size} rows")
        if not FAST_PATHS["cuda_graphs"]:
            return self.eager(tokens, positions, tables, seq_ids, steps)
        graph, buf = self.graphs[size]
        for name, value in (("tokens", tokens), ("positions", positions), ("seq_ids", seq_ids)):
            buf[name].zero_()
            buf[name][:n] = value
        buf["tables"].zero_()
        buf["tables"][:n, :tables.shape[1]] = tables
        out = torch.empty(steps, n, dtype=torch.long, device=self.device)
        for s in range(steps):
            graph.replay()
            out[s] = buf["tokens"][:n]
        return out

    def capture(self, size: int):
        buf = {name: torch.zeros(size, dtype=torch.long, device=self.device) for name in ("tokens", "positions",
                                                                                           "seq_ids")}
        buf["tables"] = torch.zeros(size, self.width, dtype=torch.int32, device=self.device)

        def body():
            buf["tokens"].copy_(self.step(buf["tokens"], buf["positions"], buf["tables"], buf["seq_ids"]))
            buf["positions"].add_(1)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up outside the capture: Triton compiles, workspaces are allocated
            body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            body()
        self.pool = graph.pool()  # every batch size's graph shares one memory pool
        self.graphs[size] = (graph, buf)


def eager_decode(step):
    """CPU (and anywhere without CUDA graphs): the same steps, launched from Python."""
    def run(tokens, positions, tables, seq_ids, steps: int) -> torch.Tensor:
        out = []
        for _ in range(steps):
            tokens = step(tokens, positions, tables, seq_ids)
            positions = positions + 1
            out.append(tokens)
        return torch.stack(out)
    return run
