"""CUDA correctness and speed of the plain-torch parts (noise, scalar, k-means, PQ layers).

Run on a machine with a GPU (no fairseq needed):  python benchmarks/gpu_check.py [--out DIR]
Prints a table and writes gpu_check.json. Each check compares CUDA against the CPU result.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quant_noise_plugin.kmeans import kmeans  # noqa: E402
from quant_noise_plugin.noise import pq_noise, scalar_noise  # noqa: E402
from quant_noise_plugin.pq import PQCodebook  # noqa: E402
from quant_noise_plugin.quant_noise import QuantNoiseConfig, apply_quant_noise_  # noqa: E402
from quant_noise_plugin.scalar import fake_quantize  # noqa: E402


def timed(fn, repeat=1):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeat


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    torch.manual_seed(0)

    # 1. PQ noise on CUDA: fraction dropped, unbiased scale, weights untouched, gradients flow.
    w = torch.randn(4096, 1024, device=dev).abs() + 0.1
    noised = pq_noise(w, 0.1, 8)
    dropped = (noised.reshape(4096, 128, 8) == 0).all(-1).float().mean().item()
    model = nn.Sequential(nn.Embedding(1000, 512), nn.Linear(512, 2048), nn.ReLU(), nn.Linear(2048, 512)).to(dev)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_quant_noise_(model, QuantNoiseConfig(pq=0.1, pq_block_size=8, scalar=0.5, scalar_bits=4))
    x = torch.randint(0, 1000, (64, 32), device=dev)
    for _ in range(20):
        model(x).sum().backward()
    unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    grads = all(p.grad is not None and p.grad.abs().sum().item() > 0 for p in model.parameters())
    results["pq_noise_dropped_fraction(p=0.1)"] = round(dropped, 4)
    results["weights_unchanged_after_20_forwards"] = unchanged
    results["gradients_reach_weights"] = grads

    # 2. Scalar fake quantization: CUDA equals CPU.
    # Values exactly halfway between two levels may round either way on the two devices (x/scale
    # is computed by different kernels), so report how many differ and by how many steps.
    from quant_noise_plugin.scalar import affine_params

    wc = torch.randn(1024, 1024) * 2
    for bits in (4, 8):
        for per_channel in (False, True):
            diff = (fake_quantize(wc.to(dev), bits, per_channel).cpu() - fake_quantize(wc, bits, per_channel)).abs()
            step, _ = affine_params(wc, bits, per_channel)
            label = f"scalar_int{bits}_{'channel' if per_channel else 'tensor'}"
            results[f"{label}_cuda_vs_cpu_differing_fraction"] = float((diff > 1e-5).float().mean())
            results[f"{label}_cuda_vs_cpu_max_diff_in_steps"] = round(float((diff / step).max()), 4)
    sn = scalar_noise(wc.to(dev), 1.0, 8)
    results["scalar_noise_p1_is_fake_quant"] = torch.equal(sn.cpu(), fake_quantize(wc.to(dev), 8).cpu())

    # 3. k-means on CUDA (torch backend) against the same algorithm on CPU, 4096x1024, bs=8, K=256.
    weight = torch.randn(4096, 1024)
    blocks = weight.reshape(-1, 8)
    gpu, t_gpu = timed(lambda: kmeans(blocks.to(dev), 256, n_iter=20, seed=0, backend="torch"))
    start = time.perf_counter()
    cpu = kmeans(blocks, 256, n_iter=20, seed=0, backend="torch")
    t_cpu = time.perf_counter() - start
    results["kmeans_4096x1024_bs8_K256_20it_cuda_s"] = round(t_gpu, 3)
    results["kmeans_4096x1024_bs8_K256_20it_cpu16_s"] = round(t_cpu, 3)
    results["kmeans_objective_cuda_vs_cpu_rel_diff"] = round(abs(gpu.objective - cpu.objective) / cpu.objective, 5)
    hist = gpu.history
    results["kmeans_cuda_objective_monotone"] = all(b <= a * (1 + 1e-5) for a, b in zip(hist, hist[1:]))

    # 4. PQ layer: forward and mean-gradient backward identical on CUDA and CPU.
    cb = PQCodebook((1024, 1024), 8, 256)
    cb.fit(weight[:1024], n_iter=5, backend="torch")
    cb_gpu = PQCodebook((1024, 1024), 8, 256).to(dev)
    cb_gpu.load_state_dict({k: v.to(dev) for k, v in cb.state_dict().items()})
    g = torch.randn(1024, 1024)
    (cb() * g).sum().backward()
    (cb_gpu() * g.to(dev)).sum().backward()
    results["pq_forward_cuda_equals_cpu"] = torch.equal(cb_gpu().detach().cpu(), cb().detach())
    results["pq_centroid_grad_cuda_vs_cpu_max_abs"] = float((cb_gpu.centroids.grad.cpu() - cb.centroids.grad).abs().max())

    # 5. Speed: training steps of a 6-layer FFN stack (4096x1024 and 1024x4096 Linears), bf16 autocast.
    def stack():
        torch.manual_seed(0)
        layers = []
        for _ in range(6):
            layers += [nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)]
        return nn.Sequential(*layers).to(dev)

    inp = torch.randn(8192, 1024, device=dev)
    speeds = {}
    try:  # fairseq's own in-place noise, when its wheel is installed on the device
        from fairseq.modules.quant_noise import quant_noise as fairseq_quant_noise
    except ImportError:
        fairseq_quant_noise = None
    pq_cfg, scalar_cfg = QuantNoiseConfig(pq=0.1, pq_block_size=8), QuantNoiseConfig(scalar=0.5, scalar_bits=8)
    runs = [("none", None, None), ("pq_noise_0.1", pq_cfg, "1"), ("pq_noise_0.1_unfused", pq_cfg, "0"),
            ("scalar_noise_0.5_int8", scalar_cfg, "1"), ("scalar_noise_0.5_int8_unfused", scalar_cfg, "0")]
    if fairseq_quant_noise is not None:
        runs.append(("fairseq_builtin_pq_0.1", "fairseq", None))
    for label, cfg, fused in runs:
        net = stack()
        if fused is not None:
            os.environ["QUANT_NOISE_FUSED"] = fused
        if cfg == "fairseq":
            for i, layer in enumerate(net):
                if isinstance(layer, nn.Linear):
                    net[i] = fairseq_quant_noise(layer, 0.1, 8)
        elif cfg is not None:
            apply_quant_noise_(net, cfg)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(inp).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        _, t = timed(step, repeat=20)
        speeds[label] = t
        results[f"train_step_ms_{label}"] = round(1000 * t, 3)
    os.environ.pop("QUANT_NOISE_FUSED", None)
    for label in speeds:
        if label != "none":
            results[f"{label}_throughput_ratio"] = round(speeds["none"] / speeds[label], 3)

    # 5b. The fused noise draws the same mask and computes the same values as the unfused ops, on CUDA too.
    wg = torch.randn(1024, 1024, device=dev, requires_grad=True)
    same = []
    for fn, extra in ((pq_noise, (0.1, 8)), (scalar_noise, (0.5, 4, True))):
        a = fn(wg, *extra, torch.Generator(device=dev).manual_seed(1), fused=True)
        b = fn(wg, *extra, torch.Generator(device=dev).manual_seed(1), fused=False)
        same.append(torch.equal(a, b))
    results["fused_noise_equals_unfused_on_cuda"] = all(same)

    # 6. Inference with a PQ layer (weight gathered from the codebook each forward) vs dense.
    from quant_noise_plugin.weight_swap import add_weight_fn  # what compressed.attach_provider installs

    dense_layer = nn.Linear(1024, 4096).to(dev).eval()
    pq_layer = nn.Linear(1024, 4096).to(dev).eval()
    codebook = PQCodebook((4096, 1024), 8, 256).to(dev)
    codebook.fit(pq_layer.weight, n_iter=5, backend="torch")
    add_weight_fn(pq_layer, lambda _stored: codebook())
    pq_layer._parameters["weight"] = None  # inference holds the codebook only
    xin = torch.randn(8192, 1024, device=dev)
    with torch.no_grad():
        _, t_dense = timed(lambda: dense_layer(xin), repeat=50)
        _, t_pq = timed(lambda: pq_layer(xin), repeat=50)
    results["pq_linear_4096x1024_forward_ms"] = round(1000 * t_pq, 3)
    results["dense_linear_4096x1024_forward_ms"] = round(1000 * t_dense, 3)
    results["pq_vs_dense_inference_speed_ratio"] = round(t_dense / t_pq, 3)

    # 7. k-means of a large layer on the GPU: 4096x4096, bs=8, K=256 (2M blocks), 20 iterations.
    big = torch.randn(4096 * 4096 // 8, 8, device=dev)
    _, t_big = timed(lambda: kmeans(big, 256, n_iter=20, seed=0, backend="torch"))
    results["kmeans_4096x4096_bs8_K256_20it_cuda_s"] = round(t_big, 3)

    width = max(map(len, results))
    for k, v in results.items():
        print(f"{k:{width}s}  {v}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
