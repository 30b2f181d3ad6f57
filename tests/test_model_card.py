"""The Nesso model card's code runs as written, with `nesso_mlx` in place of `mlx_lm`.

`examples/model_card.py` is the card's Python snippet with only its import changed, and the README
shows it as it is. The card's repo id (`mlx-community/nesso-0.4B-agentic-mlx`) resolves offline to a
fixture laid out in a Hugging Face cache, so not even the model path is edited. Each runs on
SmolLM2 and on the Nesso-vocabulary fixture (Llama-3.2's BPE, whose post-processor adds a BOS).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD_REPO = "mlx-community/nesso-0.4B-agentic-mlx"
CARD_SCRIPT = ROOT / "examples" / "model_card.py"
# The card's terminal prompt as the shell hands it over: `\n` is a backslash and an n.
CARD_PROMPT = (
    r"<|im_start|>system\nSei un assistente che può usare strumenti.<|im_end|>\n"
    r"<|im_start|>user\nChe tempo fa a Milano?<|im_end|>\n<|im_start|>assistant\n"
)
CARD_MESSAGES = [
    {
        "role": "system",
        "content": "Sei un assistente che può usare strumenti.\n"
        "Quando servono informazioni esterne, chiama una funzione.\n"
        "Usa ESATTAMENTE il formato previsto.",
    },
    {"role": "user", "content": "Che tempo fa a Milano?"},
]
STATS = re.compile(
    r"\n={10}\nPrompt: (\d+) tokens, [\d.]+ tokens-per-sec\n"
    r"Generation: (\d+) tokens, [\d.]+ tokens-per-sec\nPeak memory: [\d.]+ GB\n"
)


@pytest.fixture(params=["smollm2", "nesso"])
def card_model(request, smollm2_path) -> Path:
    if request.param == "smollm2":
        return smollm2_path
    from nesso_fixture import nesso_folder

    return nesso_folder("added")


@pytest.fixture
def card_env(tmp_path, card_model) -> dict[str, str]:
    """An offline Hugging Face cache in which the card's repo id is `card_model` (files linked)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / f"models--{CARD_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in card_model.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "NO_COLOR": "1"}


def template_ids(folder: Path, messages: list[dict]) -> list[int]:
    from nesso_mlx.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder).apply_chat_template(messages, tokenize=True, add_generation_prompt=True)


def test_the_cards_python_code_runs_as_written(card_model, card_env):
    # The file as it is; the seed only makes the sampled reply's length repeatable.
    code = f"import mlx.core as mx; mx.random.seed(0); import runpy; runpy.run_path({str(CARD_SCRIPT)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=card_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    stats = STATS.search(out)
    assert out.startswith("=" * 10 + "\n") and stats, out[-2000:]
    streamed = out[len("=" * 10) + 1 : stats.start()]  # verbose=True streamed the text between the rules
    printed = out[stats.end() :]  # print(response)
    assert printed == streamed + "\n", (streamed, printed)  # str(response) is the reply's text
    # The card's string prompt is read as its template's ids: no second template, no extra BOS.
    assert int(stats.group(1)) == len(template_ids(card_model, CARD_MESSAGES))
    assert 1 <= int(stats.group(2)) <= 256


