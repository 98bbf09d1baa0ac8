"""tools/mutate_kernels.py stays in step with the kernel sources: every mutant's edit
applies exactly once to the current csrc/ and changes it, so a kernel change that moves
the code under a mutant is noticed here (and the mutant updated) instead of silently
shrinking the mutation report. The mutation run itself (a build and the emulated suite
per mutant) is a tool, not a test: its result is in bench/RESULTS.md."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutate_kernels", REPO / "tools" / "mutate_kernels.py")
mutate_kernels = importlib.util.module_from_spec(_spec)
sys.modules["mutate_kernels"] = mutate_kernels  # dataclasses look their module up there
_spec.loader.exec_module(mutate_kernels)


def test_at_least_twenty_distinct_mutants():
    names = [m.name for m in mutate_kernels.MUTANTS]
    assert len(names) >= 20 and len(set(names)) == len(names)
    assert all(set(m.suites) <= set(mutate_kernels.TESTS) and m.suites for m in mutate_kernels.MUTANTS)


@pytest.mark.parametrize("mutant", mutate_kernels.MUTANTS, ids=lambda m: m.name)
def test_mutation_applies_once_and_changes_the_source(mutant, tmp_path):
    source = (mutate_kernels.CSRC / mutant.file).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.name}: edit matches {source.count(mutant.old)} times"
    target = tmp_path / mutant.file
    target.parent.mkdir(parents=True)
    target.write_text(source)
    mutate_kernels.apply(mutant, tmp_path)
    mutated = target.read_text()
    assert mutated != source and mutant.new in mutated or mutant.new == ""
    assert len(mutated) == len(source) - len(mutant.old) + len(mutant.new)


def test_a_stale_mutation_is_an_error(tmp_path):
    stale = mutate_kernels.Mutant("stale", "kernels/x.cuh", "gone", "", "nothing", ("decode",))
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "x.cuh").write_text("present")
    with pytest.raises(SystemExit, match="matches 0 times"):
        mutate_kernels.apply(stale, tmp_path)
