"""The train state, the one jitted step and the loop.

    state, metrics = step(state, frozen, batch)

`state` (step, trainable params, optimizer state) is sharded by the logical-axis rules and
donated; `frozen` (VAE, LPIPS) is replicated, never differentiated, never in the optimizer;
`batch` is sharded over the batch axes. Every loss term is reduced over the global batch
inside this one program.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import sys
import threading
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ov3 import checkpoint as ckpt_lib
from ov3 import config as config_lib
from ov3 import init_from as init_from_lib
from ov3 import metrics as metrics_lib
from ov3 import paths, perf, sharding
from ov3 import flops as flops_lib
from ov3.errors import Ov3Error

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


# ----------------------------------------------------------------------------- optimizer

def learning_rate(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup to base_lr * batch / 256, then cosine to zero at total_steps."""
    peak = cfg.optim.base_lr * cfg.batch_size / 256
    warmup = max(min(cfg.optim.warmup_steps, cfg.total_steps - 1), 1)
    # optax needs a decay phase of at least one step: a one-step run (a smoke test) is allowed.
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(cfg.total_steps, warmup + 1), end_value=0.0)


def decays(path: tuple, _: Any) -> bool:
    """Weight decay on matmul/conv kernels only: not on norms, biases, embeddings, positions,
    the class token or the temperature."""
    names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in ("kernel", "qkv_kernel", "out_kernel")


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = cfg.optim
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(learning_rate(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mu_dtype=DTYPES[o.mu_dtype],
                    mask=lambda params: jax.tree_util.tree_map_with_path(decays, params)),
    )


# ----------------------------------------------------------------------------- step

