"""Build the whole MLX release matrix: every Nesso model at bf16, 8-bit, 4-bit and mixed precision.

    python convert/release.py --out releases/
    python convert/release.py --out releases/ --models nesso-agentic --variants 4bit mixed
    python convert/release.py --out releases/ --upload-repo "mlx-community/{model}-{variant}-mlx"
    python convert/release.py --out releases/ --lm-eval-tasks arc_it,hellaswag_it --lm-eval-limit 200

Each variant is a complete folder (weights, config, tokenizer, model card with its quality report),
written atomically by nesso-mlx's converter. The source model's log-probabilities on the quality
sample are computed once per model and shared by its variants. SUMMARY.md and summary.json compare
all variants. `--upload-repo` pushes each folder to the Hugging Face Hub (needs a login).
`--lm-eval-tasks` adds lm-evaluation-harness scores of every variant (needs lm-eval and the tasks'
data sets, downloaded or cached; `--lm-eval-include` adds folders of local task YAML files).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nesso_mlx.convert import ConversionResult, convert, source_reference
from nesso_mlx.convert.card import precision_label
from nesso_mlx.errors import NessoError
from nesso_mlx.hub import resolve_model_path
from nesso_mlx.registry import KNOWN_MODELS, resolve_alias

# variant name -> convert() options. Group size 64 divides Nesso's hidden size (960); 128 does not.
VARIANTS = {
    "bf16": {"dtype": "bfloat16"},
    "8bit": {"quantize": True, "q_bits": 8, "q_group_size": 64},
    "4bit": {"quantize": True, "q_bits": 4, "q_group_size": 64},
    "mixed": {"quantize": True, "q_bits": 4, "q_group_size": 64, "q_recipe": "mixed_4_6"},
}


def model_name(model: str) -> str:
    """Folder-friendly name: the repo's name, or the folder's."""
    return Path(model.rstrip("/")).name


def lm_eval_cell(scores: dict[str, dict[str, float]] | None) -> str:
    """`task metric value` pairs for a table cell (the main metrics: acc, acc_norm, exact_match...)."""
    if not scores:
        return "-"
    return "; ".join(f"{task} {metric} {value:.4f}" for task, metrics in scores.items() for metric, value in metrics.items())


def summary_markdown(
    rows: list[tuple[str, str, ConversionResult]], lm_scores: dict[tuple[str, str], dict[str, dict[str, float]]] | None = None
) -> str:
    lines = [
        "| model | variant | precision | bits/weight | size (MB) | perplexity source → this | mean KL | top-1 agreement |"
        + (" lm-eval |" if lm_scores is not None else ""),
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |" + (" --- |" if lm_scores is not None else ""),
    ]
    for model, variant, r in rows:
        q = r.quality
        quality = (
            f"{q.perplexity_source:.3f} → {q.perplexity_candidate:.3f} | {q.mean_kl:.5f} | {100 * q.top1_agreement:.1f}%"
            if q
            else "= source | 0 | 100%"
        )
        recipe = VARIANTS[variant].get("q_recipe")
        lines.append(
            f"| {model} | {variant} | {precision_label(r, recipe)} | {r.bits_per_weight:.2f} | "
            f"{r.size_bytes / 1e6:.1f} | {quality} |"
            + (f" {lm_eval_cell(lm_scores.get((model, variant)))} |" if lm_scores is not None else "")
        )
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def upload(folder: Path, repo_id: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload MLX weights (nesso-mlx)")


def lm_eval_scores(
    path: Path, tasks: list[str], manager, limit: int | None, num_fewshot: int | None
) -> dict[str, dict[str, float]]:
    """lm-eval scores of one converted folder (nesso-mlx's lm-eval backend)."""
    from nesso_mlx import load
    from nesso_mlx.lm_eval_backend import evaluate, scores

    model, tokenizer = load(path)
    results = evaluate(model, tokenizer, tasks, name=str(path), limit=limit, num_fewshot=num_fewshot, manager=manager)
    return scores(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for all variants")
    parser.add_argument(
        "--models",
        nargs="+",
        default=[m.alias for m in KNOWN_MODELS],
        help="aliases, repo ids or folders (default: every Nesso model)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--eval-tokens", type=int, default=256, help="tokens per language in the quality report")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--force", action="store_true", help="replace existing variant folders")
    parser.add_argument("--upload-repo", help='repo id template, e.g. "mlx-community/{model}-{variant}-mlx"')
    parser.add_argument("--lm-eval-tasks", help="lm-eval tasks to score every variant on, comma-separated")
    parser.add_argument("--lm-eval-include", help="folder of extra lm-eval task YAML files")
    parser.add_argument("--lm-eval-limit", type=int, help="only the first N documents of each task")
    parser.add_argument("--lm-eval-fewshot", type=int, help="few-shot examples (default: the task's)")
    args = parser.parse_args(argv)

    manager, lm_tasks, lm_scores = None, [], None
    if args.lm_eval_tasks:
        lm_tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
        try:
            from nesso_mlx.lm_eval_backend import task_manager, unknown_tasks
        except ImportError:
            print("error: --lm-eval-tasks needs lm-eval: pip install 'nesso-mlx[eval]'", file=sys.stderr)
            return 1
        manager = task_manager(args.lm_eval_include)
        unknown = unknown_tasks(manager, lm_tasks)
        if unknown:
            print(f"error: unknown lm-eval task {', '.join(unknown)}", file=sys.stderr)
            return 1
        lm_scores = {}

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, ConversionResult]] = []
    try:
        for model in args.models:
            model = resolve_alias(model)  # nesso-agentic -> mii-llm/nesso-0.4B-agentic
            source = resolve_model_path(model)
            name = model_name(model)
            reference = None
            if not args.no_eval and any(VARIANTS[v].get("quantize") for v in args.variants):
                print(f"{name}: computing the source's reference on the quality sample", file=sys.stderr)
                reference = source_reference(source, args.eval_tokens)
            for variant in args.variants:
                dest = args.out / f"{name}-{variant}"
                print(f"{name}: {variant} -> {dest}", file=sys.stderr)
                result = convert(
                    model,
                    dest,
                    force=args.force,
                    evaluate=not args.no_eval,
                    eval_tokens=args.eval_tokens,
                    reference=reference,
                    **VARIANTS[variant],
                )
                rows.append((name, variant, result))
                if lm_tasks:
                    print(f"{name}: {variant}: lm-eval {', '.join(lm_tasks)}", file=sys.stderr)
                    lm_scores[(name, variant)] = lm_eval_scores(
                        result.path, lm_tasks, manager, args.lm_eval_limit, args.lm_eval_fewshot
                    )
                if args.upload_repo:
                    upload(result.path, args.upload_repo.format(model=name, variant=variant))
    except NessoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if rows:
            write_atomic(args.out / "SUMMARY.md", summary_markdown(rows, lm_scores))
            summary = [
                {
                    "model": m,
                    "variant": v,
                    "path": str(r.path),
                    "bits_per_weight": r.bits_per_weight,
                    "size_bytes": r.size_bytes,
                    "quality": r.quality.as_dict() if r.quality else None,
                    **({"lm_eval": lm_scores.get((m, v))} if lm_scores is not None else {}),
                }
                for m, v, r in rows
            ]
            write_atomic(args.out / "summary.json", json.dumps(summary, indent=2))
    print((args.out / "SUMMARY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
