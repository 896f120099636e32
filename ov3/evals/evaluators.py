"""Evaluators from `config.evals`, run inside the training loop and by `python -m ov3.evaluate`.

    config.evals.recon = ml_collections.ConfigDict(dict(type="reconstruction", every=200))
    config.evals.ret = ml_collections.ConfigDict(dict(type="retrieval", every=200))

    evals = evaluators.from_config(cfg, trainer, tokenizer)       # validates, loads weights
    evals.run_due(step, state.params, frozen, writer)             # in the loop, after logging

Each entry names a registered type (big_vision's evaluator registry, in small files):
  reconstruction  PSNR, SSIM, LPIPS / rFID when their weights are configured   (reconstruction.py)
  retrieval       image<->text R@1/5/10                                         (understanding.py)
  zero_shot       top-1/top-5 from class-name prompts                           (understanding.py)
  linear_probe    logistic regression on pooled features and on mean tokens    (understanding.py)
Keys every type takes are in `base.COMMON_KEYS`, type-specific ones in its `KEYS`; both
are checked by `config.validate` before anything compiles. Results are logged as
`eval/<name>/<metric>` plus `eval/<name>/time_s` and `eval/<name>/skipped/<reason>` (examples
the pipeline could not use, e.g. corrupt images; one metrics.jsonl row per step that ran
evaluators).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Optional

import jax
import ml_collections

from ov3.evals import reconstruction, understanding  # noqa: F401  (they register their types)
from ov3.evals.base import REGISTRY, Context, Evaluator, ModelFns, resolve_spec, spec_errors

__all__ = ["REGISTRY", "Evaluators", "config_errors", "from_config", "Context", "ModelFns"]


def config_errors(cfg: ml_collections.ConfigDict) -> list[str]:
    """Device-free checks of every `config.evals` entry, for `config.validate`."""
    errors = []
    for name, raw in (cfg.get("evals") or {}).items():
        problems = spec_errors(name, raw)
        if not problems and cfg.task == "vae" and REGISTRY[raw["type"]].NEEDS:
            problems = [f"config.evals.{name}.type={raw['type']!r} needs the image and text towers; "
                        "task='vae' has neither: use 'reconstruction' or drop the entry"]
        errors += problems
    return errors


class Evaluators:
    """The configured evaluators and when they are due."""

    def __init__(self, evaluators: list[Evaluator], ctx: Optional[Context], total_steps: int):
        self.evaluators, self.ctx, self.total_steps = evaluators, ctx, total_steps

    def __len__(self) -> int:
        return len(self.evaluators)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.evaluators]

    def due(self, step: int) -> list[Evaluator]:
        """every=N: at multiples of N; every evaluator also after the last step."""
        return [e for e in self.evaluators
                if step == self.total_steps or (e.every and step % e.every == 0)]

    def run(self, params: Any, frozen: Any, which: Iterable[Evaluator] | None = None
            ) -> dict[str, dict[str, float]]:
        """{name: {metric: value, "time_s": seconds}} for `which` (default: all)."""
        results = {}
        for ev in self.evaluators if which is None else which:
            t0 = time.time()
            ev.skipped = {}
            values = ev.run(params, frozen)
            skipped = {f"skipped/{k}": float(v) for k, v in ev.skipped.items()}
            results[ev.name] = {**values, "time_s": time.time() - t0, **skipped}
        return results

    def run_due(self, step: int, params: Any, frozen: Any, writer: Any) -> float:
        """Runs what is due at `step`, logs `eval/<name>/<metric>`; returns the seconds spent
        (the loop leaves them out of its step time)."""
        due = self.due(step)
        if not due:
            return 0.0
        t0 = time.time()
        results = self.run(params, frozen, due)
        row = {f"eval/{name}/{k}": v for name, values in results.items() for k, v in values.items()}
        writer.scalars(step, row)
        if jax.process_index() == 0:
            for name, values in results.items():
                shown = " ".join(f"{k}={v:.4g}" for k, v in values.items()
                                 if k != "time_s" and not (k.startswith("skipped/") and not v))
                print(f"eval {name} at step {step}: {shown} ({values['time_s']:.1f}s)", flush=True)
        return time.time() - t0


def build(cfg: ml_collections.ConfigDict, ctx: Context) -> Evaluators:
    """Evaluators for `cfg.evals` in `ctx` (raises Ov3Error naming config.evals.<name>.<key>)."""
    evaluators = []
    for name, raw in (cfg.get("evals") or {}).items():
        spec = resolve_spec(name, raw)
        evaluators.append(REGISTRY[spec["type"]](name, spec, ctx))
    return Evaluators(evaluators, ctx, int(cfg.total_steps))


def from_config(cfg: ml_collections.ConfigDict, trainer: Any, tokenizer: Any,
                fns: Optional[ModelFns] = None) -> Evaluators:
    """Evaluators on the trainer's mesh, calling the trainer's task (or `fns`)."""
    ctx = Context(cfg=cfg, mesh=trainer.mesh, scope=trainer.context, tokenizer=tokenizer,
                  fns=fns or ModelFns.from_task(trainer.task))
    return build(cfg, ctx)