class Trainer:
    """Builds the sharded init and step functions for a task on a mesh."""

    def __init__(self, cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, task: Any):
        self.cfg, self.mesh, self.task = cfg, mesh, task
        self.tx = make_optimizer(cfg)
        self.schedule = learning_rate(cfg)

        def boxed_state(rng: jax.Array) -> TrainState:
            params = task.init(rng)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

        self._boxed_state = boxed_state
        key = jax.random.key(cfg.seed)  # outside the mesh: a concrete op there needs addressable devices
        with self.context():
            abstract = jax.eval_shape(boxed_state, key)
        self.state_shardings = sharding.shardings_from_logical(abstract, mesh)
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            nn.meta.unbox(abstract), self.state_shardings)
        self.frozen_shardings = None
        self._step = jax.jit(self._train_step, donate_argnums=(0,),
                             out_shardings=(self.state_shardings, sharding.replicated(mesh)))

    def context(self):
        """Mesh + logical rules: what `nn.with_logical_constraint` inside the models reads."""
        import contextlib
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(sharding.RULES))
        return stack

    def init_state(self) -> TrainState:
        with self.context():
            return jax.jit(lambda r: nn.meta.unbox(self._boxed_state(r)),
                           out_shardings=self.state_shardings)(jax.random.key(self.cfg.seed))

    def put_frozen(self, frozen: Any) -> Any:
        return jax.device_put(frozen, sharding.replicated(self.mesh))

    def _train_step(self, state: TrainState, frozen: Any, batch: dict[str, jax.Array]
                    ) -> tuple[TrainState, dict[str, jax.Array]]:
        # Randomness is a function of (seed, step) only, so a resumed run draws the same noise.
        rng = jax.random.fold_in(jax.random.key(self.cfg.seed), state.step)
        (loss, terms), grads = jax.value_and_grad(self.task.loss, has_aux=True)(
            state.params, frozen, batch, rng)
        with jax.named_scope("optimizer"):  # the scope names the cost in ov3.tools.roofline
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = self.task.constrain(optax.apply_updates(state.params, updates))
        grad_norm = optax.global_norm(grads)
        # The update too: a finite gradient can still give a non-finite update (a NaN learning rate).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
        # A non-finite step leaves params and optimizer untouched ("stop" ends the run after
        # it, "skip" goes on): the state never holds a NaN, so neither does any checkpoint.
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                               opt_state=jax.tree.map(keep, opt_state, state.opt_state))
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": self.schedule(state.step),
                   "finite": finite}
        return new_state, metrics

    def step(self, state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
        with self.context():
            return self._step(state, frozen, batch)

    def compile(self, state: TrainState, frozen: Any, batch: dict[str, jax.Array]) -> Any:
        """AOT-compile the step (before step 1) and return the compiled executable."""
        with self.context():
            return self._step.lower(state, frozen, batch).compile()


# ----------------------------------------------------------------------------- loop

def prepare_workdir(workdir: str | os.PathLike) -> paths.Path:
    """Create DIR (a local folder or gs://bucket/prefix) and prove it is writable before
    anything is compiled."""
    path = paths.path(workdir)
    try:
        paths.makedirs(path)  # on gs:// a missing bucket fails the probe instead
        # Named without jax.process_index(): that would start the backend before jax.distributed.
        probe = path / f".write_test_{platform.node()}_{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:  # gcsfs raises OSError subclasses too (FileNotFoundError: no such bucket)
        raise Ov3Error(f"workdir {path} is not writable ({e.strerror or e}); pick another --workdir, "
                       "free space there, or (gs://) create the bucket and grant this machine write access.") from e
    return path


def build_task(cfg: ml_collections.ConfigDict) -> tuple[Any, Any]:
    """(task, tokenizer or None) for `config.task`."""
    from ov3 import tasks
    from ov3.models import vae as vae_lib
    from ov3.models import vae_weights
    pixels = cfg.task == "ov3" and cfg.model.input == "pixels"  # no VAE: the "w/o VAE" ablation
    if not cfg.vae.path and not pixels:
        raise Ov3Error("config.vae.path is empty: point it at a diffusers AutoencoderKL folder "
                       "(config.json + diffusion_pytorch_model.safetensors) or FLUX's ae.safetensors.")
    dtype = DTYPES[cfg.vae.dtype]
    if cfg.task == "vae":
        folder = paths.path(cfg.vae.path)
        if (folder / "config.json").is_file() and not (folder / vae_weights.WEIGHTS_NAME).is_file():
            # An architecture without weights: train it from random init.
            vae = vae_lib.init_random(json.loads((folder / "config.json").read_text()), cfg.seed, dtype=dtype,
                                      latent_norm=cfg.vae.latent_norm, remat_decoder=cfg.vae.remat_decoder)
        else:
            vae = vae_weights.from_pretrained(folder, dtype, cfg.vae.latent_norm, remat_decoder=cfg.vae.remat_decoder)
        return tasks.VAETask(cfg, vae=vae), None
    from ov3.data.tokenizer import Tokenizer
    vae = vae_lib.Identity() if pixels else vae_weights.from_pretrained(
        cfg.vae.path, dtype, cfg.vae.latent_norm, remat_decoder=cfg.vae.remat_decoder)
    tokenizer = Tokenizer.from_file(tokenizer_path(cfg))
    task = tasks.OV3Task(cfg, vae=vae, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return task, tokenizer


def tokenizer_path(cfg: ml_collections.ConfigDict) -> str:
    return cfg.data.tokenizer or str(paths.path(cfg.data.path) / "tokenizer.json")


class StopSignal:
    """SIGTERM/SIGINT -> finish the current step, save, exit cleanly (preemption).

    The loop reads the flag between steps. Where the run cannot get there, a watcher thread,
    woken by the signal itself (the main thread may be inside XLA or a collective, where no
    Python handler runs), ends the process with one line saying where it waited: at once before
    the first step (reading data, restoring, compiling: nothing to save yet), else after
    `grace_s` without reaching a step boundary (a collective whose peer died, a hung read).
    Several processes stop after the same step, agreed through jax.distributed (`reached`)."""

    def __init__(self, grace_s: float):
        self.requested = False
        self.where = "starting"   # what the main thread is doing, for the exit line
        self.stepping = False     # the loop runs: it acts on the flag itself
        self._grace_s = grace_s
        self._closed = False
        read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        # Several processes: chain SIGTERM to jax.distributed's own handler (its preemption sync
        # manager), read before ours replaces it, so that `reached` is agreed through it.
        self._native = _native_sigterm_handler() if jax.distributed.is_initialized() else None
        self._previous = [signal.set_wakeup_fd(self._write)]
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous.append((sig, signal.signal(sig, self._handle)))
        threading.Thread(target=self._watch, args=(read,), daemon=True, name="ov3-stop-watcher").start()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True
        if self._native is not None:
            self._native(signal.SIGTERM)  # SIGINT too: the coordination service hears of it

    def _watch(self, read: int) -> None:
        while True:
            got = os.read(read, 1)
            if not got:  # closed: the run is over
                os.close(read)
                return
            if got[0] in (signal.SIGTERM, signal.SIGINT):
                break
        self.requested = True
        if self.stepping:
            time.sleep(self._grace_s)
            if self._closed:  # the loop saved and returned in time
                return
            why = f"but the run did not end within stop_grace_s={self._grace_s:g} s (it was {self.where})"
        else:
            why = f"while {self.where}, before the first step: nothing to save"
        print(f"ov3: stop requested {why}; exiting. The last complete checkpoint stays.",
              file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)

    def close(self) -> None:
        """Restore the previous handlers; the watcher ends."""
        self._closed = True
        signal.set_wakeup_fd(self._previous[0])
        for sig, handler in self._previous[1:]:
            signal.signal(sig, handler)
        os.close(self._write)

    def reached(self, step: int) -> bool:
        """Call after every step with its number, on every process: True on all of them at the
        same step. Several processes: the step jax.distributed's coordination service settled on
        after a signal on any of them (the largest step any was at, plus one), a local check with
        no device collective, so the host never waits here for the step in flight. (Should
        another library own SIGTERM's native handler, the flags are all-gathered instead.)"""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        if self._native is None:
            return bool(np.any(multihost_utils.process_allgather(np.array(self.requested))))
        return multihost_utils.reached_preemption_sync_point(step)


def _native_sigterm_handler() -> Any:
    """The C-level SIGTERM handler that is not Python's (jax.distributed's preemption notifier
    installs one), as a Python callable, or None. Read with sigaction before Python's handler
    replaces it; that native handler only sets a flag its own thread polls, so calling it from
    Python is what the signal itself would have done."""
    import ctypes
    if signal.getsignal(signal.SIGTERM) is not None:  # Python's own (or the default): nothing to chain
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    action = ctypes.create_string_buffer(256)  # struct sigaction: its first member is the handler
    if libc.sigaction(signal.SIGTERM, None, action) != 0:
        return None
    address = ctypes.c_void_p.from_buffer(action).value
    if address in (None, 0, 1):  # SIG_DFL, SIG_IGN
        return None
    return ctypes.CFUNCTYPE(None, ctypes.c_int)(address)


def save_config(cfg: ml_collections.ConfigDict, workdir: paths.Path, tokenizer: Any, trainer: Trainer,
                step: int) -> None:
    """DIR/config.json (and DIR/config.<step>.json, the history: one per start or resume),
    DIR/tokenizer.json, and DIR/parameters.txt: every trainable tensor with its shape, size and
    mesh axes (clu's parameter overview, as the Flax examples log it). Called once the
    checkpoint restored (or on a fresh start): a refused resume leaves the files as they were."""
    if jax.process_index() != 0:
        return
    from clu import parameter_overview
    text = cfg.to_json_best_effort(indent=2)
    (workdir / f"config.{step}.json").write_text(text)
    (workdir / "config.json").write_text(text)
    if tokenizer is not None:
        paths.copy(tokenizer_path(cfg), workdir / "tokenizer.json")
    # The VAE's facts (scaling factor, channels, down-sampling) travel with the run: export reads
    # them here, wherever the VAE folder is by then.
    from ov3.models.vae import PixelSpace
    if not isinstance(trainer.task.vae.config, PixelSpace):  # a model.input="pixels" run has no VAE
        (workdir / "vae_config.json").write_text(json.dumps(trainer.task.vae.config.to_diffusers_dict(), indent=2))
    params = trainer.abstract_state.params
    table = parameter_overview.get_parameter_overview(params, include_stats="sharding")
    (workdir / "parameters.txt").write_text(table + "\n")
    print(f"{int(parameter_overview.count_parameters(params)):,} trainable parameters "
          f"(per tensor: {workdir / 'parameters.txt'})", flush=True)


def write_reconstruction_grid(trainer: Trainer, state: TrainState, frozen: Any, images: jax.Array,
                              workdir: paths.Path, writer: metrics_lib.MetricWriter, step: int) -> paths.Path:
    """Held-out originals (top row) over their reconstructions (bottom row), labelled and
    upscaled to >= 512 px wide, as a PNG in DIR."""
    from PIL import Image
    with trainer.context():
        recon = jax.jit(trainer.task.reconstruct)(state.params, frozen, images)
    grid = metrics_lib.image_grid([to_host(images), to_host(recon)],
                                  ["originals (held out)", f"reconstructions at step {step}"])
    path = workdir / f"reconstructions_{step:06d}.png"
    if jax.process_index() == 0:
        with path.open("wb") as f:
            Image.fromarray(grid).save(f, format="PNG")
        writer.image(step, "reconstructions", grid)
    return path


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Run (or resume) training in `workdir`; returns the last logged metrics."""
    from ov3.data import pipeline
    from ov3 import xla_flags
    for var, value in xla_flags.apply().items():  # before JAX starts its backend
        print(f"{var}={value}", flush=True)
    config_lib.validate(cfg)
    workdir = prepare_workdir(workdir)
    sharding.maybe_initialize_distributed()
    # After jax.distributed (which installs its own SIGTERM handler), before the slow parts.
    stop = StopSignal(cfg.stop_grace_s)
    stop.where = "building the model, the evaluators and the input pipeline"
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(cfg.batch_size, mesh)
    if cfg.data.use_cached_latents:  # latents of another VAE would train against this VAE's decoder
        from ov3.data import shapes
        shapes.check_vae(cfg.data.path, cfg.vae.path, cfg.vae.latent_norm)
    task, tokenizer = build_task(cfg)
    trainer = Trainer(cfg, mesh, task)
    from ov3.evals import evaluators  # config.evals, built (weights loaded, splits checked) before compiling
    evals = evaluators.from_config(cfg, trainer, tokenizer)
    data = pipeline.make_iterator(cfg.data, mesh=mesh, global_batch_size=cfg.batch_size,
                                  image_size=cfg.image_size, split="train", train=True, seed=cfg.seed,
                                  tokenizer=tokenizer,
                                  caption_sentence="caption_sentence" in cfg.loss.get("contrastive_texts", ()))
    ckpt_lib.check_free_space(workdir, trainer.abstract_state, cfg.keep_checkpoints)
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=cfg.keep_checkpoints)

    start = checkpointer.resume_step(cfg.resume_step)
    stop.where = "initialising" if start is None else f"restoring checkpoint {start}"
    if start is None:
        state, start = trainer.init_state(), 0
        if cfg.init_from:  # params from another run or an open_clip checkpoint, fresh optimizer
            state = init_from_lib.apply(trainer, state, cfg.init_from)
    else:
        state = checkpointer.restore(start, trainer.abstract_state, data)
        print(f"resumed from {checkpointer.directory / str(start)}", flush=True)
    save_config(cfg, workdir, tokenizer, trainer, start)
    frozen = trainer.put_frozen(task.frozen_params())
    if jax.process_index() == 0:  # the steps after the checkpoint are logged again by this run
        metrics_lib.truncate_jsonl(workdir / "metrics.jsonl", start)
    writer = metrics_lib.MetricWriter(workdir, cfg.log, cfg)

    stop.where = "reading the first batch"
    batch = next(data)
    stop.where = "compiling the train step"
    t_compile = time.time()
    compiled = trainer.compile(state, frozen, batch)
    print(f"compiled the train step in {time.time() - t_compile:.1f}s; "
          f"memory per device: {describe_memory(compiled)}", flush=True)
    stop.where = "waiting for the other processes to compile"
    sharding.sync_processes("compiled")  # processes start stepping together
    stop.stepping = True
    # Analytic model FLOPs (not compiled.cost_analysis(): it counts a scanned block stack once).
    step_flops = flops_lib.train_flops_per_example(
        flops_lib.task_costs(cfg, task, cached_latents="latent" in batch)) * cfg.batch_size

    held_out: dict[str, Any] = {}

    def held_out_batch() -> dict[str, Any]:
        """The first held-out batch, read once: every reconstruction grid shows the same images."""
        if not held_out:
            held_out.update(next(pipeline.make_iterator(
                cfg.data, mesh=mesh, global_batch_size=cfg.batch_size, image_size=cfg.image_size,
                split=cfg.data.eval_split, train=False, seed=cfg.seed, tokenizer=tokenizer)))
        return held_out

    progress = metrics_lib.Progress(cfg.total_steps, start)  # after compiling: the ETA counts steps only
    last_logged: dict[str, float] = {}
    pending = None  # metrics of the previous step, checked one step late to keep dispatch async
    skipped = 0  # non-finite steps whose update was dropped since the last log line
    window_start, window_steps = time.time(), 0
    step = start
    while step < cfg.total_steps:
        stop.where = f"step {step + 1}"
        with trainer.context():
            state, metrics = compiled(state, frozen, batch)  # dispatched; runs while the host goes on
        step += 1
        window_steps += 1
        # The next batch, read, assembled and sent to the devices while this step runs; the data
        # position a checkpoint of this step records is the one before it.
        data_state = data.get_state()
        if step < cfg.total_steps:
            stop.where = f"reading the batch of step {step + 1}"
            batch = next(data)
        if pending is not None:
            skipped += not check_finite(pending, step - 1, cfg.nonfinite, checkpointer)
        pending = metrics
        if step % cfg.log_every == 0 or step == cfg.total_steps:
            skipped += not check_finite(metrics, step, cfg.nonfinite, checkpointer)
            pending = None  # checked; not counted again
            values = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
            values["nonfinite_skipped"], skipped = skipped, 0
            elapsed = time.time() - window_start
            values["step_time_s"] = elapsed / window_steps
            values["images_per_s"] = cfg.batch_size * window_steps / elapsed
            values.update(perf.utilisation(step_flops, values["step_time_s"]))
            values.update({f"data/skipped/{k}": v for k, v in sharding.sum_over_processes(data.stats()).items()})
            writer.scalars(step, values)
            if jax.process_index() == 0:
                print(progress.line(step, values, values["images_per_s"]), flush=True)
            last_logged = values
            window_start, window_steps = time.time(), 0
        stop.where = f"agreeing with the other processes on a stop after step {step}"
        preempted = stop.reached(step)
        # Save before evaluating: an evaluator that fails (OOM in a full-batch probe) loses no step.
        if step % cfg.checkpoint_every == 0 or step == cfg.total_steps or preempted:
            checkpointer.save(step, state, data_state, force=True)
        if preempted:  # a preempted step skips its evaluators: the grace period is for saving
            print(f"stop requested: saved step {step}, exiting", flush=True)
            stop.where = f"writing checkpoint {step}"
            break
        # Evaluators due now (every N steps, all after the last); their time is not step time.
        stop.where = f"evaluating at step {step}"
        try:
            window_start += evals.run_due(step, state.params, frozen, writer)
        except BaseException:
            checkpointer.wait()  # the save issued above completes before the error ends the run
            raise
        if cfg.recon_grid_every and step % cfg.recon_grid_every == 0 and step < cfg.total_steps:
            t_grid = time.time()
            write_reconstruction_grid(trainer, state, frozen,
                                      pipeline.image_to_float(held_out_batch()["image"][:8]), workdir, writer, step)
            window_start += time.time() - t_grid  # like evaluators: not step time
    stop.where = f"writing checkpoint {step} and the final outputs"
    checkpointer.wait()
    if step == cfg.total_steps:
        path = write_reconstruction_grid(trainer, state, frozen,
                                         pipeline.image_to_float(held_out_batch()["image"][:8]), workdir, writer, step)
        print(f"wrote {path}", flush=True)
        if cfg.task == "vae" and jax.process_index() == 0:
            print(f"wrote the fitted VAE to {task.save_vae(state.params, held_out_batch()['image'], workdir / 'vae')}")
    checkpointer.close()
    writer.close()
    stop.close()
    return last_logged


def explain_failure(error: BaseException, cfg: ml_collections.ConfigDict, workdir: str) -> str | None:
    """One line for the failures a user can fix that arrive as library exceptions, else None:
    out of device memory (XLA's RESOURCE_EXHAUSTED, at compile or run time) and a full disk."""
    chain, e = [], error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        lines = str(e).strip().splitlines() or [""]
        if "RESOURCE_EXHAUSTED" in str(e):
            first = next(line for line in lines if "RESOURCE_EXHAUSTED" in line).strip()[:200]
            batch_devices = max(jax.device_count() // max(int(cfg.mesh.tensor), 1), 1)
            remat = (f"vae.remat_decoder={cfg.vae.remat_decoder}" if cfg.task == "vae"
                     else f"model.remat={cfg.model.remat!r}")
            return (f"out of device memory ({first}) with batch_size={cfg.batch_size} "
                    f"({cfg.batch_size / batch_devices:g} per device over {batch_devices} batch-sharded devices) "
                    f"and {remat}: lower config.batch_size, set config.model.remat='full' (or 'dots'; "
                    "config.vae.remat_decoder=True for task='vae'), split the state with config.mesh.fsdp, "
                    "or add devices.")
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            steps = ckpt_lib.finished_steps(workdir)
            kept = (f"the last complete checkpoint, step {steps[-1]}, stays: free space there and run the same "
                    "command to resume from it" if steps else "no checkpoint was complete yet: free space and "
                    "start again")
            return f"disk full while writing to {workdir} ({lines[0].strip()[:200]}); {kept}."
    return None


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array as numpy on every process (also when other processes hold parts of it)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_finite(metrics: dict[str, jax.Array], step: int, mode: str, checkpointer: Any = None) -> bool:
    """True if the step was finite. If not: "skip" says so and returns False; "stop" waits for
    the checkpoint being written (so the last one is complete) and raises."""
    if bool(metrics["finite"]):
        return True
    terms = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    if mode == "skip":
        if jax.process_index() == 0:
            print(f"step {step}: non-finite loss or gradient ({shown}); update skipped", flush=True)
        return False
    if checkpointer is not None:
        checkpointer.wait()
    raise Ov3Error(f"non-finite loss or gradient at step {step}: {shown}. The update was not applied; the "
                   "last checkpoint is intact. Lower optim.base_lr, check the data, or set nonfinite='skip'.")


def describe_memory(compiled: Any) -> str:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return "not reported by this backend"
    if m is None:
        return "not reported by this backend"
    gib = 2 ** 30
    return (f"arguments {m.argument_size_in_bytes / gib:.3f} GiB, outputs {m.output_size_in_bytes / gib:.3f} GiB, "
            f"temporaries {m.temp_size_in_bytes / gib:.3f} GiB, code {m.generated_code_size_in_bytes / gib:.3f} GiB")
