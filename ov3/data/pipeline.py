"""The input pipeline (grain): ArrayRecord shards → global jax.Array batches.

    it = make_iterator(config.data, mesh=mesh, global_batch_size=8192, image_size=128,
                       split="train", train=True, seed=config.seed)
    batch = next(it)  # {"image": f32[B,H,W,3] in [-1,1], "text": i32[B,text_len],
                      #  "caption": i32[B,caption_len]}  (+ "mask": bool[B] if not train,
                      #  "label": i32[B] with label_key, "latent": bf16[B,h,w,c] with
                      #  use_cached_latents, "texts": i32[B,K,text_len] + "num_texts":
                      #  i32[B] with texts_key=, max_texts=K: several captions an image,
                      #  "caption_sentence": i32[B,text_len] with caption_sentence=True)
    state = it.get_state()   # JSON-serialisable; it.set_state(state) resumes exactly
    it.stats()               # {"bad_record": 0, "corrupt_image": 2, ...} skipped so far

`config.data` keys (`default_config()` has them all), default in brackets:
  source        [arrayrecord] a folder written by ov3.data.records (or ov3.data.convert,
                ov3.data.cache_latents); "tfds": a TFDS dataset on disk, read without TF
                (ov3.data.tfds_source)
  path          [""] the dataset folder (required); source=tfds: a TFDS data dir (with
                tfds_name) or a builder dir
  tfds_name     [""] source=tfds: "name[/config][:version]" inside the data dir `path`
  image_key     [image] record field / TFDS feature holding the encoded image
  label_key     [""] an int field (ClassLabel) to yield as batch["label"], e.g. "label" for
                ov3.data.convert imagefolder sets; "" yields none
  use_cached_latents [False] `path` is a latent cache (python -m ov3.data.cache_latents):
                batches also hold "latent" (bf16) and the train step skips the VAE
                encoder. Augmentation is then fixed: the cached centre crop
  tokenizer     [""] a vocab.txt or tokenizer.json; "" means <path>/tokenizer.json
  text_key      [alt_text] record field for the contrastive text tower (source=tfds: a
                Text feature, or a ClassLabel feature whose class name becomes the text)
  caption_key   [caption] record field the caption decoder learns to write; for data
                with a single text, set both keys to it
  text_len      [80] tokens per `text` row, BOS and EOS included (OpenVision's value)
  caption_len   [128] tokens per `caption` row
  augment       [rrc] training crop: "rrc" (random resized crop, like OpenVision's
                inception_crop) or "center_crop"; eval always centre-crops
  rrc_area      [(0.4, 1.0)] crop area as a fraction of the image (area_min=40)
  rrc_ratio     [(3/4, 4/3)] crop aspect ratio range
  color_jitter  [0.0] training only: strength s of SimCLR's colour jitter (color_augment;
                OpenVision's simclr_jitter_gray uses 0.4). 0 = off
  grayscale     [0.0] training only: probability of a grayscale image, 3 channels kept
                (OpenVision: 0.2, with the jitter)
  num_epochs    [None] training passes; None repeats forever
  worker_count  [0] grain worker processes; 0 decodes in this process. Programs using
                workers need an `if __name__ == "__main__":` guard (spawned workers)
  read_threads  [32] threads per process (or per worker) reading and decoding: enough reads
                in flight to hide a bucket's ~30 ms per read (data.path=gs://..., read by
                array_record directly, or a gcsfuse mount) at ~900 img/s per process
                (python -m ov3.tools.bench_data --read-latency-ms 0,30)
  prefetch      [256] examples buffered ahead per process
  max_pixels    [64 Mi] images with more pixels are skipped (decompression bombs)
  min_side      [8] images with a shorter side are skipped
  max_skip_fraction [0.5] training stops with the per-reason counts when more than this
                fraction of a process's first 1000 examples, or 1000 in a row, are skipped
                (a wrong key or filter would otherwise drop everything and hang); 1.0: never
  train_split, eval_split  [train, heldout] split names, for the train loop to pass

What happens, in order:
  1. train: shuffle the whole split with `seed` (a new permutation every epoch) and
     repeat; eval: file order, one pass.
  2. decode + crop + tokenise each example, its crop RNG seeded by (seed, position in
     that global stream) — so the result depends neither on the worker count nor on
     the process count, and a resumed run draws what an uninterrupted one would. The
     same holds for the colour jitter and for the caption sentence (with
     caption_sentence=True: one sentence of the caption, split on runs of "." and "!" as
     OpenVision does, tokenised to text_len for the contrastive tower's second positive). JPEGs decode at 1/2–1/8 scale (in libjpeg) when every possible
     crop still keeps >= image_size pixels a side: several times faster for large
     photos at 128 px;
  3. global batch k is positions [kB, (k+1)B) of the stream (B = global batch size);
     the process whose devices hold rows [r, r + B/P) of the batch reads positions
     kB + r … kB + r + B/P - 1 of it: the processes' shares are disjoint, together they
     cover every example once per epoch, and global batch k is the same rows in the
     same order whatever P is (while nothing is skipped), so a run on P processes
     computes what a run on one does;
  4. bad examples (see ov3.data.decode.SKIP_REASONS) are counted; in training they are
     dropped, in eval they become masked rows, so every process yields the same number
     of eval batches and evaluators can drop padding with `mask`;
  5. the per-process batch (global_batch_size / process_count) is stacked here, turned
     into float [-1, 1] and made into global arrays sharded over the mesh axes
     ("data", "fsdp") on the batch dimension (mesh=None returns the numpy batch).

Resuming: the state is the number of stream elements this process has consumed (plus
counters); `set_state` restarts grain from that position, which also works with a
different worker count. With finite `num_epochs`, processes that skipped different
numbers of examples can run out one batch apart: drive training by step count.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import grain
import jax
import ml_collections
import ml_dtypes
import numpy as np
from absl import flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image, ImageEnhance

from ov3 import paths
from ov3.data import decode, records, shapes
from ov3.data.tokenizer import Tokenizer
from ov3.errors import Ov3Error

AUGMENTS = ("rrc", "center_crop")
SKIP_WINDOW = 1000  # examples: the first ones a process reads, and the longest run of skips allowed
# Independent RNG streams per example, each seeded by (seed, stream position, stream id), so
# turning one option on does not change what another draws.
_SENTENCE_STREAM, _COLOUR_STREAM = 1, 2
SOURCES = ("arrayrecord", "tfds")


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` section with every key and its default."""
    return ml_collections.ConfigDict({
        "source": "arrayrecord", "path": "", "tokenizer": "",
        "tfds_name": "",           # source="tfds": dataset name[/config][:version] in `path`
        "image_key": "image",      # record field / TFDS feature with the encoded image
        "label_key": "",           # int field yielded as batch["label"]; "" = none
        "use_cached_latents": False,  # `path` is an ov3.data.cache_latents folder
        "train_split": "train", "eval_split": "heldout",
        "text_key": "alt_text", "caption_key": "caption",
        "text_len": 80, "caption_len": 128,
        "augment": "rrc", "rrc_area": (0.4, 1.0), "rrc_ratio": (3 / 4, 4 / 3),
        "color_jitter": 0.0, "grayscale": 0.0,  # training only; 0 = off
        "num_epochs": ml_collections.config_dict.placeholder(int),
        "worker_count": 0, "read_threads": 32, "prefetch": 256,
        "max_pixels": decode.DEFAULT_MAX_PIXELS, "min_side": 8,
        "max_skip_fraction": 0.5,  # of the first SKIP_WINDOW examples (or SKIP_WINDOW in a row)
    })


