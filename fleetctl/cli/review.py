"""`warmfleet review A B`: the same prompts and seeds on two releases, side by side (fleetctl/review.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import _settings, friendly


@click.command()
@click.argument("release_a")
@click.argument("release_b")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a file of prompts, one a line (default: the built-in set of the releases' family)")
@click.option("--seed", "seeds", type=int, multiple=True, help="seed (repeatable; default 1000)")
@click.option("--steps", type=int, help="denoising steps (default: each release's own)")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for review.png, review.html and review.json (default: <state dir>/review)")
@click.option("--timeout", default=300.0, help="seconds to wait for each job")
@click.pass_context
@friendly
def review(ctx: click.Context, release_a: str, release_b: str, prompts_file: Path | None, seeds: tuple[int, ...],
           steps: int | None, out: Path | None, timeout: float) -> None:
    """Render the same prompts and seeds on RELEASE_A and RELEASE_B through the fleet (pinned review jobs: no route
    touched, no canary counter changed) into one side-by-side sheet with pixel difference and SSIM per pair."""
    from cachemgr.names import Release
    from fleetctl.demo.sheet import read_image
    from fleetctl.review import builtin_prompts, evaluate, read_prompts, send_review, write_html, write_sheet
    from tasks import generate

    settings = _settings(ctx)
    a, b = str(Release.parse(release_a)), str(Release.parse(release_b))
    if a == b:
        raise click.ClickException(f"review needs two different releases, got {a} twice")
    try:
        prompts = read_prompts(prompts_file) if prompts_file else builtin_prompts(a)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    params = {"steps": steps} if steps else {}
    pairs, seconds = send_review(generate, a, b, prompts, list(seeds) or [1000], timeout=timeout, **params)
    evaluate(pairs, lambda result: read_image(result, settings.resolved_output_url))
    out = out or settings.state_dir / "review"
    sheet = write_sheet(pairs, out / "review.png")
    page = write_html(pairs, out / "review.html", seconds)
    summary = [{"prompt": p.prompt, "seed": p.seed, **p.figures, "a": p.a.result["image_uri"],
                "b": p.b.result["image_uri"], "judge_a": p.a.verdict, "judge_b": p.b.verdict} for p in pairs]
    (out / "review.json").write_text(json.dumps({"a": a, "b": b, "seconds": seconds, "pairs": summary}, indent=1))
    for row in summary:
        click.echo(f"{row['prompt'][:40]:<40} seed {row['seed']:<6} SSIM {row['ssim']:.3f}  mean|A-B| "
                   f"{row['mean_abs_diff']:6.2f}  judge A {row['judge_a'] or '-'}  B {row['judge_b'] or '-'}")
    click.echo(f"{2 * len(pairs)} jobs in {seconds:.2f}s\nsheet: {sheet}\npage:  {page}")
