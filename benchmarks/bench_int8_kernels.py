"""Which int8 matmul to build the w8a8 path on: the candidates torch offers on this CPU, against fp32.

Same inputs for every candidate, the Linear shapes of the KJV models (1024 tokens x 256 -> 1024 FFN,
1024 x 1024 -> 256, 1024 x 256 -> 13,144 the output projection), weights symmetric int8 per row,
inputs uint8 with a fixed scale (what calibration gives). Candidates:
- oneDNN ``torch.ops.onednn.qlinear_pointwise`` on plain int8/uint8 tensors (the input quantized by us:
  the time includes it) - what int8_linear.py uses;
- fbgemm ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (static input scale, fused input
  quantization), built on torch's quantized dtypes, deprecated since torch 2.13;
- fbgemm ``quantized::linear_dynamic`` (recomputes the input range at every call: not our numbers);
- ``torch._int_mm`` (int8 x int8 -> int32; the CPU path torchao's int8 configs take): its time leaves out
  the input quantization and the int32 -> fp32 scaling the others include, and symmetric int8 inputs
  lose one bit against uint8 ones.
Interleaved repeats, best of each; ratios against fp32 ``F.linear`` in the same run. Writes
results/bench_int8_kernels.{md,json}.

    python benchmarks/bench_int8_kernels.py [--repeat 5]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _results import write_result  # noqa: E402
from quant_noise_plugin.int8_linear import _onednn_linear, quantize_input  # noqa: E402

SHAPES = [(1024, 256, 1024), (1024, 1024, 256), (1024, 256, 13144)]


def timed(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def candidates(m: int, k: int, n: int):
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    w_scale = w.abs().amax(1) / 127
    w_int8 = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127).to(torch.int8)
    x_scale, x_zero_point = float((x.max() - x.min()) / 255), 128
    onednn = torch.ops.onednn.qlinear_prepack(w_int8, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 warns that quantized dtypes are deprecated
        qweight = torch._make_per_channel_quantized_tensor(w_int8, w_scale.double(), torch.zeros(n, dtype=torch.long), 0)
        fbgemm = torch.ops.quantized.linear_prepack(qweight, None)
    x_int8 = torch.clamp(torch.round(x / x_scale), -127, 127).to(torch.int8)
    w_int8_t = w_int8.t().contiguous()
    return {
        "fp32 F.linear": lambda: F.linear(x, w),
        "oneDNN qlinear_pointwise (+ input quantize)": lambda: _onednn_linear(quantize_input(x, x_scale, x_zero_point), x_scale, x_zero_point,
                                                                             onednn, w_scale, None),
        "fbgemm linear, static input (deprecated dtypes)": lambda: torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            x, x_scale, x_zero_point, fbgemm),
        "fbgemm linear_dynamic": lambda: torch.ops.quantized.linear_dynamic(x, fbgemm),
        "torch._int_mm (int32 out, no scaling)": lambda: torch._int_mm(x_int8, w_int8_t),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10, help="calls per timing")
    args = parser.parse_args()
    results = {}
    for shape in SHAPES:
        fns = candidates(*shape)
        best = {name: float("inf") for name in fns}
        for _ in range(args.repeat):  # interleaved: a slow moment hits every candidate alike
            for name, fn in fns.items():
                calls = 1 if name.startswith("torch._int_mm") else args.calls  # a reference loop on some CPUs
                best[name] = min(best[name], timed(fn, calls))
        results["x".join(map(str, shape))] = best
    names = list(next(iter(results.values())))
    lines = ["| candidate | " + " | ".join(f"{s} (tokens x in -> out)" for s in results) + " |", "|---|" + "---:|" * len(results)]
    for name in names:
        cells = [f"{r[name] * 1e3:.2f} ms (x{r['fp32 F.linear'] / r[name]:.2f})" for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = (f"Best of {args.repeat} interleaved repeats ({args.calls} calls each; `_int_mm` one), {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}. Each cell: time per call (speed vs fp32).")
    write_result("bench_int8_kernels", "int8 matmul candidates on this CPU (the w8a8 path's kernel)", "\n".join(lines), notes,
                 {s: {k: v for k, v in r.items()} for s, r in results.items()})


if __name__ == "__main__":
    main()
