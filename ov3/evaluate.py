"""CLI: evaluate a checkpoint of a training run.

    python -m ov3.evaluate --workdir DIR [--step N] [--config FILE] [--only NAME,...] [--mesh D,F,T]

Reads DIR/config.json (or --config: a configs/*.py file or a config.json), restores the
parameters of step N (default: the latest checkpoint) onto this machine's mesh, runs every
evaluator of `config.evals` whatever its `every` (when there is none: reconstruction, and
retrieval for task='ov3', on config.data.eval_split), prints a table and writes it to
DIR/eval_<N>.json and DIR/eval_<N>.md beside the paper's numbers where the paper has them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Optional, Sequence

import ml_collections

from ov3 import paths
from ov3.errors import Ov3Error


def load_config(workdir: paths.Path, path: Optional[str]) -> ml_collections.ConfigDict:
    from ov3 import config as config_lib
    source = paths.path(path) if path else workdir / "config.json"
    if not source.is_file():
        raise Ov3Error(f"{source} does not exist: pass --workdir of a training run (it writes "
                       "config.json) or --config FILE.")
    if source.suffix == ".py":
        spec = importlib.util.spec_from_file_location("ov3_eval_config", os.fspath(source))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config()
    else:
        cfg = config_lib.base_config()
        try:
            cfg.update(json.loads(source.read_text()))
        except (ValueError, TypeError, KeyError) as e:
            raise Ov3Error(f"{source} is not an ov3 config.json ({e}).") from None
    # The vocabulary the model was trained with, copied into DIR by training.
    if not path and (workdir / "tokenizer.json").is_file():
        cfg.data.tokenizer = str(workdir / "tokenizer.json")
    if not cfg.evals:
        cfg.evals.reconstruction = ml_collections.ConfigDict(dict(type="reconstruction"))
        if cfg.task == "ov3":
            cfg.evals.retrieval = ml_collections.ConfigDict(dict(type="retrieval"))
        print(f"config.evals is empty: running {', '.join(cfg.evals.keys())} on split "
              f"{cfg.data.eval_split!r}", flush=True)
    return cfg


def evaluate(workdir: str | os.PathLike, step: Optional[int] = None, config: Optional[str] = None,
             only: Optional[Sequence[str]] = None, mesh: Optional[Sequence[int]] = None
             ) -> tuple[int, dict[str, dict[str, float]], list[paths.Path]]:
    """Runs the evaluators on checkpoint `step` of `workdir`; returns (step, results, files)."""
    import jax
    from ov3 import checkpoint as ckpt_lib
    from ov3 import config as config_lib
    from ov3 import sharding, train
    from ov3.evals import evaluators, report

    workdir = paths.path(workdir)
    cfg = load_config(workdir, config)
    if mesh:
        cfg.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
    if only:
        unknown = sorted(set(only) - set(cfg.evals.keys()))
        if unknown:
            raise Ov3Error(f"--only {','.join(unknown)}: not in config.evals ({', '.join(cfg.evals.keys())}).")
        for name in list(cfg.evals.keys()):
            if name not in only:
                del cfg.evals[name]
    config_lib.validate(cfg)
    sharding.maybe_initialize_distributed()
    task, tokenizer = train.build_task(cfg)
    trainer = train.Trainer(cfg, sharding.make_mesh(cfg.mesh), task)
    evals = evaluators.from_config(cfg, trainer, tokenizer)

    checkpointer = ckpt_lib.Checkpointer(workdir)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise Ov3Error(f"{checkpointer.directory} holds no checkpoint; train first or pick the workdir.")
        if step not in checkpointer.manager.all_steps():
            raise Ov3Error(f"no checkpoint of step {step} in {checkpointer.directory}; it has "
                           f"{sorted(checkpointer.manager.all_steps())}.")
        params = checkpointer.restore(step, trainer.abstract_state, None).params
    finally:
        checkpointer.close()
    frozen = trainer.put_frozen(task.frozen_params())
    results = evals.run(params, frozen)

    specs = {e.name: {k: v for k, v in e.spec.items()} for e in evals.evaluators}
    files: list[paths.Path] = []
    if jax.process_index() == 0:
        print(report.table(results, specs), flush=True)
        extra: dict[str, Any] = {"workdir": str(paths.absolute(workdir)), "image_size": cfg.image_size,
                                 "devices": jax.device_count()}
        files = list(report.write(workdir, step, results, specs, extra))
        print(f"wrote {files[0]} and {files[1]}", flush=True)
    return step, results, files


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ov3.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="the training run's directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--config", default=None, help="a configs/*.py or config.json (default: DIR/config.json)")
    p.add_argument("--only", default=None, help="comma-separated evaluator names to run")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor sizes, e.g. -1,1,1 (default: the config's)")
    args = p.parse_args(argv)
    try:
        mesh = None
        if args.mesh:
            try:
                mesh = [int(v) for v in args.mesh.split(",")]
            except ValueError:
                raise Ov3Error(f"--mesh={args.mesh!r}: give three ints data,fsdp,tensor, e.g. -1,1,1") from None
            if len(mesh) != 3:
                raise Ov3Error(f"--mesh={args.mesh!r}: give three ints data,fsdp,tensor, e.g. -1,1,1")
        evaluate(args.workdir, args.step, args.config, args.only.split(",") if args.only else None, mesh)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        return 2
    from ov3 import sharding
    sharding.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
