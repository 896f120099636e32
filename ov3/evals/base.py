"""What every evaluator shares: the registry, its config keys, the model functions it calls
and the one loop over a split.

An evaluator is configured as `config.evals.<name> = dict(type=..., every=..., ...)` and
runs on the training mesh: each batch comes from the pipeline as a global array sharded
over ("data", "fsdp"), goes through a jitted predict function whose outputs are
replicated (XLA gathers them), and only then reaches the host, where the masked rows
(undecodable examples, padding of the last batch) are dropped. So every process sees
the same numbers and the result does not depend on the mesh.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Optional

import jax
import ml_collections
import numpy as np

from ov3 import sharding
from ov3.errors import Ov3Error

Params = Any
Batch = dict[str, jax.Array]

# Keys every type takes; "" / 0 mean "take it from the rest of the config".
COMMON_KEYS: dict[str, Any] = {
    "type": "",           # a name in REGISTRY
    "every": 0,           # run every N train steps; 0: only after the last step
    "split": "",          # "": config.data.eval_split
    "data_path": "",      # a dataset folder; "": config.data.path
    "batch_size": 0,      # global eval batch; 0: config.batch_size
    "max_examples": 0,    # stop after this many real examples; 0: the whole split
}

REGISTRY: dict[str, type["Evaluator"]] = {}


def register(name: str) -> Callable[[type["Evaluator"]], type["Evaluator"]]:
    def add(cls: type["Evaluator"]) -> type["Evaluator"]:
        cls.TYPE = name
        REGISTRY[name] = cls
        return cls
    return add


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """The pure functions evaluators call, built from a task (tests pass fakes).

    reconstruct(params, frozen, images) -> images      the trained pipeline, noise-free
    vae_reconstruct(params, frozen, images) -> images  VAE encode -> decode (upper bound)
    encode_image(params, frozen, batch) -> (pooled, tokens)
    encode_text(params, ids) -> embeddings
    """
    reconstruct: Callable[..., jax.Array]
    vae_reconstruct: Callable[..., jax.Array]
    encode_image: Optional[Callable[..., tuple[jax.Array, jax.Array]]] = None
    encode_text: Optional[Callable[..., jax.Array]] = None

    @classmethod
    def from_task(cls, task: Any) -> "ModelFns":
        from ov3 import tasks
        if isinstance(task, tasks.VAETask):
            # The VAE is what is trained: its reconstruction *is* the VAE-only one.
            return cls(reconstruct=task.reconstruct, vae_reconstruct=task.reconstruct)
        from ov3.models.ov3 import OV3Model

        def vae_reconstruct(params, frozen, images):
            del params
            return task.vae.decode_fn(frozen["vae"], task.vae.encode_fn(frozen["vae"], images))

        def encode_image(params, frozen, batch):
            return task.model.apply({"params": params}, task.encode(frozen, batch),
                                    method=OV3Model.encode_image)

        def encode_text(params, ids):
            return task.model.apply({"params": params}, ids, method=OV3Model.encode_text)

        return cls(task.reconstruct, vae_reconstruct, encode_image, encode_text)


@dataclasses.dataclass
class Context:
    """Where evaluators run: the config, the mesh (+ the logical-axis rules the model code
    reads, `scope`), the model's tokenizer and its functions."""
    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    scope: Callable[[], ContextManager]
    tokenizer: Any
    fns: ModelFns
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        """One object per key for all evaluators here: e.g. a single jitted image predict
        (one compilation) for retrieval, zero-shot and the probe."""
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]


def host(x: jax.Array) -> np.ndarray:
    """A replicated global array as numpy; the local copy, so it also works multi-host."""
    return np.asarray(x.addressable_data(0))


