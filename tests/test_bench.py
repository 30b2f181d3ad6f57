"""`nesso-mlx bench`: every workload runs, against mlx-lm too, in each output format."""

from __future__ import annotations

import csv
import io
import json
import subprocess

import pytest

from nesso_mlx.bench import WORKLOADS, run_bench


@pytest.fixture(scope="module")
def nesso_path():
    from nesso_fixture import nesso_folder

    return str(nesso_folder("added"))


def test_every_workload_against_mlx_lm(nesso_path, monkeypatch):
    import nesso_mlx.bench as bench

    # Every token ends mlx-lm's free text: in the request workloads it must decode as many
    # tokens as nesso-mlx did all the same (a reply the grammar carries on has no free peer).
    original = bench.MlxLmEngine.__init__

    def every_token_ends(self, *args):
        original(self, *args)
        self.eos = set(range(self.ours.tokenizer.vocab_size))

    monkeypatch.setattr(bench.MlxLmEngine, "__init__", every_token_ends)
    done = []
    rows = run_bench(nesso_path, list(WORKLOADS), 24, 6, repetitions=2, vs_mlx_lm=True, progress=lambda d, t: done.append((d, t)))
    assert done[-1] == (24, 24)  # 6 workloads x 2 repetitions x 2 engines
    by_key = {(r.engine, r.workload): r for r in rows}
    assert set(by_key) == {(e, w) for e in ("nesso-mlx", "mlx-lm") for w in WORKLOADS}
    for workload in WORKLOADS:
        ours, theirs = by_key["nesso-mlx", workload], by_key["mlx-lm", workload]
        assert len(ours.runs) == len(theirs.runs) == 2 and ours.ratio is not None and ours.ratio > 0
        assert ours.ttft_s > 0 and theirs.ttft_s > 0 and ours.peak_gb > 0
    assert by_key["nesso-mlx", "pp"].prompt_tokens == by_key["mlx-lm", "pp"].prompt_tokens == 24
    for engine in ("nesso-mlx", "mlx-lm"):
        assert by_key[engine, "tg"].generated == 6 and by_key[engine, "tg"].decode_tps > 0  # EOS never stops tg
    # the same prompt tokens for both engines in the request workloads
    for workload in ("chat", "extract", "tool"):
        ours, theirs = by_key["nesso-mlx", workload], by_key["mlx-lm", workload]
        assert ours.prompt_tokens == theirs.prompt_tokens
        assert [r.generated for r in theirs.runs] == [r.generated for r in ours.runs] and theirs.generated > 1
    assert by_key["mlx-lm", "turn2"].generated == 1  # free text still ends at EOS there
    # turn 2 reuses the cache: it reports the whole conversation, but prefills less than it
    turn2 = by_key["nesso-mlx", "turn2"]
    assert turn2.prompt_tokens > by_key["nesso-mlx", "chat"].prompt_tokens
    expected = by_key["nesso-mlx", "pp"].prefill_tps / by_key["mlx-lm", "pp"].prefill_tps
    assert by_key["nesso-mlx", "pp"].ratio == pytest.approx(expected)


@pytest.mark.parametrize("fmt", ["md", "json", "csv"])
def test_the_command_in_each_format(nesso_path, fmt):
    run = subprocess.run(
        ["nesso-mlx", "bench", "--model", nesso_path, "-p", "16", "-n", "4", "-r", "1", "-w", "pp,tg", "-o", fmt],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    if fmt == "json":
        rows = json.loads(run.stdout)
        assert [(r["engine"], r["workload"]) for r in rows] == [("nesso-mlx", "pp"), ("nesso-mlx", "tg")]
        assert rows[1]["generated"] == 4 and len(rows[1]["runs"]) == 1
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(run.stdout)))
        assert [r["test"] for r in rows] == ["pp16", "tg4"] and float(rows[1]["decode tok/s"]) > 0
    else:
        assert "| nesso-mlx | pp16 | 16 |" in run.stdout and "| nesso-mlx | tg4 |" in run.stdout


def test_bad_workload_is_one_line():
    run = subprocess.run(["nesso-mlx", "bench", "-w", "pp,fly"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--workloads" in run.stderr