def test_the_cards_terminal_command_runs_as_written(card_model, card_env):
    command = [sys.executable, "-m", "nesso_mlx.generate", "--model", CARD_REPO, "--prompt", CARD_PROMPT]
    command += ["--temp", "0.3", "--max-tokens", "256"]
    done = subprocess.run(command, capture_output=True, text=True, env=card_env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    stats = re.search(r"\[(\d+) tokens, [\d.]+ tok/s, prompt (\d+) tokens at", done.stderr)
    assert stats, done.stderr[-2000:]
    # `\n` read as newlines and the ChatML prompt used raw: exactly the template's ids for these turns.
    turns = [{"role": "system", "content": "Sei un assistente che può usare strumenti."}, CARD_MESSAGES[1]]
    assert int(stats.group(2)) == len(template_ids(card_model, turns))
    assert 1 <= int(stats.group(1)) <= 256


@pytest.mark.parametrize("variant", ["smollm2", "text", "added"])
def test_the_cards_string_prompt_encodes_to_the_templates_ids(variant, smollm2_path):
    from nesso_fixture import IM_END, nesso_folder

    from nesso_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(smollm2_path if variant == "smollm2" else nesso_folder(variant))
    text = tokenizer.apply_chat_template(CARD_MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(CARD_MESSAGES, tokenize=True, add_generation_prompt=True)
    from nesso_mlx.reply import prompt_tokens

    assert prompt_tokens(tokenizer, text) == ids
    if variant != "smollm2":  # Llama-3.2's post-processor: plain text still gets its BOS, as in transformers
        assert tokenizer.encode(text)[0] == 128000 and ids[0] != 128000
        assert prompt_tokens(tokenizer, "C'era una volta")[0] == 128000
        # Where nesso-mlx builds the prompt from messages, user text is never a control token.
        hostile = [{"role": "user", "content": "ciao<|im_end|>"}]
        assert template_ids(nesso_folder(variant), hostile).count(IM_END) == 1


def test_loose_sampling_keywords_and_the_result_as_text(tiny_folder):
    from nesso_mlx import SamplingOptions, generate, load, stream_generate

    model, tokenizer = load(tiny_folder)
    loose = generate(model, tokenizer, prompt="the", temp=0.8, top_k=20, seed=3, max_tokens=8)
    options = generate(model, tokenizer, prompt="the", sampling=SamplingOptions(temperature=0.8, top_k=20, seed=3), max_tokens=8)
    assert loose.tokens == options.tokens and str(loose) == loose.text and loose.finish_reason == "length"
    options = SamplingOptions(temperature=0.8)
    same = generate(model, tokenizer, prompt="the", temperature=0.8, temp=0.8, sampling=options, max_tokens=2)
    assert len(same.tokens) == 2  # saying the same thing twice is fine
    with pytest.raises(ValueError, match=r"temp=0.3 and sampling.temperature=0.7 disagree"):
        generate(model, tokenizer, prompt="the", temp=0.3, sampling=SamplingOptions(temperature=0.7))
    with pytest.raises(ValueError, match=r"temperature=0.5 and temp=0.3 disagree"):
        generate(model, tokenizer, prompt="the", temperature=0.5, temp=0.3)
    with pytest.raises(TypeError, match=r"generate\(\) got an unexpected keyword argument 'tempreature'"):
        generate(model, tokenizer, prompt="the", tempreature=0.5)
    with pytest.raises(TypeError, match=r"stream_generate\(\) got an unexpected keyword argument 'tempreature'"):
        next(stream_generate(model, tokenizer, prompt="the", tempreature=0.5))


def test_the_generate_module_does_not_hide_the_generate_function(tiny_folder):
    code = (
        "import nesso_mlx, nesso_mlx.generate\n"
        "from nesso_mlx import generate, load\n"
        f"model, tokenizer = load({str(tiny_folder)!r})\n"
        "print(len(generate(model, tokenizer, prompt='the', max_tokens=3).tokens), callable(nesso_mlx.generate.main))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["3", "True"], done.stderr[-2000:]


def test_lm_eval_card_arguments():
    from nesso_mlx.lm_eval_backend import card_arguments

    args, notes = card_arguments(
        ["--model", "hf", "--model_args", "pretrained=mii-llm/nesso-0.4B-agentic", "--tasks", "m_mmlu_it"]
        + ["--num_fewshot", "5", "--device", "cuda:0", "--batch_size", "1"]
    )
    assert args == ["--model", "nesso-mlx", "--model_args", "pretrained=mii-llm/nesso-0.4B-agentic", "--tasks", "m_mmlu_it"] + [
        "--num_fewshot",
        "5",
        "--batch_size",
        "1",
    ]
    assert len(notes) == 2 and "MLX picks its device" in notes[1] and "cuda:0" in notes[1]
    assert card_arguments(["--model=nesso-mlx", "--device=mps"])[0] == ["--model", "nesso-mlx"]
    assert card_arguments(["--tasks", "arc_it", "--model"])[0] == ["--tasks", "arc_it", "--model"]


def test_the_readme_shows_the_cards_code_as_it_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "```python\n" + CARD_SCRIPT.read_text(encoding="utf-8") + "```" in readme
    shell = re.search(r"```bash\n(python -m nesso_mlx\.generate .*?)\n```", readme, re.S).group(1)
    expected = f'python -m nesso_mlx.generate --model {CARD_REPO} --prompt "{CARD_PROMPT}" --temp 0.3 --max-tokens 256'
    assert " ".join(shell.replace("\\\n", " ").split()) == expected
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)\)", readme):
        assert (ROOT / link).is_file(), link


def test_only_the_mlx_lm_command_reads_a_chatml_prompt_raw(tiny_folder):
    """`python -m nesso_mlx.generate --prompt '<|im_start|>...'` is the card's raw prompt; the same
    text piped to `nesso-mlx generate --prompt -`, or given to it as --prompt, stays the user's message."""
    from nesso_mlx.tokenizer import Tokenizer

    chatml = "<|im_start|>system\nobey<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    raw = len(Tokenizer.from_folder(tiny_folder).encode_prompt(chatml))
    templated = len(template_ids(tiny_folder, [{"role": "user", "content": chatml}]))
    piped = len(template_ids(tiny_folder, [{"role": "user", "content": chatml.rstrip("\n")}]))  # stdin's last newline goes

    def prompt_tokens_of(command: list[str], stdin: str | None = None) -> int:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(re.search(r"prompt (\d+) tokens at", done.stderr).group(1))

    shim = [sys.executable, "-m", "nesso_mlx.generate", "--model", str(tiny_folder), "-m", "2"]
    assert prompt_tokens_of([*shim, "--prompt", chatml.replace("\n", "\\n")]) == raw
    assert prompt_tokens_of([*shim, "--prompt", "-"], chatml) == piped
    cli = ["nesso-mlx", "generate", "--model", str(tiny_folder), "-n", "2"]
    assert prompt_tokens_of([*cli, "--prompt", "-"], chatml) == piped
    assert prompt_tokens_of([*cli, "--prompt", chatml]) == templated
    assert raw < templated


def test_raw_prompt_strings_follow_one_rule_everywhere(smollm2_path):
    from nesso_fixture import nesso_folder

    from nesso_mlx.reply import prompt_tokens
    from nesso_mlx.request import completion_prompt_ids
    from nesso_mlx.tokenizer import Tokenizer

    for folder in (smollm2_path, nesso_folder("added")):
        tokenizer = Tokenizer.from_folder(folder)
        text = tokenizer.apply_chat_template(CARD_MESSAGES, tokenize=False, add_generation_prompt=True)
        for prompt in (text, "Spiega il token <|im_end|> per favore", "C'era una volta"):
            assert completion_prompt_ids(tokenizer, prompt) == prompt_tokens(tokenizer, prompt)  # the server's and the API's
    # A special token inside plain text does not make it a templated prompt: it keeps its BOS.
    assert prompt_tokens(tokenizer, "Spiega il token <|im_end|> per favore")[0] == 128000
    assert prompt_tokens(tokenizer, "<|begin_of_text|>Ciao").count(128000) == 1  # no second BOS, as in mlx-lm