class Evaluator:
    """Base class: `run(params, frozen) -> {metric: value}`; subclasses set KEYS and NEEDS."""

    TYPE: ClassVar[str] = ""
    KEYS: ClassVar[dict[str, Any]] = {}         # type-specific keys and their defaults
    NEEDS: ClassVar[tuple[str, ...]] = ()       # ModelFns entries it calls (towers: ov3 only)
    STR_OR_LIST: ClassVar[tuple[str, ...]] = ()  # str-default keys that also take a list

    def __init__(self, name: str, spec: dict[str, Any], ctx: Context):
        self.name, self.spec, self.ctx = name, spec, ctx
        self.skipped: dict[str, int] = {}  # by reason, over the passes of the last run
        self.every = int(spec["every"])
        self.batch_size = int(spec["batch_size"]) or int(ctx.cfg.batch_size)
        sharding.check_batch(self.batch_size, ctx.mesh, key=f"evals.{name}.batch_size")
        for fn in self.NEEDS:
            if getattr(ctx.fns, fn) is None:
                raise Ov3Error(f"{self.key('type')}={self.TYPE!r} needs the image and text towers, "
                               f"which task={ctx.cfg.task!r} has not; use it with task='ov3' or drop it.")
        self.split = spec["split"] or ctx.cfg.data.eval_split
        self.check_split(self.split, "split")

    @classmethod
    def check(cls, spec: dict[str, Any]) -> list[str]:
        """Type-specific, device-free value checks: "<key>=<value> ..." messages."""
        del spec
        return []

    # ------------------------------------------------------------------ helpers
    def key(self, k: str) -> str:
        return f"config.evals.{self.name}.{k}"

    def run(self, params: Params, frozen: Any) -> dict[str, float]:
        raise NotImplementedError

    def data_config(self, text_key: str = "", label_key: str = "") -> ml_collections.ConfigDict:
        data = ml_collections.ConfigDict(self.ctx.cfg.data.to_dict())
        if self.spec["data_path"]:
            data.path = self.spec["data_path"]
            if "use_cached_latents" in data:  # another folder: images, not the train latent cache
                data.use_cached_latents = False
        if text_key:  # the pipeline's "text" ids then hold this record field
            data.text_key = text_key
        data.label_key = label_key  # an int label field only where an evaluator asks for one
        return data

    def manifest(self) -> dict[str, Any]:
        """The eval dataset's manifest (classes, label_key...), {} for non-ov3 sources."""
        from ov3.data import records
        data = self.data_config()
        if data.get("source", "arrayrecord") != "arrayrecord":
            return {}
        return records.read_manifest(data.path)

    def check_split(self, split: str, key: str) -> None:
        """Fail when the evaluator is built, not at step 10000, on a wrong split or path."""
        from ov3.data import records
        data = self.data_config()
        if data.get("source", "arrayrecord") != "arrayrecord":
            return  # other sources check their splits when read
        try:
            records.split_files(data.path, split)
        except Ov3Error as e:
            raise Ov3Error(f"{self.key(key)}={split!r}: {e}") from None

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` jitted with every output replicated over the mesh (processes in step at its
        first run: `sharding.jit_synced`)."""
        return sharding.jit_synced(fn, f"eval_{self.name}", out_shardings=sharding.replicated(self.ctx.mesh))

    def jit_predict(self, fn: Callable[..., dict[str, jax.Array]]) -> Callable[..., dict[str, jax.Array]]:
        """`fn(params, frozen, batch, *extra) -> {name: [B, ...]}` jitted; the batch's mask
        comes back with it so the host can drop padding rows."""
        def predict(params, frozen, batch, *extra):
            return {**fn(params, frozen, batch, *extra), "mask": batch["mask"]}
        return self.jit(predict)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` under the mesh and the logical-axis rules the model code reads. Only
        device programs run in it: host-side jits (the probe's L-BFGS, ranking) stay outside,
        so their compilations are shared whatever the mesh."""
        with self.ctx.scope():
            return fn(*args)

    def batches(self, predict: Callable[..., dict[str, jax.Array]], params: Params, frozen: Any,
                *extra: Any, split: str = "", text_key: str = "", label_key: str = "",
                texts_key: str = "", max_texts: int = 0, max_examples: int = -1
                ) -> Iterator[dict[str, np.ndarray]]:
        """One pass over `split`: yields the host outputs of `predict` for the real rows."""
        from ov3.data import pipeline
        cfg = self.ctx.cfg
        limit = int(self.spec["max_examples"]) if max_examples < 0 else max_examples
        it = pipeline.make_iterator(self.data_config(text_key, label_key), mesh=self.ctx.mesh,
                                    global_batch_size=self.batch_size, image_size=cfg.image_size,
                                    split=split or self.split, train=False, seed=cfg.seed,
                                    tokenizer=self.ctx.tokenizer, texts_key=texts_key, max_texts=max_texts)
        seen = 0
        try:
            for batch in it:
                out = {k: host(v) for k, v in self.call(predict, params, frozen, batch, *extra).items()}
                keep = out.pop("mask").astype(bool)
                if limit:
                    keep &= np.cumsum(keep) <= limit - seen
                seen += int(keep.sum())
                if keep.any():
                    yield {k: v[keep] for k, v in out.items()}
                if limit and seen >= limit:
                    break
        finally:
            it.close()
        # Examples the pipeline could not use (corrupt images...), logged as eval/<name>/skipped/<reason>.
        for reason, count in sharding.sum_over_processes(it.stats()).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def collect(self, predict, params, frozen, *extra, **kw) -> dict[str, np.ndarray]:
        """`batches` concatenated; raises when the split has no usable example."""
        parts: dict[str, list[np.ndarray]] = {}
        for out in self.batches(predict, params, frozen, *extra, **kw):
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        if not parts:
            raise Ov3Error(f"{self.key('split')}: split {kw.get('split') or self.split!r} yielded no "
                           "usable example; check the data path and split.")
        return {k: np.concatenate(v) for k, v in parts.items()}


# ---------------------------------------------------------------------- config checks

def _type_ok(value: Any, default: Any, str_or_list: bool) -> bool:
    """Check by the default's type; tuples and lists are one kind (ConfigDict and JSON turn
    one into the other)."""
    if str_or_list:
        return isinstance(value, (str, tuple, list))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def spec_errors(name: str, raw: Any) -> list[str]:
    """Device-free checks of one `config.evals.<name>` entry (names the key and the fix)."""
    where = f"config.evals.{name}"
    if not isinstance(raw, (dict, ml_collections.ConfigDict)):
        return [f"{where} must be a ConfigDict(type=..., ...), got {type(raw).__name__}"]
    raw = dict(raw)
    kind = raw.get("type", "")
    if kind not in REGISTRY:
        close = difflib.get_close_matches(str(kind), list(REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"{where}.type={kind!r} is not an evaluator type{hint}; use one of {sorted(REGISTRY)}"]
    cls = REGISTRY[kind]
    known = {**COMMON_KEYS, **cls.KEYS}
    errors = []
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {where}.{close[0]}?)" if close else ""
            errors.append(f"{where}.{key} is not a key of {kind!r} evaluators{hint}; "
                          f"known keys: {', '.join(sorted(known))}")
        elif not _type_ok(value, known[key], key in cls.STR_OR_LIST):
            errors.append(f"{where}.{key}={value!r} must be a {type(known[key]).__name__} "
                          f"like the default {known[key]!r}")
    if errors:
        return errors
    spec = {**known, **raw}
    for key in ("every", "batch_size", "max_examples"):
        if spec[key] < 0:
            errors.append(f"{where}.{key}={spec[key]} must be >= 0 (0 means: "
                          + {"every": "only after the last step", "batch_size": "config.batch_size",
                             "max_examples": "the whole split"}[key] + ")")
    errors += [f"{where}.{e}" for e in cls.check(spec)]
    return errors


def resolve_spec(name: str, raw: Any) -> dict[str, Any]:
    errors = spec_errors(name, raw)
    if errors:
        raise Ov3Error("invalid config:\n  " + "\n  ".join(errors))
    cls = REGISTRY[raw["type"]]
    return {**COMMON_KEYS, **cls.KEYS, **dict(raw)}
