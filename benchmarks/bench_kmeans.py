"""Our k-means against fairseq's reference EM (fairseq.modules.quantization.pq.PQ), same weights.

For each weight matrix (block size 8, 256 centroids, the same number of iterations) it times
fairseq's EM, our faiss backend and our torch backend, and reports the final objective
||W - decode(W)||^2 of each. Prints a table and writes results/bench_kmeans.{md,json}.

    python benchmarks/bench_kmeans.py [--sizes 1024x1024 4096x1024] [--iters 15]
Weights: a trained layer when a demo checkpoint exists (real weights), else Gaussian.
"""
import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from quant_noise_plugin.kmeans import kmeans  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402


def weights(shape, seed=0):
    """Real trained weights where the demo left a checkpoint (FFN layers), tiled to ``shape``."""
    found = sorted((REPO / "checkpoints/demo").glob("dense-*/checkpoint_last.pt"))
    g = torch.Generator().manual_seed(seed)
    if found:
        ckpt = found[-1]
        import argparse as ap

        torch.serialization.add_safe_globals([ap.Namespace])
        state = torch.load(ckpt, map_location="cpu")["model"]
        parts = [v.float().reshape(-1) for k, v in state.items() if k.endswith(("fc1.weight", "fc2.weight"))]
        flat = torch.cat(parts)
        n = shape[0] * shape[1]
        reps = -(-n // flat.numel())
        return flat.repeat(reps)[:n].reshape(shape), "demo FFN weights"
    return torch.randn(shape, generator=g) * 0.05, "gaussian"


def objective(w, decoded):
    return float(((w - decoded) ** 2).sum())


def run(shape, iters, block_size=8, k=256):
    from fairseq.modules.quantization.pq.pq import PQ

    w, source = weights(shape)
    row = {"shape": f"{shape[0]}x{shape[1]}", "weights": source, "iters": iters}
    torch.manual_seed(0)
    start = time.perf_counter()
    ref = PQ(w.clone(), block_size, n_centroids=k, n_iter=iters, verbose=False)
    ref.encode()
    row["fairseq_em_s"] = time.perf_counter() - start
    row["fairseq_em_objective"] = objective(w, ref.decode())
    blocks = w.reshape(-1, block_size)
    for backend in ("faiss", "torch"):
        start = time.perf_counter()
        result = kmeans(blocks, k, n_iter=iters, seed=0, backend=backend)
        row[f"{backend}_s"] = time.perf_counter() - start
        row[f"{backend}_objective"] = objective(w, result.centroids[result.assignments].reshape(shape))
        row[f"{backend}_speedup"] = row["fairseq_em_s"] / row[f"{backend}_s"]
        row[f"{backend}_objective_ratio"] = row[f"{backend}_objective"] / row["fairseq_em_objective"]
    # objective: activations (issue 31): each column weighted by its input's second moment; log-normal weights
    # spanning the ~100x range the demo LM's calibration moments span. Timed against the plain torch k-means.
    g = torch.Generator().manual_seed(1)
    columns = torch.exp(torch.randn(1, shape[1], generator=g))
    importance = columns.expand(shape).reshape(-1, block_size)
    start = time.perf_counter()
    weighted = kmeans(blocks, k, n_iter=iters, seed=0, backend="torch", importance=importance)
    row["weighted_s"] = time.perf_counter() - start
    row["weighted_time_ratio"] = row["weighted_s"] / row["torch_s"]
    decoded = weighted.centroids[weighted.assignments].reshape(shape)
    plain = kmeans(blocks, k, n_iter=iters, seed=0, backend="torch")
    weighted_error = lambda d: float((columns * (w - d) ** 2).sum())  # noqa: E731
    row["weighted_error_ratio"] = weighted_error(decoded) / weighted_error(plain.centroids[plain.assignments].reshape(shape))
    return row


def main():
    logging.disable(logging.INFO)
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["1024x1024", "4096x1024"])
    parser.add_argument("--iters", type=int, nargs="+", default=[15], help="iterations, one for all sizes or one per size")
    args = parser.parse_args()
    iters = args.iters * len(args.sizes) if len(args.iters) == 1 else args.iters
    if len(iters) != len(args.sizes):
        parser.error("--iters: give one value, or one per --sizes entry")
    rows = []
    for size, n_iter in zip(args.sizes, iters):
        shape = tuple(int(s) for s in size.split("x"))
        print(f"running {size}, {n_iter} iterations ...", flush=True)
        rows.append(run(shape, n_iter))
    header = ("| weight | iters | fairseq EM | ours faiss | ours torch | speedup faiss / torch | objective ratio faiss / torch (vs EM) "
              "| torch, activation-weighted | its time / torch's | its weighted error / plain k-means' |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} ({r['weights']}) | {r['iters']} | {r['fairseq_em_s']:.1f} s | {r['faiss_s']:.2f} s | {r['torch_s']:.2f} s "
            f"| x{r['faiss_speedup']:.0f} / x{r['torch_speedup']:.0f} | {r['faiss_objective_ratio']:.4f} / {r['torch_objective_ratio']:.4f} "
            f"| {r['weighted_s']:.2f} s | x{r['weighted_time_ratio']:.2f} | {r['weighted_error_ratio']:.3f} |"
        )
    table = "\n".join(lines)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    write_result(
        "bench_kmeans", "k-means: ours vs fairseq's reference EM", table,
        f"block size 8, 256 centroids; objective = ||W - decode(W)||^2 (ratio < 1: ours is better). The activation-weighted "
        f"k-means (`objective: activations`) weighs each column by a log-normal stand-in for its input's second moment; "
        f"its error is that weighted one, against the plain k-means' on the same weights. Machine: {machine}.",
        {"machine": machine, "rows": rows},
    )


if __name__ == "__main__":
    main()
