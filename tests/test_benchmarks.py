"""Every benchmark script starts: its imports resolve and its options parse (``--help``), so that a moved module
does not leave a script broken until someone runs it on a GPU. (The scripts' ``--quick`` runs are too slow for
CI's budget; the lead runs them before each measurement.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in {"results.py", "steps.py"})


def test_the_scripts_are_found():
    assert {"dp_step.py", "make_private.py", "cross_entropy.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=BENCHMARKS, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_a_partial_run_saves_under_its_own_section(tmp_path, monkeypatch):
    """``--section`` keeps a partial run (some models only) from replacing the benchmark's full table."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import results

    parser = argparse.ArgumentParser()
    results.add_save_flag(parser)
    out, history = tmp_path / "RESULTS.md", tmp_path / "HISTORY.md"
    results.publish("bench", "## bench — full\n\nall models", parser.parse_args([]), out, history)
    results.publish("bench", "## bench — partial\n\nsome models", parser.parse_args(["--section", "bench_conv"]), out,
                    history)
    text = out.read_text()
    assert "## bench — full\n\nall models" in text and "## bench_conv — partial\n\nsome models" in text
    assert text.count("<!-- latest: bench -->") == 1 and text.count("<!-- latest: bench_conv -->") == 1


def test_every_table_in_results_is_a_section_a_run_can_replace():
    """Each table heading of RESULTS.md lies between ``<!-- latest: NAME -->`` and ``<!-- end: NAME -->`` of its
    own name, once: a heading outside its markers would be left in place by the next run, which would add a
    second table of that name at the end."""
    import re

    text = (BENCHMARKS / "RESULTS.md").read_text()
    preamble, sep, sections = text.partition("<!-- latest: ")
    assert sep, "RESULTS.md has no section"
    assert [h for h in re.findall(r"^## (.+)$", preamble, re.M) if h != "Figures quoted from code"] == []
    names = []
    for chunk in ("<!-- latest: " + sections).split("<!-- latest: ")[1:]:
        name, _, rest = chunk.partition(" -->\n")
        body, end, after = rest.partition(f"<!-- end: {name} -->\n")
        assert end, f"the {name} section has no end marker"
        assert re.match(rf"## {re.escape(name)} — ", body), f"the {name} section starts with {body[:60]!r}"
        assert not re.findall(r"^## ", body[3:], re.M), f"the {name} section holds a second table"
        assert after.strip() == "", f"text outside any section after {name}: {after.strip()[:80]!r}"
        names.append(name)
    assert len(names) == len(set(names)), "a section name appears twice"


def _conv_forms(cfg, precision: str) -> list[str]:
    """The form the engine keeps for each convolution's weight in one step of ``cfg``'s model, call by call, in
    float32 or under bfloat16 autocast (``precision``)."""
    from steps import autocast, build_model, make_batch

    import persample
    from persample.engine import recording

    forms = []
    add = recording.Step.add

    def record(step, call, made):
        if isinstance(call.module, torch.nn.Conv2d):
            forms.append(type(made["weight"]).__name__)
        add(step, call, made)

    x, y = make_batch(cfg, 2, torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recording.Step, "add", record)
        with autocast(x.device, precision):
            persample.GhostClipping(build_model(cfg), max_grad_norm=1.0).clipped_grad_sum(x, y)
    return forms


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_host_overhead_models_keep_the_benchmarks_conv_forms(precision, monkeypatch):
    """host_overhead.py's small conv nets stand for dp_step.py's: each convolution keeps the same form (materialized
    or factored) in each precision (the forms are chosen by bytes), so the engine runs the same code per layer."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from host_overhead import MODELS
    from steps import FULL

    for small, full in ((MODELS["wrn"], FULL[3]), (MODELS["cnn"], FULL[2])):
        assert _conv_forms(small, precision) == _conv_forms(full, precision), (small.name, full.name)


def test_memory_pools_names_each_pool_and_sums_its_segments(monkeypatch):
    """memory_pools.py's reserve by pool: PyTorch's own pool (id (0, 0)) is "main", the private pools (CUDA graphs')
    are numbered in the order of their ids, and each pool's segments are summed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import memory_pools

    mib = 2**20
    segments = [{"segment_pool_id": (0, 2), "total_size": 20 * mib, "allocated_size": 4 * mib},
                {"segment_pool_id": (0, 0), "total_size": 2 * mib, "allocated_size": 2 * mib},
                {"segment_pool_id": (0, 1), "total_size": 6 * mib, "allocated_size": 0},
                {"segment_pool_id": (0, 2), "total_size": 2 * mib, "allocated_size": 1 * mib},
                {"total_size": 4 * mib, "allocated_size": 1 * mib}]  # no pool id: PyTorch's own pool
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: segments)
    pools = memory_pools.by_pool()
    assert pools == {"main": (6 * mib, 3 * mib), "graph 1": (6 * mib, 0), "graph 2": (22 * mib, 5 * mib)}
    assert memory_pools.pools_cell(pools) == ("main 6.0 MiB (3.0 MiB in use); graph 1 6.0 MiB (0.0 MiB in use); "
                                              "graph 2 22.0 MiB (5.0 MiB in use)")


def test_held_norms_budget_as_on_a_gpu_lowers_the_peak():
    """held_norms.py's check run, on the GPU's code path in the interpreter: the tiny WRN's GroupNorm calls, held to
    the end under the CPU's budget, are computed about one by one under a GPU's, and the engine step's peak of tensor
    storage is lower."""
    import os
    import re

    done = subprocess.run([sys.executable, "held_norms.py", "--quick", "--no-save"], cwd=BENCHMARKS,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| tiny WRN"))
    cpu, gpu = (float(ratio) for ratio in re.findall(r"\(([0-9.]+)x\)", row))
    releases = [cell.split(": ")[1] for cell in row.split(" | ") if "MiB: " in cell]
    assert "," not in releases[0] and "," in releases[1], row
    assert gpu < cpu, row
