"""The device mesh and the one table that maps logical axis names onto it.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded along their `embed` dimension), `tensor` (heads / MLP / vocab split). The batch
is sharded over `data` and `fsdp` together. Nothing outside this file names a mesh axis.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ov3.errors import Ov3Error

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None = replicated). Params use the plain names,
# activations the `act_*` names.
RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("layers", None),
    ("norm", None),
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor) from `config.mesh`; one of them may be -1 (fill)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise Ov3Error(f"config.mesh {dict(zip(MESH_AXES, sizes))}: give positive sizes, at most one -1 (fill).")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise Ov3Error(f"config.mesh: {num_devices} devices cannot be split into the fixed axes "
                           f"{dict(zip(MESH_AXES, sizes))} (product {known} does not divide {num_devices}).")
        sizes[MESH_AXES.index(fill[0])] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise Ov3Error(f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} slots but there are "
                       f"{num_devices} devices; set one axis to -1 to fill.")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:  # topology-aware placement on TPU/GPU; plain reshape where it has no opinion
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_parallelism(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, key: str = "batch_size") -> None:
    n = batch_parallelism(mesh)
    procs = jax.process_count()
    if global_batch % n:
        raise Ov3Error(f"config.{key}={global_batch} is not divisible by the batch-parallel mesh size "
                       f"data*fsdp={n} (mesh {dict(mesh.shape)}); use a multiple of {n}.")
    if global_batch % procs:
        raise Ov3Error(f"config.{key}={global_batch} is not divisible by the {procs} processes.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dims they do not divide (tiny or odd-sized params stay replicated
    on that dim instead of failing to compile)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        ok = dim % math.prod(mesh.shape[a] for a in names) == 0 if names else True
        out.append(axes if ok else None)
    return P(*out)


def shardings_from_logical(abstract_boxed: Any, mesh: Mesh) -> Any:
    """Boxed (logically annotated) abstract pytree -> unboxed pytree of NamedSharding. Prints a
    warning when much of it stays whole on an axis that cannot split it (`unsplit_note`)."""
    logical = nn.get_partition_spec(abstract_boxed)
    unboxed = nn.meta.unbox(abstract_boxed)
    unsplit: list[tuple[int, int, tuple[str, ...]]] = []  # (bytes, dim, mesh axes) an axis left whole

    def one(spec: P, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        mesh_spec = nn.logical_to_mesh_axes(spec, RULES) if len(spec) else P()
        fitted = _fit(mesh_spec, leaf.shape, mesh)
        for dim, want, got in zip(leaf.shape, tuple(mesh_spec), tuple(fitted)):
            if want is not None and got is None:
                names = want if isinstance(want, tuple) else (want,)
                unsplit.append((leaf.size * leaf.dtype.itemsize, dim, names))
                break  # a tensor's bytes count once
        return NamedSharding(mesh, fitted)

    out = jax.tree.map(one, logical, unboxed, is_leaf=lambda x: isinstance(x, P))
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(unboxed))
    note = unsplit_note(unsplit, total, mesh)
    if note and jax.process_index() == 0:
        print(f"warning: {note}", flush=True)
    return out


def unsplit_note(unsplit: list[tuple[int, int, tuple[str, ...]]], total_bytes: int, mesh: Mesh,
                 threshold: float = 0.05) -> str | None:
    """A sentence when tensors holding more than `threshold` of the bytes stay whole on a mesh
    axis whose size does not divide their dimension (e.g. width 1152 over fsdp=256): every
    device then holds all of them, a silent memory cost."""
    by_dim: dict[tuple[int, tuple[str, ...]], int] = {}
    for size, dim, names in unsplit:
        by_dim[(dim, names)] = by_dim.get((dim, names), 0) + size
    size = sum(by_dim.values())
    if size <= threshold * total_bytes:
        return None
    worst = sorted(by_dim, key=by_dim.get, reverse=True)[:3]
    shown = ", ".join(f"dim {dim} over {'x'.join(names)}={math.prod(mesh.shape[n] for n in names)}"
                      for dim, names in worst)
    return (f"{size / 2 ** 30:.3g} GiB ({100 * size / total_bytes:.0f}%) of the train state is not split "
            f"where the rules say ({shown}: the axis size does not divide the dimension), so every device "
            f"on that axis holds it whole. Pick config.mesh sizes that divide the model's widths "
            f"(mesh now {dict(mesh.shape)}).")


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, timeout_s: int | None = None) -> None:
    """`jax.distributed.initialize` when this is one of several processes.

    Arguments win over the environment: JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES, JAX_PROCESS_ID (what launch/local.sh sets) and JAX_INIT_TIMEOUT_S
    (default 300). On TPU pods and SLURM JAX discovers the coordinator itself.

    Joining that does not finish within the timeout (the coordinator never came up, or a
    process never joined) prints one message naming the address and exits with status 2:
    jax aborts the process from C++ on that timeout, with no Python exception to catch, so a
    watchdog fires just before it does.
    """
    import os
    import threading

    def env_int(name: str, given: int | None) -> int | None:
        if given is not None or not os.environ.get(name):
            return given
        try:
            return int(os.environ[name])
        except ValueError:
            raise Ov3Error(f"{name}={os.environ[name]!r} must be an integer.") from None

    num_processes = env_int("JAX_NUM_PROCESSES", num_processes)
    process_id = env_int("JAX_PROCESS_ID", process_id)
    timeout_s = env_int("JAX_INIT_TIMEOUT_S", timeout_s) or 300
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    multi = num_processes is not None or coordinator is not None or any(
        k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"))
    if not multi or jax.distributed.is_initialized():
        return
    if num_processes is not None and coordinator is None:
        raise Ov3Error(f"JAX_NUM_PROCESSES={num_processes} but no coordinator: set JAX_COORDINATOR_ADDRESS "
                       "to host:port of process 0 (launch/local.sh does this for one machine).")
    addr = coordinator or "<auto-detected>"
    who = f"process {process_id} of {num_processes}" if process_id is not None else "this process"

    def give_up() -> None:
        sys.stdout.flush()
        print(f"ov3: error: {who} could not join the JAX coordinator at {addr} within {timeout_s}s "
              "(JAX_INIT_TIMEOUT_S): check that process 0 is running, that every process got the same "
              "address and process count, and that the port is reachable.", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # jax's own deadline comes later than the watchdog, so the message above is what users see.
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s + 30)
    except Exception as e:  # noqa: BLE001 - surface the address instead of a deep gRPC error
        raise Ov3Error(f"{who} could not join the JAX coordinator at {addr} ({e}). "
                       "Check that process 0 is running and the address/port is reachable.") from e
    finally:
        watchdog.cancel()


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """{name: count} summed over every process (the same names everywhere, same call order):
    e.g. the examples each process's input pipeline skipped, logged as one total."""
    if jax.process_count() == 1:
        return dict(counts)
    from jax.experimental import multihost_utils
    totals = multihost_utils.process_allgather(np.asarray(list(counts.values()), np.int32)).sum(axis=0)
    return dict(zip(counts, (int(t) for t in totals), strict=True))


