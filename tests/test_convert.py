"""The converter: every precision, interop with mlx-lm both ways, quality report, safety, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_CONFIG, write_model_folder
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model as mlx_lm_load_model

from nesso_mlx import generate, load
from nesso_mlx.convert import KILL_AT, MARKER, WRITER, ConvertError, _started, convert
from nesso_mlx.convert.__main__ import main as convert_main
from nesso_mlx.errors import NessoError
from nesso_mlx.quality import compare, reference_logprobs
from nesso_mlx.quantize import QuantizationError, dequantize_model

TOKENS = mx.array([[5, 80, 200, 33, 7, 260, 41, 99]])


def as_float32(model):
    model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    return model


def mlx_lm_logits(folder: Path) -> mx.array:
    model, _ = mlx_lm_load_model(folder)
    return as_float32(model)(TOKENS)


def nothing_written(dest: Path) -> bool:
    return not dest.exists() and not list(dest.parent.glob(f".{dest.name}.*"))


@pytest.fixture
def source(tmp_path):
    config = {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256}
    return write_model_folder(tmp_path / "source", config, dtype=mx.bfloat16)


@pytest.mark.parametrize(
    "options, bits",
    [
        ({}, None),
        ({"dtype": "float16"}, None),
        ({"dtype": "float32"}, None),
        ({"quantize": True, "q_bits": 8}, 8),
        ({"quantize": True, "q_bits": 4, "q_group_size": 32}, 4),
        ({"quantize": True, "q_bits": 6, "q_group_size": 128}, 6),
        ({"q_recipe": "mixed_4_6"}, 4),
        ({"q_recipe": "mixed_3_6"}, 3),
    ],
)
def test_each_precision_loads_in_nesso_and_mlx_lm(source, tmp_path, options, bits):
    dest = tmp_path / "out"
    result = convert(source, dest, evaluate=False, **options)
    assert result.path == dest.absolute() and (dest / "README.md").exists()
    files = sorted(p.name for p in dest.iterdir())
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(
        files
    )
    assert (dest / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    config = json.loads((dest / "config.json").read_text())
    model, _ = load(dest, dtype="float32")
    if bits is None:
        assert "quantization" not in config
        assert model.model.layers[0].mlp.up_proj.weight.dtype == mx.float32
        assert mx.load(str(dest / "model.safetensors"))["model.norm.weight"].dtype == getattr(
            mx, options.get("dtype", "bfloat16")
        )
    else:
        assert config["quantization"]["bits"] == bits and config["quantization_config"] == config["quantization"]
        assert isinstance(model.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    if "q_recipe" in options:
        # The tied embedding (also the LM head) and sensitive layers get more bits than the rest.
        assert model.model.embed_tokens.bits == 6 and config["quantization"]["model.embed_tokens"]["bits"] == 6
        # With 2 layers, only the last is in the sensitive set (last eighth); its v_proj/down_proj get 6.
        last, first = model.model.layers[1], model.model.layers[0]
        assert last.self_attn.v_proj.bits == 6 and last.mlp.down_proj.bits == 6 and last.self_attn.q_proj.bits == bits
        assert first.self_attn.v_proj.bits == bits
    assert mx.allclose(model(TOKENS), mlx_lm_logits(dest), atol=1e-4).item()


def test_mlx_lm_load_generates_same_greedy_tokens(smollm2_path, tmp_path):
    dest = tmp_path / "smol-8bit"
    convert(smollm2_path, dest, quantize=True, q_bits=8, evaluate=False)
    model, tokenizer = load(dest)  # float32 activations on the CPU
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = generate(model, tokenizer, messages=messages, max_tokens=10)
    assert "Paris" in ours.text  # 8-bit still answers
    reference, _ = mlx_lm_load_model(dest)
    ids = tokenizer.apply_chat_template(messages)
    theirs = [
        int(t)
        for t, _ in generate_step(
            mx.array(ids), as_float32(reference), max_tokens=len(ours.tokens), sampler=lambda lp: mx.argmax(lp, axis=-1)
        )
    ]
    assert ours.tokens == theirs


@pytest.mark.parametrize("recipe", [None, "mixed_4_6"])
def test_nesso_loads_mlx_lm_convert_output(tmp_path, recipe):
    from mlx_lm import convert as mlx_lm_convert

    src = write_model_folder(tmp_path / "src", {**TINY_CONFIG, "hidden_size": 128, "intermediate_size": 256})
    dest = tmp_path / "mlx-lm-out"
    mlx_lm_convert(str(src), str(dest), quantize=True, q_group_size=64, q_bits=4, quant_predicate=recipe)
    model, _ = load(dest)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.QuantizedLinear)
    if recipe:  # mlx-lm's mixed_4_6 with 2 layers: the last layer's down_proj gets 6 bits
        config = json.loads((dest / "config.json").read_text())["quantization"]
        assert config["model.layers.1.mlp.down_proj"]["bits"] == 6
        assert model.model.layers[1].mlp.down_proj.bits == 6 and model.model.layers[0].mlp.down_proj.bits == 4
    assert mx.allclose(model(TOKENS), mlx_lm_logits(dest), atol=1e-4).item()


def test_dequantize_gives_back_the_effective_weights(source, tmp_path):
    quantized = convert(source, tmp_path / "q8", quantize=True, q_bits=8, evaluate=False).path
    back = convert(quantized, tmp_path / "float", dequantize=True, dtype="float32", evaluate=False).path
    assert "quantization" not in json.loads((back / "config.json").read_text())
    float_model, _ = load(back)
    q_model, _ = load(quantized)
    assert isinstance(float_model.model.layers[0].mlp.up_proj, nn.Linear)
    assert mx.allclose(float_model(TOKENS), dequantize_model(q_model, mx.float32)(TOKENS), atol=1e-5).item()


def test_shards_past_the_size_limit(source, tmp_path):
    result = convert(source, tmp_path / "sharded", max_shard_gb=0.0003, evaluate=False)
    shards = sorted(result.path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (result.path / "model.safetensors").exists()
    index = json.loads((result.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    model, _ = load(result.path, dtype="float32")
    assert mx.allclose(model(TOKENS), mlx_lm_logits(result.path), atol=1e-4).item()


# --- quality report --------------------------------------------------------------------------


def test_quality_report_orders_precisions_and_lands_in_the_card(source, tmp_path):
    q8 = convert(source, tmp_path / "q8", quantize=True, q_bits=8, eval_tokens=24)
    q2 = convert(source, tmp_path / "q2", quantize=True, q_bits=2, eval_tokens=24)
    assert q8.quality is not None and q2.quality is not None
    assert 0 <= q8.quality.mean_kl < q2.quality.mean_kl
    assert q8.quality.top1_agreement >= q2.quality.top1_agreement
    assert set(q8.quality.by_language) == {"it", "en"} and q8.quality.tokens == 2 * 23
    assert q8.quality.perplexity_source == pytest.approx(q2.quality.perplexity_source)
    card = (q8.path / "README.md").read_text()
    assert f"{q8.quality.mean_kl:.5f}" in card and "8-bit (group size 64)" in card
    assert "mlx_lm.generate" in card and "nesso-mlx chat" in card


def test_kl_and_agreement_match_a_numpy_computation(source):
    model, tokenizer = load(source, dtype="float32")
    other, _ = load(source, dtype="float32")
    other.model.layers[0].mlp.up_proj.weight = other.model.layers[0].mlp.up_proj.weight * 1.5
    reference = reference_logprobs(model, tokenizer, max_tokens=16)
    _, ids, p = reference.windows[0]
    stats = compare(p, other, ids)

    def log_softmax(x):
        x = np.asarray(x, dtype=np.float64)
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

    lp = log_softmax(model(mx.array(ids)[None])[0, :-1])
    lq = log_softmax(other(mx.array(ids)[None])[0, :-1])
    assert stats["kl"] == pytest.approx(float((np.exp(lp) * (lp - lq)).sum()), rel=1e-3)
    assert stats["agree"] == float((lp.argmax(-1) == lq.argmax(-1)).sum())
    assert stats["nll_candidate"] == pytest.approx(-float(lq[np.arange(len(ids) - 1), ids[1:]].sum()), rel=1e-4)


# --- safety: nothing half-written ------------------------------------------------------------


def failing_after_first_shard(monkeypatch, exc: type[BaseException]):
    real = mx.save_safetensors
    calls = []

    def save(path, arrays, metadata=None):
        calls.append(path)
        if len(calls) > 1:
            raise exc("simulated failure mid-write")
        real(path, arrays, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", save)
    return calls


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt])
def test_failure_mid_write_leaves_no_partial_output(source, tmp_path, monkeypatch, exc):
    dest = tmp_path / "out"
    calls = failing_after_first_shard(monkeypatch, exc)
    with pytest.raises(exc):
        convert(source, dest, max_shard_gb=0.0003, evaluate=False)
    assert len(calls) == 2  # one shard was written to the temporary folder before the failure
    assert nothing_written(dest)


def test_failed_force_keeps_the_previous_output(source, tmp_path, monkeypatch):
    dest = convert(source, tmp_path / "out", evaluate=False).path
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    failing_after_first_shard(monkeypatch, OSError)
    with pytest.raises(OSError):
        convert(source, dest, force=True, dtype="float32", max_shard_gb=0.0003, evaluate=False)
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert not list(tmp_path.glob(".out.*"))


def test_existing_destination_needs_force(source, tmp_path):
    dest = convert(source, tmp_path / "out", evaluate=False).path
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(source, dest, evaluate=False)
    result = convert(source, dest, force=True, quantize=True, q_bits=8, evaluate=False)
    assert json.loads((result.path / "config.json").read_text())["quantization"]["bits"] == 8


# --- bad input: one line, exit 1, nothing written ----------------------------------------------


def bad_input_cases(tmp_path: Path):
    missing_config = write_model_folder(tmp_path / "no-config")
    (missing_config / "config.json").unlink()
    corrupt = write_model_folder(tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) - 100])
    unsupported = write_model_folder(tmp_path / "gpt2")
    config = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    odd = write_model_folder(
        tmp_path / "odd",
        {**TINY_CONFIG, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 192},
    )
    return [
        (missing_config, [], "no config.json"),
        (corrupt, [], "truncated"),
        (unsupported, [], "model_type 'gpt2'"),
        (odd, ["-q", "--q-group-size", "64"], "does not divide"),
        (odd, ["-q", "--q-bits", "4", "--q-group-size", "128"], "does not divide"),
        (tmp_path / "nowhere", [], "no such folder"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    for folder, extra, needle in bad_input_cases(tmp_path):
        dest = tmp_path / f"out-{folder.name}"
        code = convert_main(["--hf-path", str(folder), "--mlx-path", str(dest), "--no-eval", *extra])
        err = capsys.readouterr().err
        assert code == 1, (folder, err)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], err
        assert "Traceback" not in err and nothing_written(dest)


def test_already_quantized_and_nothing_to_dequantize(source, tmp_path):
    with pytest.raises(ConvertError, match="not quantized"):
        convert(source, tmp_path / "a", dequantize=True)
    q = convert(source, tmp_path / "q", quantize=True, evaluate=False).path
    with pytest.raises(ConvertError, match="already quantized"):
        convert(q, tmp_path / "b", quantize=True)
    with pytest.raises(QuantizationError, match="not supported"):
        convert(source, tmp_path / "c", quantize=True, q_bits=7)
    assert nothing_written(tmp_path / "a") and nothing_written(tmp_path / "b") and nothing_written(tmp_path / "c")
    assert issubclass(QuantizationError, NessoError)


def test_command_line_entry_points(source, tmp_path):
    dest = tmp_path / "cli-out"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "nesso_mlx.convert",
            "--hf-path",
            str(source),
            "--mlx-path",
            str(dest),
            "-q",
            "--q-bits",
            "8",
            "--no-eval",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "bits per weight" in run.stdout and "8.5" in run.stdout
    again = subprocess.run(
        ["nesso-mlx", "convert", "--hf-path", str(source), "--mlx-path", str(dest)], capture_output=True, text=True
    )
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_sigterm_mid_conversion_leaves_nothing(smollm2_path, tmp_path):
    import signal
    import time

    dest = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nesso_mlx.convert",
            "--hf-path",
            str(smollm2_path),
            "--mlx-path",
            str(dest),
            "-q",
            "--q-bits",
            "8",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*/config.json")) and time.time() < deadline:
        time.sleep(0.2)  # wait until the weights are written and the quality evaluation runs
    assert process.poll() is None, process.stderr.read()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "nothing was written" in err
    assert nothing_written(dest)


# --- --force replaces only earlier conversions; a kill at any point loses nothing ---------------


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def tree(root: Path) -> dict[str, tuple]:
    """Everything under `root`, byte for byte, with modification times (to see that nothing was touched)."""
    out: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path))
            elif path.is_dir():
                out[str(path)] = ("dir", path.stat().st_mtime_ns)
            else:
                out[str(path)] = ("file", path.read_bytes(), path.stat().st_mtime_ns)
    return out


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(f".{dest.name}.*"))


def run_converter(source: Path, dest: Path, *args: str, env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "nesso_mlx.convert", "--hf-path", str(source), "--mlx-path", str(dest), "--no-eval", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})


NEW = {"dtype": "bfloat16", "max_shard_gb": 0.00005}  # five shards: a kill can land between two of them
NEW_ARGS = ["--force", "--dtype", "bfloat16", "--max-shard-gb", "0.00005"]


@pytest.mark.parametrize("point", ["shard", "before-renames", "between-renames", "after-renames"])
def test_sigkill_at_each_point_loses_nothing_and_the_next_run_cleans_up(tmp_path, point):
    source = write_model_folder(tmp_path / "source")
    dest = tmp_path / "out"
    old = contents(convert(source, dest, evaluate=False).path)
    (tmp_path / "reference").mkdir()
    new = contents(convert(source, tmp_path / "reference" / "out", evaluate=False, **NEW).path)
    assert len([n for n in new if n.endswith(".safetensors")]) == 5 and old.keys() != new.keys()

    run = run_converter(source, dest, *NEW_ARGS, env={KILL_AT: point})
    assert run.returncode == -signal.SIGKILL, run.stderr
    left = leftovers(dest)
    if point == "between-renames":  # the previous conversion, whole, moved aside; the new one whole beside it
        assert not dest.exists() and [n.split("-")[0] for n in left] == [".out.old", ".out.partial"]
        assert contents(tmp_path / left[0]) == old and contents(tmp_path / left[1]) == new
    else:
        assert contents(dest) == (new if point == "after-renames" else old)
        load(dest)
        assert [n.split("-")[0] for n in left] == [".out.old" if point == "after-renames" else ".out.partial"]

    # The next run to the same destination puts the old conversion back or clears the leftovers, even one
    # that then stops because the destination exists.
    with pytest.raises(ConvertError, match="already exists; pass --force"):
        convert(source, dest, evaluate=False)
    assert contents(dest) == (new if point == "after-renames" else old) and leftovers(dest) == []
    load(dest)
    convert(source, dest, force=True, evaluate=False, **NEW)
    assert contents(dest) == new and leftovers(dest) == []


def refusal_cases(source: Path, tmp_path: Path) -> list[tuple[Path, str]]:
    thesis = tmp_path / "thesis"
    thesis.mkdir(parents=True)
    (thesis / "thesis.docx").write_bytes(b"PK\x03\x04 three years of work")
    added = convert(source, tmp_path / "conversion-plus-thesis", evaluate=False).path
    (added / "thesis.docx").write_bytes(b"PK\x03\x04 three years of work")
    nested = convert(source, tmp_path / "conversion-plus-folder", evaluate=False).path
    (nested / "checkpoints").mkdir()
    finetuned = write_model_folder(tmp_path / "finetuned")  # our file names, but neither marker nor model card
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"not a folder")
    link = tmp_path / "link"
    link.symlink_to(convert(source, tmp_path / "target", evaluate=False).path)
    return [
        (thesis, "it holds thesis.docx"),
        (added, "it holds thesis.docx"),
        (nested, "it holds checkpoints"),
        (finetuned, "no nesso-mlx model card"),
        (notes, "no config.json"),
        (a_file, "a file"),
        (link, "a symbolic link"),
    ]


def test_force_refuses_what_nesso_mlx_did_not_write_and_touches_nothing(source, tmp_path, capsys):
    for dest, reason in refusal_cases(source, tmp_path / "cases"):
        before = tree(tmp_path)
        code = convert_main(["--hf-path", str(source), "--mlx-path", str(dest), "--force", "--no-eval"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"error: {dest}: exists and is not a nesso-mlx conversion ({reason}); it was left as it is"), err
        assert tree(tmp_path) == before, dest
    thesis = tmp_path / "cases" / "thesis"
    before = tree(tmp_path)
    run = subprocess.run(
        ["nesso-mlx", "convert", "--hf-path", str(source), "--mlx-path", str(thesis), "--force"], capture_output=True, text=True
    )
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "thesis.docx" in run.stderr, run.stderr
    assert tree(tmp_path) == before and (thesis / "thesis.docx").read_bytes() == b"PK\x03\x04 three years of work"


def test_force_replaces_earlier_conversions_and_leaves_nothing_behind(source, tmp_path):
    marked = convert(source, tmp_path / "marked", evaluate=False).path
    legacy = convert(source, tmp_path / "legacy", evaluate=False, max_shard_gb=0.0003).path
    (legacy / MARKER).unlink()  # as nesso-mlx 0.1.0 wrote it, and macOS's Finder was there
    (legacy / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    empty = tmp_path / "empty"
    empty.mkdir()
    for dest in (marked, legacy, empty):
        result = convert(source, dest, force=True, quantize=True, q_bits=8, evaluate=False)
        assert sorted(p.name for p in dest.iterdir()) == sorted(result.files) and MARKER in result.files
        assert json.loads((dest / MARKER).read_text())["files"]["config.json"] == (dest / "config.json").stat().st_size
        assert json.loads((dest / "config.json").read_text())["quantization"]["bits"] == 8
        assert leftovers(dest) == [] and WRITER not in result.files
        load(dest)


def test_destination_checked_again_before_the_replace(source, tmp_path):
    dest = convert(source, tmp_path / "out", evaluate=False).path
    before = contents(dest)

    def save_meanwhile(stage: str, done: int, total: int) -> None:
        if stage == "write":
            (dest / "thesis.docx").write_bytes(b"saved while the conversion ran")

    with pytest.raises(ConvertError, match=r"not a nesso-mlx conversion \(it holds thesis.docx\)"):
        convert(source, dest, force=True, evaluate=False, progress=save_meanwhile)
    assert contents(dest) == {**before, "thesis.docx": b"saved while the conversion ran"} and leftovers(dest) == []


def test_stale_partial_cleanup_touches_only_dead_writers(source, tmp_path):
    dest = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    stamp = {"pid": sleeper.pid, "host": socket.gethostname(), "started": _started(sleeper.pid)}

    def leftover(kind: str, pid: int | str, writer: dict | None) -> Path:
        folder = tmp_path / f".out.{kind}-{pid}-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"half of the weights")
        if writer is not None:
            (folder / WRITER).write_text(json.dumps(writer))
        return folder

    try:
        live = leftover("partial", sleeper.pid, stamp)
        live_unstamped = leftover("partial", sleeper.pid, None)  # a writer before its stamp, or renaming
        live_old = leftover("old", sleeper.pid, None)  # moved aside by a live writer an instant ago: not put back
        other_host = leftover("partial", dead_pid, {**stamp, "pid": dead_pid, "host": "another-mac.local"})
        legacy = tmp_path / ".out.partial-0123abcd"  # nesso-mlx 0.1.0 wrote no PID: its writer is unknown
        legacy.mkdir()
        kept = {p: contents(p) for p in (live, live_unstamped, live_old, other_host, legacy)}
        dead = leftover("partial", dead_pid, {**stamp, "pid": dead_pid})
        dead_unstamped = leftover("partial", dead_pid, None)
        reused = leftover("partial", sleeper.pid, {**stamp, "started": "an earlier process"})  # its PID was reused
        (dead / "thesis.docx").write_bytes(b"not ours")  # someone's file in a dead writer's folder stays

        convert(source, dest, evaluate=False)
        assert {p: contents(p) for p in kept} == kept
        assert not dead_unstamped.exists() and not reused.exists() and contents(dead) == {"thesis.docx": b"not ours"}
        assert sleeper.poll() is None and contents(dest)["config.json"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_files_then_parent_fsynced_around_the_renames(source, tmp_path, monkeypatch):
    import nesso_mlx.convert as converter

    dest = convert(source, tmp_path / "out", evaluate=False).path
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace = converter._fsync, os.replace

    def fsync(path):
        events.append(("fsync", Path(path)))
        real_fsync(path)

    def replace(src, dst):
        events.append(("rename", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(converter, "_fsync", fsync)
    monkeypatch.setattr(converter.os, "replace", replace)
    convert(source, dest, force=True, evaluate=False, **NEW)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert [events[i][1].name.split("-")[0] for i in renames] == [".out.old", "out"]
    synced = [path for kind, path in events[: renames[0]] if kind == "fsync"]
    assert {p.name for p in synced if p.parent.name.startswith(".out.partial-")} == set(os.listdir(dest))
    assert synced[-1] == tmp_path and synced[-2].name.startswith(".out.partial-")  # the folder, then the parent
    assert ("fsync", tmp_path) in events[renames[0] : renames[1]] and events[renames[1] + 1] == ("fsync", tmp_path)
