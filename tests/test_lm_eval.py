"""The lm-eval backend gives lm-eval's own `hf` backend's numbers, item by item, on the same weights.

The reference is lm-eval's HFLM (transformers + torch, float32) run on the same local tasks
(tests/data/lm_eval: multiple choice with a shared few-shot prefix and one context longer than the
window, generation with stop strings and one prompt cut from the left, perplexity in rolling
windows). Both backends get the same Instances from lm-eval; every log-likelihood, greedy flag,
generation and metric is compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (the eval extra)")

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tests" / "data" / "lm_eval"
TASKS = ["nesso_fidelity_mc", "nesso_fidelity_gen", "nesso_fidelity_ppl"]
MAX_LENGTH = 64  # small, so that truncation and rolling windows are exercised


@pytest.fixture(scope="module", autouse=True)
def at_root():
    """The tasks' data_files are relative to the repository root, as lm-eval resolves them."""
    before = os.getcwd()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(ROOT)
    yield
    os.chdir(before)


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def run(lm, manager, tasks, **kwargs):
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, log_samples=True, bootstrap_iters=0, **kwargs)


def hf_lm(path):
    pytest.importorskip("torch", reason="the reference backend needs torch")
    pytest.importorskip("accelerate", reason="lm-eval's hf backend needs accelerate")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), dtype="float32", device="cpu", max_length=MAX_LENGTH, batch_size=1)


