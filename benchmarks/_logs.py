"""What benchmarks read back from the processes they start: tagged numbers, peak memory, fairseq's words/s."""
import re

# appended to a benchmark's child-process code: its peak resident memory, read back with ``logged("MAXRSS_KB", ...)``
PRINT_PEAK_RSS = 'import resource; print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)'


def logged(name: str, text: str) -> float:
    """The last ``NAME <number>`` line a child printed (a run that logs twice reports its final value)."""
    found = re.findall(rf"{name} ([\d.]+)", text)
    if not found:
        raise SystemExit(f"no '{name} <number>' line in the process's output: {text[-2000:]}")
    return float(found[-1])


def train_wps(text: str) -> list[float]:
    """fairseq-train's words/s of each logged interval (``train_inner ... wps=``), in order."""
    return [float(wps) for wps in re.findall(r"train_inner .*? wps=([\d.]+)", text)]
