"""Where benchmarks put what they measured: results/<name>.md (a table and its command) and .json."""
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def write_result(name: str, title: str, table: str, notes: str, data) -> None:
    """Print the table and write results/<name>.md and results/<name>.json."""
    print(table)
    RESULTS.mkdir(exist_ok=True)
    sys.path.insert(0, str(RESULTS.parent / "scripts"))
    from experiments.provenance import commit, portable

    command = "python " + portable(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
    at = commit()  # before this writes anything: its own .json would make every checkout read "-dirty"
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(f"# {title}\n\n{notes}\n\n{table}\n\nCommand: `{command}` (commit {at})\n")