def _get(cfg, key: str):
    """cfg[key], falling back to the default so configs may leave keys out."""
    return cfg[key] if key in cfg else default_config()[key]


# --- one example -------------------------------------------------------------------

def caption_sentences(caption: str) -> list[str]:
    """The sentences of a caption: split on runs of "." and "!", blank pieces dropped (OpenVision)."""
    return [p.strip() for p in re.split(r"[.!]+", caption) if p.strip()]


def color_augment(img: Image.Image, rng: np.random.Generator, strength: float, grayscale: float) -> Image.Image:
    """SimCLR (v2) colour distortion at `strength` s, as OpenVision's simclr_jitter_gray: with
    probability 0.8, brightness, contrast and saturation factors in [1 - 0.8s, 1 + 0.8s] and a hue
    shift of up to 0.2s of the colour wheel (in this fixed order; SimCLR shuffles it); then
    grayscale with probability `grayscale`."""
    if strength > 0 and rng.uniform() < 0.8:
        lo, hi = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(lo, hi))
        img = ImageEnhance.Contrast(img).enhance(rng.uniform(lo, hi))
        img = ImageEnhance.Color(img).enhance(rng.uniform(lo, hi))
        shift = round(rng.uniform(-0.2 * strength, 0.2 * strength) * 256)
        if shift:
            hsv = np.asarray(img.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
    if grayscale > 0 and rng.uniform() < grayscale:
        img = img.convert("L").convert("RGB")
    return img


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Record → {"image": u8[S,S,3], "text", "caption"(, "label", "latent")} or {"skip": i}.

    A record is tf.train.Example bytes, or a dict of fields (the TFDS source). A picklable
    callable, so that grain can ship it to worker processes.
    """
    tokenizer: Tokenizer
    image_size: int
    crop: str  # "rrc" or "center_crop"
    seed: int
    text_key: str = "alt_text"
    caption_key: str = "caption"
    text_len: int = 80
    caption_len: int = 128
    rrc_area: tuple[float, float] = (0.4, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_pixels: int = decode.DEFAULT_MAX_PIXELS
    min_side: int = 8
    image_key: str = "image"
    label_key: str = ""  # "": no label
    latent_shape: tuple[int, ...] | None = None  # cached latents: their (h, w, c)
    texts_key: str = ""  # a field with several texts: "texts" [max_texts, text_len], "num_texts"
    max_texts: int = 0
    caption_sentence: bool = False  # also "caption_sentence": one random sentence of the caption
    color_jitter: float = 0.0
    grayscale: float = 0.0

    def spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """{output key: (per-example shape, dtype)}: what a batch stacks."""
        s = self.image_size
        spec = {"image": ((s, s, 3), np.uint8), "text": ((self.text_len,), np.int32),
                "caption": ((self.caption_len,), np.int32)}
        if self.label_key:
            spec["label"] = ((), np.int32)
        if self.latent_shape is not None:
            spec["latent"] = (self.latent_shape, ml_dtypes.bfloat16)
        if self.texts_key:
            spec["texts"] = ((self.max_texts, self.text_len), np.int32)
            spec["num_texts"] = ((), np.int32)
        if self.caption_sentence:
            spec["caption_sentence"] = ((self.text_len,), np.int32)
        return spec

    def draft_side(self) -> int:
        """Shortest image side that still gives every crop >= image_size pixels a side."""
        if self.crop != "rrc":
            return self.image_size
        # The smallest crop side is sqrt(area_min * ratio_min) of the shorter image side.
        return math.ceil(self.image_size / math.sqrt(self.rrc_area[0] * min(
            self.rrc_ratio[0], 1 / self.rrc_ratio[1])))

    def __call__(self, index: int, record: bytes) -> dict[str, Any]:
        try:
            return self.process(index, record)
        except decode.Skip as s:
            return {"skip": decode.SKIP_REASONS.index(s.reason)}

    def process(self, index: int, record: bytes | dict) -> dict[str, Any]:
        """Like __call__ but raises decode.Skip (with the detail) for a bad example."""
        out = {}
        try:
            if isinstance(record, dict):  # The TFDS source picked out the fields already.
                fields, keys = record, ("image", "text", "caption", "label", "texts")
            else:
                lists = records.parse_features(record)
                fields = {k: v[0] if v else b"" for k, v in lists.items()}
                if self.texts_key:
                    fields[self.texts_key] = lists[self.texts_key]
                keys = (self.image_key, self.text_key, self.caption_key, self.label_key, self.texts_key)
            raw = (fields[keys[0]], fields[keys[1]], fields[keys[2]])
            if self.texts_key:
                texts = [decode.decode_text(t) for t in fields[keys[4]]][:self.max_texts]
                out["texts"] = np.zeros((self.max_texts, self.text_len), np.int32)
                out["texts"][:len(texts)] = [self.tokenizer.encode(t, self.text_len) for t in texts]
                out["num_texts"] = np.int32(len(texts))
            if self.label_key:
                out["label"] = np.int32(fields[keys[3]])
            if self.latent_shape is not None:
                out["latent"] = np.frombuffer(fields["latent"], ml_dtypes.bfloat16).reshape(
                    self.latent_shape)
        except (ValueError, KeyError) as e:
            raise decode.Skip("bad_record", repr(e)) from e
        text, caption = decode.decode_text(raw[1]), decode.decode_text(raw[2])
        img = decode.decode_image(raw[0], max_pixels=self.max_pixels, min_side=self.min_side,
                                  draft_side=self.draft_side())
        if self.crop == "rrc":
            rng = np.random.default_rng([self.seed, index])
            img = shapes.random_resized_crop(img, self.image_size, rng, self.rrc_area, self.rrc_ratio)
        else:
            img = shapes.center_crop(img, self.image_size)
        if self.color_jitter > 0 or self.grayscale > 0:
            img = color_augment(img, np.random.default_rng([self.seed, index, _COLOUR_STREAM]),
                                self.color_jitter, self.grayscale)
        if self.caption_sentence:
            # A caption without a sentence falls back to the alt-text, as OpenVision's does.
            sentences = caption_sentences(caption) or [text]
            pick = np.random.default_rng([self.seed, index, _SENTENCE_STREAM]).integers(len(sentences))
            out["caption_sentence"] = self.tokenizer.encode(sentences[pick], self.text_len)
        return {"image": np.asarray(img, np.uint8),
                "text": self.tokenizer.encode(text, self.text_len),
                "caption": self.tokenizer.encode(caption, self.caption_len), **out}


# --- the iterator ------------------------------------------------------------------

class _DelayedSource:
    """A record source whose every read first waits `latency_s`: a stand-in for a bucket's
    per-read latency. The wait releases the GIL, as a blocking read in array_record does."""

    def __init__(self, source, latency_s: float):
        self._source, self._latency = source, latency_s

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):
        time.sleep(self._latency)
        return self._source[index]


class _ProcessShare(grain.MapDataset):
    """Block `block` of every group of `count` consecutive blocks of `size` elements:
    this process's rows of every global batch, in order (step 3 of the module docstring)."""

    def __init__(self, parent: grain.MapDataset, size: int, block: int, count: int):
        super().__init__(parent)
        self._size, self._block, self._count = size, block, count
        full, rest = divmod(len(parent), size * count)
        self._length = full * size + min(max(rest - block * size, 0), size)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        group, offset = divmod(index, self._size)
        return self._parent[(group * self._count + self._block) * self._size + offset]


def _batch_block(sharding: NamedSharding, global_batch_size: int, per_process_batch: int) -> int:
    """Which B/P-row block of the global batch this process's devices hold."""
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch_size,)).items():
        if device.process_index == jax.process_index():
            rows.update(range(*index[0].indices(global_batch_size)))
    first = min(rows)
    if len(rows) != per_process_batch or max(rows) - first + 1 != per_process_batch or first % per_process_batch:
        raise Ov3Error(f"this process's devices hold {len(rows)} rows of the batch ({first}..{max(rows)}), not "
                       f"one block of batch/processes = {per_process_batch}: give every process whole "
                       "data x fsdp slices of the mesh (put 'tensor' within a process).")
    return first // per_process_batch



