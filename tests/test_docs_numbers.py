"""Numbers that cannot go stale: README.md's result tables are rendered from results/ (scripts/render_docs.py), and
every other decimal number in README.md and docs/ is found in a results file, or listed below with why it is not."""
import glob
import re
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import render_docs  # noqa: E402

NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")  # 52.42, 0.213; not versions (0.12.3.1) nor words (x1.0 is x + 1.0)

# (file, number): why it is in no results file
EXCEPTIONS = {
    ("docs/demo.md", "76.72"): "the demo's plan with one anchor, a superseded run stated as history",
    ("docs/findings.md", "80.67"): "the x20 noise plan with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "64.13"): "the x20 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "64.82"): "the x20 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "80.67"): "the x20 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "83.58"): "the x20 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "77.76"): "the x20 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "183.14"): "the x70 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "77.19"): "the x39 plans with one anchor, a superseded run stated as history",
    ("docs/reproducing.md", "38.05"): "a training log's valid ppl by epoch (the table holds the best epoch's)",
    ("docs/reproducing.md", "36.92"): "a training log's valid ppl by epoch (the table holds the best epoch's)",
    ("docs/reproducing.md", "36.60"): "a training log's valid ppl by epoch (the table holds the best epoch's)",
    ("docs/reproducing.md", "47.8"): "a training log's valid loss in the encoder's learning-rate screen",
    ("docs/reproducing.md", "1.44"): "the H100 run's files, whose records were not kept",
    ("docs/reproducing.md", "0.625"): "bits per weight of K=32 in blocks of 8 (5 bits / 8 weights), not a result",
    ("docs/reproducing.md", "0.875"): "bits per weight of a setting, not a result",
    ("docs/usage.md", "0.0001"): "a learning rate in a command",
    ("docs/numbers.md", "40.13"): "the paper-scale packed file's MB, written to two decimals from its bytes in results/paper_scale.md",
    ("docs/numbers.md", "28.8"): "a one-off profile by hand, said so where it is stated",
    ("docs/numbers.md", "10.03"): "the measured fraction of blocks a test run dropped, computed in the text from its counts",
}
# a percentage or ratio computed in the text from two numbers of a results file: (file, number)
DERIVED = {("docs/numbers.md", "8.9"), ("docs/reproducing.md", "8.2"), ("docs/reproducing.md", "8.5"), ("docs/reproducing.md", "16.5"),
           ("docs/reproducing.md", "10.7"), ("docs/reproducing.md", "4.9"), ("docs/reproducing.md", "7.2"),
           ("docs/reproducing.md", "13.7"), ("docs/reproducing.md", "18.3"), ("docs/reproducing.md", "15.8")}


def results_numbers() -> set:
    """Every decimal in results/ (md and json), and each json float as it reads at 1 to 4 decimals."""
    found = set()
    for path in glob.glob(str(REPO / "results" / "**" / "*"), recursive=True):
        if not path.endswith((".md", ".json")):
            continue
        text = open(path, encoding="utf-8").read()
        found.update(NUMBER.findall(text))
        for token in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text):
            value = abs(float(token))
            found.update(f"{value:.{digits}f}" for digits in range(1, 5))
    return found


def stated_numbers(text: str):
    """(line number, number) of each decimal outside the rendered blocks."""
    text = render_docs.BLOCK.sub("", text)
    for i, line in enumerate(text.splitlines(), 1):
        for number in NUMBER.findall(line):
            yield i, number


def test_readme_tables_are_what_results_render():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "render_docs.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_number_in_readme_and_docs_is_in_a_results_file():
    known = results_numbers()
    files = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
    unknown = [f"{name}:{line}: {number}" for name in files for line, number in stated_numbers((REPO / name).read_text(encoding="utf-8"))
               if number not in known and (name, number) not in EXCEPTIONS and (name, number) not in DERIVED]
    assert not unknown, f"result numbers found in no results file (render them, link them, or list why): {unknown}"
    stale = [key for key in (*EXCEPTIONS, *DERIVED) if key[1] not in {n for _, n in stated_numbers((REPO / key[0]).read_text(encoding="utf-8"))}]
    assert not stale, f"exceptions no longer stated (remove them): {stale}"


def test_the_check_catches_a_number_changed_by_hand(tmp_path):
    """The README's rendered table with one perplexity edited by hand: the check names the block."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert render_docs.rendered(readme, "README.md") == readme
    edited = readme.replace("| 64.51 (64.43 / 64.59) |", "| 63.51 (64.43 / 64.59) |", 1)
    assert edited != readme and render_docs.rendered(edited, "README.md") != edited
    outside = readme.replace("## The recipe", "## The recipe\n\nA result of 61.23 stated by hand.", 1)
    assert any(number == "61.23" for _, number in stated_numbers(outside)) and "61.23" not in results_numbers()


def test_the_readme_stays_a_front_door():
    """At most 130 lines, the recipe's commands in the first 80, no paragraph or bullet over 80 words."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 130
    recipe = text.split("## The recipe", 1)[1]
    block_end = text.index("```", text.index("```bash", text.index("## The recipe")) + 7)
    assert text[:block_end].count("\n") < 80 and "fairseq-train" in recipe
    prose = re.sub(r"```.*?```", "", render_docs.BLOCK.sub("", text), flags=re.S)
    for paragraph in re.split(r"\n\s*\n", prose):
        if paragraph.lstrip().startswith("|"):
            continue
        for item in re.split(r"\n(?=- )", paragraph):
            assert len(item.split()) <= 80, item[:80]