def compare(ours, theirs, tasks, tolerance):
    """Every item of every task: log-likelihoods within `tolerance(reference)`, identical greedy
    flags and generations, identical metrics. Returns the largest log-likelihood difference."""
    worst = 0.0
    for task in tasks:
        mine, ref = ours["samples"][task], theirs["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in ref]
        for a, b in zip(mine, ref, strict=True):
            assert a["arguments"] == b["arguments"]  # the same requests went to both backends
            for x, y in zip(a["resps"], b["resps"], strict=True):
                x, y = x[0], y[0]
                if isinstance(y, str):
                    assert x == y, (task, a["doc_id"])
                elif isinstance(y, (tuple, list)):  # (loglikelihood, is_greedy)
                    assert abs(x[0] - y[0]) <= tolerance(y[0]), (task, a["doc_id"], x, y)
                    assert x[1] == y[1], (task, a["doc_id"], x, y)
                    worst = max(worst, abs(x[0] - y[0]))
                else:  # a rolling log-likelihood
                    assert abs(x - y) <= tolerance(y), (task, a["doc_id"], x, y)
                    worst = max(worst, abs(x - y))
        for key, value in theirs["results"][task].items():
            if key.endswith(",none") and "stderr" not in key:
                if "perplexity" in key or "bits_per_byte" in key:  # exp(-sum of log-likelihoods / words or bytes)
                    assert ours["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)
                else:  # accuracies and exact match: the same answers, so exactly the same numbers
                    assert ours["results"][task][key] == value, (task, key)
    return worst


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_path, manager):
    from nesso_mlx.lm_eval_backend import NessoLM

    ours = NessoLM(pretrained=str(smollm2_path), dtype="float32", max_length=MAX_LENGTH)
    return ours, run(ours, manager, TASKS), run(hf_lm(smollm2_path), manager, TASKS)


def test_same_numbers_as_lm_evals_hf_backend_on_smollm2(smollm2_runs):
    ours, mine, theirs = smollm2_runs
    # float32 sums: a perplexity text's log-likelihood (-317 nats) differs from the reference by
    # ~1.3e-3 with mlx 0.32.4 and transformers 5.25 (7.3e-4 before), a relative 4e-6; an
    # off-by-one token or a wrong window would differ by nats.
    worst = compare(mine, theirs, TASKS, tolerance=lambda ref: max(1e-3, 5e-6 * abs(ref)))
    print(f"max |delta loglikelihood| = {worst:.2e}")
    # The data exercise what they are meant to: a context cut to the window, a prompt cut to the
    # window less max_gen_toks, a text scored in several windows, and real generations.
    mc = [args for s in mine["samples"]["nesso_fidelity_mc"] for args in s["arguments"]]
    assert any(len(ours.tok_encode(context + choice)) > MAX_LENGTH + 1 for context, choice in mc)
    gen = [s["arguments"][0][0] for s in mine["samples"]["nesso_fidelity_gen"]]
    assert any(len(ours.tok_encode(p)) > MAX_LENGTH - 16 for p in gen)
    ppl = [s["arguments"][0][0] for s in mine["samples"]["nesso_fidelity_ppl"]]
    assert any(len(ours.tok_encode(t)) > MAX_LENGTH for t in ppl)
    outputs = [s["resps"][0][0] for s in mine["samples"]["nesso_fidelity_gen"]]
    assert all(o.strip() for o in outputs) and not any("\n" in o for o in outputs)
    acc = mine["results"]["nesso_fidelity_mc"]["acc,none"]
    assert 0 < acc < 1  # neither all right nor all wrong: the comparison can tell answers apart


def test_chat_template_and_bos_match_on_nesso_vocabulary(manager):
    """Nesso's Llama-3.2 tokenizer adds BOS and the prompts go through its chat template: the
    same requests, tokens and numbers as the hf backend (tiny random model, so log-likelihoods
    are in the hundreds and float32 rounding alone is ~1e-4: the tolerance is relative there)."""
    from nesso_fixture import nesso_folder

    from nesso_mlx.lm_eval_backend import NessoLM

    path = nesso_folder("text")
    ours, reference = NessoLM(pretrained=str(path), dtype="float32", max_length=MAX_LENGTH), hf_lm(path)
    tasks = ["nesso_fidelity_mc", "nesso_fidelity_gen"]
    mine = run(ours, manager, tasks, apply_chat_template=True, fewshot_as_multiturn=True)
    theirs = run(reference, manager, tasks, apply_chat_template=True, fewshot_as_multiturn=True)
    compare(mine, theirs, tasks, tolerance=lambda ref: 1e-3 + 2e-6 * abs(ref))
    history = [
        {"role": "system", "content": "Rispondi in italiano."},
        {"role": "user", "content": "Quanto fa 2+2?"},
        {"role": "assistant", "content": "Fa "},
    ]
    assert ours.apply_chat_template(history[:2]) == reference.apply_chat_template(history[:2])
    continued = ours.apply_chat_template(history, add_generation_prompt=False)
    assert continued == reference.apply_chat_template(history, add_generation_prompt=False)
    assert continued.endswith("<|im_start|>assistant\nFa ")
    for text in (continued, "Domanda: 2+2?", " Risposta"):
        assert ours.tok_encode(text) == reference.tok_encode(text)
    assert ours.tok_encode("Ciao")[0] == 128000 and ours.prefix_token_id == reference.prefix_token_id == 128000
    assert ours.max_length == reference.max_length and ours.eot_token_id == reference.eot_token_id


def test_batched_continuations_and_cache_reuse_give_the_same_numbers(manager):
    """batch_size > 1 scores a context's continuations together from a copied cache, and each
    context reuses the previous one's prefix: neither may change a number. Reference: every
    request scored alone by a fresh backend with nothing cached."""
    from lm_eval.api.instance import Instance
    from nesso_fixture import nesso_folder

    from nesso_mlx.lm_eval_backend import NessoLM

    path = nesso_folder("text")
    pairs = [
        ("Domanda: capitale d'Italia?\nRisposta:", " Roma"),
        ("Domanda: capitale d'Italia?\nRisposta:", " la città di Milano"),
        ("Domanda: capitale d'Italia?\nRisposta:", " Napoli, credo io"),
        ("Domanda: capitale di Francia?\nRisposta:", " Parigi"),
        ("Domanda: capitale di Francia?\nRisposta:", " non lo so davvero"),
        ("Domanda: capitale", " di Spagna?"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    batched = NessoLM(pretrained=str(path), dtype="float32", batch_size=4).loglikelihood(requests, disable_tqdm=True)
    alone = [NessoLM(pretrained=str(path), dtype="float32").loglikelihood([r], disable_tqdm=True)[0] for r in requests]
    for (a, ga), (b, gb) in zip(batched, alone, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_eval_lm_command(tmp_path):
    from nesso_fixture import nesso_folder

    out = tmp_path / "results.json"
    command = ["nesso-mlx", "eval", "lm", "--model", str(nesso_folder("text")), "--tasks", ",".join(TASKS)]
    command += ["--include-path", str(TASKS_DIR), "--limit", "2", "--output", str(out), "--log-samples"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "nesso_fidelity_mc" in done.stdout and "acc_norm" in done.stdout and "bits_per_byte" in done.stdout
    assert "Traceback" not in done.stderr and "loglikelihood" in done.stderr  # the progress bars
    results = json.loads(out.read_text())
    assert sorted(results["results"]) == sorted(TASKS)
    assert results["n-samples"]["nesso_fidelity_mc"]["effective"] == 2
    assert len(results["samples"]["nesso_fidelity_gen"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "no_such_task_anywhere"], "unknown lm-eval task no_such_task_anywhere"),
        (["--tasks", "nesso_fidelity_mc", "--num-fewshot", "-1"], "--num-fewshot must be"),
        (["--tasks", "nesso_fidelity_mc", "--dtype", "fp8"], "--dtype must be"),
        (["--tasks", "nesso_fidelity_mc", "--include-path", "/no/such/folder"], "not a folder"),
    ],
)
def test_eval_lm_bad_input_is_one_line(args, message):
    done = subprocess.run(["nesso-mlx", "eval", "lm", "--model", "/m", *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr


def test_lm_evals_own_command_line_with_the_backend_registered():
    """The model card's `lm-eval --model hf ... --device cuda:0 --batch_size 1` flags, as they are."""
    from nesso_fixture import nesso_folder

    command = [sys.executable, "-m", "nesso_mlx.lm_eval_backend", "--model", "hf"]
    command += ["--model_args", f"pretrained={nesso_folder('text')},dtype=float32", "--tasks", "nesso_fidelity_mc"]
    command += ["--num_fewshot", "2", "--device", "cuda:0", "--batch_size", "1"]
    command += ["--include_path", str(TASKS_DIR), "--limit", "2"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "nesso-mlx" in done.stdout and "nesso_fidelity_mc" in done.stdout and "acc_norm" in done.stdout
    assert "num_fewshot: 2" in done.stdout
    assert "note: --device cuda:0 ignored: MLX picks its device itself" in done.stderr
    command[6] = "pretrained=/no/such/model"
    missing = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: /no/such/model")
    assert "Traceback" not in missing.stderr


def test_release_adds_lm_eval_scores_per_variant(tmp_path):
    import importlib.util

    import mlx.core as mx
    from conftest import TINY_CONFIG, write_model_folder

    spec = importlib.util.spec_from_file_location("nesso_release", ROOT / "convert" / "release.py")
    release = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release)
    source = write_model_folder(
        tmp_path / "tiny-nesso", {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}, dtype=mx.bfloat16
    )
    out = tmp_path / "releases"
    args = ["--out", str(out), "--models", str(source), "--variants", "bf16", "8bit", "--no-eval"]
    args += ["--lm-eval-tasks", "nesso_fidelity_mc", "--lm-eval-include", str(TASKS_DIR), "--lm-eval-limit", "3"]
    assert release.main(args) == 0
    rows = {row["variant"]: row for row in json.loads((out / "summary.json").read_text())}
    for variant in ("bf16", "8bit"):
        scores = rows[variant]["lm_eval"]["nesso_fidelity_mc"]
        assert set(scores) == {"acc", "acc_norm"} and all(0 <= v <= 1 for v in scores.values())
    assert "nesso_fidelity_mc acc" in (out / "SUMMARY.md").read_text()
    assert release.main(["--out", str(out), "--models", str(source), "--lm-eval-tasks", "no_such_task_anywhere"]) == 1