class BatchIterator:
    """Per-process batches as global jax.Arrays; resumable via get_state/set_state."""

    def __init__(self, dataset: grain.MapDataset, *, preprocess: Preprocess,
                 per_process_batch: int, global_batch_size: int, train: bool,
                 sharding: NamedSharding | None, worker_count: int, read_threads: int,
                 prefetch: int, num_batches: int | None, process_index: int,
                 process_count: int, max_skip_fraction: float = 1.0):
        self._dataset = dataset  # This process's stream, before decoding threads/workers.
        self._pre = preprocess
        self._pb, self._gb = per_process_batch, global_batch_size
        self._train, self._sharding = train, sharding
        self._workers, self._threads, self._prefetch = worker_count, read_threads, prefetch
        self.num_batches = num_batches  # Eval: batches every process yields; train: None.
        self._process = (process_index, process_count)
        self._consumed = 0  # Stream elements taken by this process.
        self._batches = 0
        self._skipped = dict.fromkeys(decode.SKIP_REASONS, 0)
        self._max_skip = max_skip_fraction
        self._in_a_row = 0  # skipped since the last good example
        self._it = None

    def _start(self) -> None:
        self.close()
        ds = self._dataset[self._consumed:]
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                   prefetch_buffer_size=self._prefetch))
        if self._workers > 0:
            # grain workers read absl flags; parse them if the program did not (argparse CLIs).
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        self._it = iter(it)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.num_batches is not None and self._batches >= self.num_batches:
            raise StopIteration
        if self._it is None:
            self._start()
        rows: list[dict | None] = []  # None: a masked row (bad example or padding).
        while len(rows) < self._pb:
            try:
                el = next(self._it)
            except StopIteration:
                break
            self._consumed += 1
            if "skip" in el:
                self._skipped[decode.SKIP_REASONS[el["skip"]]] += 1
                self._in_a_row += 1
                if not self._train:
                    rows.append(None)
                elif self._max_skip < 1:
                    self._check_skips()
                continue
            self._in_a_row = 0
            rows.append(el)
        if self._train and len(rows) < self._pb:
            raise StopIteration  # Finite num_epochs: drop the last partial batch.
        self._batches += 1
        return self._to_global(self._stack(rows))

    def _check_skips(self) -> None:
        """Ov3Error, with the counts, when training can make no (or little) progress."""
        skipped = sum(self._skipped.values())
        early = self._consumed <= SKIP_WINDOW and skipped > self._max_skip * SKIP_WINDOW
        if not early and self._in_a_row < SKIP_WINDOW:
            return
        counts = ", ".join(f"{k}: {v}" for k, v in self._skipped.items() if v)
        what = (f"{skipped} of the first {self._consumed} examples" if early
                else f"{self._in_a_row} examples in a row (at stream position {self._consumed})")
        raise Ov3Error(f"the input pipeline of process {self._process[0]} skipped {what} ({counts}); more than "
                       f"config.data.max_skip_fraction={self._max_skip:g} of the first {SKIP_WINDOW}, or "
                       f"{SKIP_WINDOW} in a row, means training cannot progress: check config.data.image_key, "
                       "text_key, caption_key, label_key, min_side and max_pixels against the data (see "
                       "ov3.data.decode.SKIP_REASONS), or raise config.data.max_skip_fraction.")

    def _stack(self, rows: list[dict | None]) -> dict[str, np.ndarray]:
        pb = self._pb
        batch = {k: np.zeros((pb,) + shape, dtype) for k, (shape, dtype) in self._pre.spec().items()}
        mask = np.zeros((pb,), bool)
        for i, row in enumerate(rows):
            if row is not None:
                mask[i] = True
                for k in batch:
                    batch[k][i] = row[k]
        # uint8 until here: 4× less to move between worker processes.
        batch["image"] = batch["image"].astype(np.float32) * np.float32(2 / 255) - 1
        if not self._train:
            batch["mask"] = mask
        return batch

    def _to_global(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self._sharding is None:
            return batch
        return {k: jax.make_array_from_process_local_data(
            self._sharding, v, (self._gb,) + v.shape[1:]) for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position of this process's stream."""
        return {"consumed": self._consumed, "batches": self._batches,
                "skipped": dict(self._skipped),
                "process_index": self._process[0], "process_count": self._process[1]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues exactly where the iterator that produced `state` was."""
        saved = state.get("process_count")
        if saved is not None and saved != self._process[1]:
            logging.warning(
                "Data state saved with process_count=%s, now %s: the resumed run sees a "
                "different order than the original one would have.",
                saved, self._process[1])
        self._consumed = int(state["consumed"])
        self._batches = int(state["batches"])
        self._skipped = dict.fromkeys(decode.SKIP_REASONS, 0)
        self._skipped.update({k: int(v) for k, v in state["skipped"].items()})
        self._start()

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the `text` and `caption` ids come from (to decode them)."""
        return self._pre.tokenizer

    def stats(self) -> dict[str, int]:
        """Examples skipped so far by this process, by reason."""
        return dict(self._skipped)

    def close(self) -> None:
        """Stops worker processes and threads (also done when garbage collected)."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None


def _check_fields(source: Any, path: str, split: str, keys: dict[str, str], look_at: int = 16) -> None:
    """Ov3Error before anything compiles when a configured key names a field that none of the
    first records has (else every example would be skipped as a bad record, see
    BatchIterator._check_skips for what this cannot see)."""
    fields: set[str] = set()
    for i in range(min(len(source), look_at)):
        try:
            fields.update(records.parse_features(source[i]))
        except ValueError:
            continue  # a bad record is counted when read
    for name, key in keys.items():
        if fields and key and key not in fields:
            raise Ov3Error(f"config.data.{name}={key!r}: the records of {path} (split {split!r}) have no such "
                           f"field; they hold {sorted(fields)}. Set it to one of those.")


def make_iterator(data_cfg: ml_collections.ConfigDict, *, mesh: Mesh | None,
                  global_batch_size: int, image_size: int, split: str, train: bool,
                  seed: int, tokenizer: Tokenizer | None = None, texts_key: str = "",
                  max_texts: int = 0, caption_sentence: bool = False) -> BatchIterator:
    """The batch iterator for this process (see the module docstring). `texts_key`: a field
    with several texts per image (retrieval benchmarks), tokenized into `max_texts` rows.
    `caption_sentence`: batches also hold one random sentence of each caption."""
    return make_process_iterator(
        data_cfg, mesh=mesh, global_batch_size=global_batch_size, image_size=image_size,
        split=split, train=train, seed=seed, tokenizer=tokenizer,
        process_index=jax.process_index(), process_count=jax.process_count(),
        texts_key=texts_key, max_texts=max_texts, caption_sentence=caption_sentence)


def make_process_iterator(data_cfg: ml_collections.ConfigDict, *, mesh: Mesh | None,
                          global_batch_size: int, image_size: int, split: str,
                          train: bool, seed: int, tokenizer: Tokenizer | None,
                          process_index: int, process_count: int, texts_key: str = "",
                          max_texts: int = 0, caption_sentence: bool = False,
                          read_latency_ms: float = 0) -> BatchIterator:
    """`make_iterator` with the process explicit (tests simulate several processes).
    `read_latency_ms` > 0 delays every record read by that much (ov3.tools.bench_data: what
    a GCS range read costs, to check that the read threads hide it)."""
    source = _get(data_cfg, "source")
    if source not in SOURCES:
        raise Ov3Error(f"config.data.source={source!r} is not supported; use one of {SOURCES} "
                       "(convert other data with python -m ov3.data.convert first).")
    path = _get(data_cfg, "path")
    if not path:
        raise Ov3Error("config.data.path is empty; set it to a dataset folder, e.g. "
                       "--config.data.path=/data/shapes after python -m ov3.data.synthetic "
                       "--out /data/shapes.")
    crop = _get(data_cfg, "augment") if train else "center_crop"
    if crop not in AUGMENTS:
        raise Ov3Error(f"config.data.augment={crop!r}; use one of {AUGMENTS}.")
    latent_shape = None
    if _get(data_cfg, "use_cached_latents"):
        if source != "arrayrecord":
            raise Ov3Error("config.data.use_cached_latents needs source='arrayrecord' and "
                           "path = a folder written by python -m ov3.data.cache_latents.")
        latent_shape = shapes.latent_shape(path, image_size)
        if crop != "center_crop":
            logging.warning("config.data.use_cached_latents: training sees the cached centre "
                            "crops; config.data.augment=%r does not apply.", crop)
        crop = "center_crop"  # The stored image is already the S x S centre crop.
    if global_batch_size % process_count:
        raise Ov3Error(f"global_batch_size={global_batch_size} is not divisible by the "
                       f"{process_count} processes; change the batch size.")
    if tokenizer is None:
        tokenizer = Tokenizer.from_file(_get(data_cfg, "tokenizer") or str(paths.path(path) / "tokenizer.json"))
    sharding = None
    if mesh is not None:
        missing = {"data", "fsdp"} - set(mesh.axis_names)
        if missing:
            raise Ov3Error(f"The mesh has axes {mesh.axis_names}; the batch is sharded over "
                           f"'data' and 'fsdp', missing {sorted(missing)}.")
        n = mesh.shape["data"] * mesh.shape["fsdp"]
        if global_batch_size % n:
            raise Ov3Error(f"global_batch_size={global_batch_size} is not divisible by "
                           f"data x fsdp = {n} devices; change the batch size or the mesh.")
        sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

    if source == "tfds":
        from ov3.data import tfds_source
        records_source = (tfds_source.TfdsSource(
            path, _get(data_cfg, "tfds_name"), split, image_key=_get(data_cfg, "image_key"),
            text_keys=(_get(data_cfg, "text_key"), _get(data_cfg, "caption_key")),
            label_key=_get(data_cfg, "label_key"), texts_key=texts_key))
    else:
        files = records.split_files(path, split)
        label_key = _get(data_cfg, "label_key")
        if label_key and records.read_manifest(path).get("label_key") != label_key:
            # Else every example would be skipped as a bad record.
            raise Ov3Error(f"config.data.label_key={label_key!r}, but {path} has no such "
                           "int field (image-label sets from python -m ov3.data.convert "
                           "imagefolder have 'label'); set label_key=''.")
        records_source = grain.sources.ArrayRecordDataSource(files)
        _check_fields(records_source, path, split, {
            "image_key": _get(data_cfg, "image_key"), "text_key": _get(data_cfg, "text_key"),
            "caption_key": _get(data_cfg, "caption_key"), "label_key": label_key, "texts_key": texts_key})
    if read_latency_ms:
        records_source = _DelayedSource(records_source, read_latency_ms / 1000)
    ds = grain.MapDataset.source(records_source)
    num_examples = len(ds)
    if train:
        if num_examples == 0:
            raise Ov3Error(f"Split {split!r} of {path} is empty; cannot train on it.")
        ds = ds.shuffle(seed=seed).repeat(_get(data_cfg, "num_epochs"))
    preprocess = Preprocess(
        tokenizer=tokenizer, image_size=image_size, crop=crop, seed=seed,
        text_key=_get(data_cfg, "text_key"), caption_key=_get(data_cfg, "caption_key"),
        text_len=_get(data_cfg, "text_len"), caption_len=_get(data_cfg, "caption_len"),
        rrc_area=tuple(_get(data_cfg, "rrc_area")),
        rrc_ratio=tuple(_get(data_cfg, "rrc_ratio")),
        max_pixels=_get(data_cfg, "max_pixels"), min_side=_get(data_cfg, "min_side"),
        image_key=_get(data_cfg, "image_key"), label_key=_get(data_cfg, "label_key"),
        latent_shape=latent_shape, texts_key=texts_key, max_texts=max_texts,
        caption_sentence=caption_sentence,
        # Colour augmentation in training only, and not on cached latents (fixed crops).
        color_jitter=_get(data_cfg, "color_jitter") if train and latent_shape is None else 0.0,
        grayscale=_get(data_cfg, "grayscale") if train and latent_shape is None else 0.0)
    per_process_batch = global_batch_size // process_count
    block = process_index
    if sharding is not None and (process_index, process_count) == (jax.process_index(), jax.process_count()):
        block = _batch_block(sharding, global_batch_size, per_process_batch)
    ds = _ProcessShare(ds.map_with_index(preprocess), per_process_batch, block, process_count)
    num_batches = None
    if not train:  # Same count on every process, enough for the largest share.
        num_batches = math.ceil(math.ceil(num_examples / process_count) / per_process_batch)
    return BatchIterator(
        ds, preprocess=preprocess, per_process_batch=per_process_batch,
        global_batch_size=global_batch_size, train=train, sharding=sharding,
        worker_count=_get(data_cfg, "worker_count"),
        read_threads=_get(data_cfg, "read_threads"), prefetch=_get(data_cfg, "prefetch"),
        num_batches=num_batches, process_index=process_index,
        process_count=process_count, max_skip_fraction=_get(data_cfg, "max_skip_fraction"))
