"""benchmarks/mutation.py: the mutants it makes and the import hook that serves one (no fork, no test run)."""
import ast
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import mutation  # noqa: E402


def test_each_mutant_changes_one_line_and_still_parses():
    mutants = mutation.mutants_of("bitpack")
    original = (REPO / "quant_noise_plugin" / "bitpack.py").read_text().splitlines()
    assert len(mutants) > 40 and len({m.after for m in mutants}) == len(mutants)
    for m in mutants:
        lines = m.source.splitlines()
        assert len(lines) == len(original) and [i for i, (a, b) in enumerate(zip(original, lines)) if a != b] == [m.line - 1]
        ast.parse(m.source)
    kinds = {m.operator for m in mutants}
    assert {"number+1", "number-1", "LtE->Lt", "Mult->Div", "drop Not", "And->Or"} <= kinds
    assert "empty loop" in {m.operator for m in mutation.mutants_of("schedule")}
    assert not any('"""' in m.before for m in mutants)  # docstrings are not behaviour


def test_the_hook_serves_the_mutated_source_under_the_module_s_name():
    mutant = next(m for m in mutation.mutants_of("bitpack") if m.after.strip() == "return max((0), math.ceil(math.log2(n_values)))")
    hook = mutation._MutatedSource("quant_noise_plugin.bitpack", REPO / "quant_noise_plugin" / "bitpack.py", mutant.source)
    spec = hook.find_spec("quant_noise_plugin.bitpack", None)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.bits_for(1) == 0 and module.bits_for(256) == 8  # the mutant's, not the file's
    assert hook.find_spec("quant_noise_plugin.pq", None) is None


def test_every_explained_survivor_names_a_mutant_that_exists():
    """An EQUIVALENT entry whose line no longer exists (the code moved on) would explain nothing: each must match."""
    keys = {m.key for module in mutation.FAST_TESTS for m in mutation.mutants_of(module)}
    assert set(mutation.EQUIVALENT) <= keys