def shutdown_distributed(grace_s: float = 10.0) -> None:
    """`jax.distributed.shutdown`, with process 0's coordination service outliving the others.

    jax shuts down the client (a barrier over all processes) and then, on process 0, the
    service at once; a last RPC of another process still in flight then aborts process 0 in
    gRPC ("Check failed: queue.Pop() == nullptr"), turning a finished run into exit 134.
    So process 0 waits, after the barrier, until the other processes have dropped their
    connections to the service (they do so on exit; at most `grace_s`), then stops it. Call
    this at the end of a successful run."""
    state = _distributed_state()
    if state is None:
        # A jax without the private state (ov3 is tested with constraints.txt's): the public call.
        print(f"ov3: warning: jax {jax.__version__} has no jax._src.distributed.global_state, so process 0 "
              "stops the coordination service without waiting for the others (it may then abort at exit); "
              "install the tested versions: pip install -c constraints.txt -e .", file=sys.stderr, flush=True)
        if not callable(getattr(jax.distributed, "shutdown", None)):
            raise Ov3Error(f"jax {jax.__version__} has neither jax._src.distributed.global_state nor "
                           "jax.distributed.shutdown: install the tested versions (pip install -c constraints.txt -e .).")
        jax.distributed.shutdown()
        return
    service, state.service = state.service, None
    jax.distributed.shutdown()  # the client: returns once every process has reached it
    if service is None:
        return
    port = int(state.coordinator_address.rsplit(":", 1)[1]) if state.coordinator_address else None
    deadline = time.monotonic() + grace_s
    # One connection stays: this process's own client keeps its channel until exit.
    while port is not None and _open_connections(port) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    service.shutdown()


def _distributed_state() -> Any:
    """jax's private distributed state, whose service ov3 stops itself (the public API shuts client
    and service down together), or None where this jax version has moved or renamed it."""
    try:
        from jax._src import distributed
        state = distributed.global_state
        state.service, state.coordinator_address  # noqa: B018 - the attributes shutdown_distributed uses
    except (ImportError, AttributeError):
        return None
    return state


def _open_connections(port: int) -> int:
    """Established TCP connections this host serves on `port` (Linux /proc; 0 where absent)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [row.split() for row in f.read().splitlines()[1:]]
        except OSError:
            continue
        count += sum(r[3] == "01" and int(r[1].rsplit(":", 1)[1], 16) == port for r in rows)
    return count


_SYNCS = itertools.count()  # every process calls sync_processes in the same order: same ids


def sync_processes(name: str, timeout_s: int = 1800) -> None:
    """Block until every process gets here: a barrier in jax.distributed's coordination service,
    no device collective. Call it before the first run of a freshly compiled program: CPU
    collectives (gloo) fail when processes reach one more than 30 s apart, which compile-time
    differences between processes (cache hits, a busy host) easily make."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost
        multihost.get_barrier_sync_fn()(key=f"ov3_{name}_{next(_SYNCS)}", timeout_ms=timeout_s * 1000)


def jit_synced(fn: Any, name: str, **jit_kwargs: Any) -> Any:
    """`jax.jit(fn, **jit_kwargs)` for programs compiled mid-run (evaluators): in a multi-process
    run, each new input signature is compiled ahead of time and the processes meet at a
    `sync_processes` barrier before its first run, for the reason given there."""
    jitted = jax.jit(fn, **jit_kwargs)
    if jax.process_count() == 1:
        return jitted
    compiled: dict[Any, Any] = {}

    def call(*args: Any) -> Any:
        leaves, tree = jax.tree.flatten(args)
        key = (tree, tuple((np.shape(x), np.result_type(x), getattr(x, "sharding", None)) for x in leaves))
        if key not in compiled:
            compiled[key] = jitted.lower(*args).compile()
            sync_processes(name)
        return compiled[key](*args)

    return call
