"""`python -m quantspace quantize ... --on-hf-jobs [FLAVOR]`: plan, confirm, start, then follow or detach."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import hf_jobs
from .errors import BadOptionError


def run_on_jobs(args: argparse.Namespace, options: dict[str, Any], table: Callable[[Any], str]) -> int:
    from .cli import _Bars
    from .hub import resolve_token

    if args.out:
        raise BadOptionError("--out has no meaning on Hugging Face Jobs: the result is pushed (--push).")
    if args.eval_text:
        raise BadOptionError("--eval-text names a file of this machine; a Job cannot read it.")
    token = hf_jobs.require_token(resolve_token(None))
    plan = hf_jobs.make_plan(args.source, args.method, args.variants, args.push, args.private, args.no_eval,
                             args.ctx, args.chunks, args.allow_pickle, options, token=token, flavor=args.on_hf_jobs,
                             timeout=args.job_timeout, namespace=args.namespace, image=args.job_image)
    print(plan.summary(), file=sys.stderr)
    print(f"Image: {plan.image}\nCommand: {hf_jobs.shell_line(plan.command)}", file=sys.stderr)
    if not args.yes:
        if not sys.stdin.isatty():
            print("Not started: add --yes to start it without a terminal.", file=sys.stderr)
            return 1
        if input("Start this Job? [y/N] ").strip().lower() not in ("y", "yes"):
            print("Not started.", file=sys.stderr)
            return 1
    job = hf_jobs.Job(plan, hf_jobs.start(plan, token), token)
    print(f"Job {job.id}: {job.state.url}", file=sys.stderr)
    if args.detach:
        print(job.id)
        return 0
    bars = _Bars()
    try:
        report = job.follow(progress=bars)
    except KeyboardInterrupt:
        bars.close()
        job.cancel()
        print(f"interrupted: Job {job.id} was cancelled", file=sys.stderr)
        return 130
    except hf_jobs.JobsError as exc:
        bars.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bars.close()
    print(table(report))
    print(f"\npushed: {report.repo_url or plan.push}")
    return 0
