"""The understanding evaluators: `retrieval`, `zero_shot` and `linear_probe`.

    config.evals.ret = dict(type="retrieval", every=1000)                  # R@1/5/10 both ways
    config.evals.zs = dict(type="zero_shot", split="val", classnames="imagenet")
    config.evals.probe = dict(type="linear_probe", train_split="train", split="val")

Texts are compared as the model sees them, i.e. as token ids: two examples whose text
field tokenizes the same have the same text. That is how
  * retrieval handles repeated alt-texts (the demo's held-out split repeats "a red
    circle"): the gallery holds each distinct text once, an image's hit is its text, a
    text's hit is any image that has it;
  * zero-shot and the probe find labels: an int label field when the dataset has one
    (`python -m ov3.data.convert imagefolder` writes `label` and lists the class names
    in its manifest, which are then the default `classnames`), else the class whose name
    tokenizes like the example's `text_key` field (that converter stores the class name
    as alt-text and caption too).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ov3 import sharding
from ov3.errors import Ov3Error
from ov3.evals import imagenet_classes
from ov3.evals import linear_probe as probe_lib
from ov3.evals import metrics as metrics_lib
from ov3.evals.base import Context, Evaluator, host, register

TEMPLATE_SETS = {"openai": imagenet_classes.OPENAI_TEMPLATES,
                 "simple": imagenet_classes.SIMPLE_TEMPLATES}
FEATURES = ("pooled", "tokens_mean")


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ labels

class TextLabels:
    """Token-id rows -> class index: the class whose name tokenizes the same, else -1.
    Classes with the same tokens (ImageNet's two "missile"s) map to the first one; their
    text embeddings are equal too, and `zero_shot_topk` counts the tie as a miss."""

    def __init__(self, class_rows: np.ndarray):
        self.num_classes = len(class_rows)
        self._index: dict[bytes, int] = {}
        for i, row in enumerate(np.asarray(class_rows, np.int32)):
            self._index.setdefault(row.tobytes(), i)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int32)
        return np.array([self._index.get(r.tobytes(), -1) for r in rows], np.int32)


def _unique_rows(rows: np.ndarray) -> np.ndarray:
    """Distinct rows in order of first appearance."""
    _, first = np.unique(rows, axis=0, return_index=True)
    return rows[np.sort(first)]


def _check_str_list(value: Any, key: str, allowed: Sequence[str]) -> list[str]:
    if isinstance(value, str):
        return [] if value in allowed else [f"{key}={value!r}: use one of {list(allowed)} or a list of strings"]
    if not value or not all(isinstance(v, str) and v.strip() for v in value):
        return [f"{key}={value!r}: give a non-empty list of non-empty strings"]
    return []


def _check_ks(spec: dict[str, Any]) -> list[str]:
    ks = spec["ks"]
    if not ks or not all(isinstance(k, int) and k > 0 for k in ks):
        return [f"ks={ks!r}: give positive ints, e.g. (1, 5, 10)"]
    return []


class _Understanding(Evaluator):
    """Shared by the three: the image predict, texts through the text tower, labels."""

    NEEDS = ("encode_image",)
    STR_OR_LIST = ("classnames", "templates")

    def __init__(self, name: str, spec: dict[str, Any], ctx: Context):
        super().__init__(name, spec, ctx)
        fns = ctx.fns

        def predict(params, frozen, batch):
            pooled, tokens = fns.encode_image(params, frozen, batch)
            out = {"pooled": pooled.astype(jnp.float32),
                   "tokens_mean": tokens.astype(jnp.float32).mean(axis=1),
                   "ids": batch["text"]}
            for key in ("label", "texts", "num_texts"):
                if key in batch:
                    out[key] = batch[key]
            return out

        # Shared by every understanding evaluator of this context: compiled once per batch shape.
        self.predict_images = ctx.once("predict_images", lambda: self.jit_predict(predict))
        if fns.encode_text is not None:
            self._embed = ctx.once("embed_text", lambda: self.jit(
                lambda params, ids: fns.encode_text(params, ids).astype(jnp.float32)))

    def embed_texts(self, params: Any, ids: np.ndarray) -> np.ndarray:
        """Token ids `[N, L]` (host) -> text embeddings `[N, E]`, in sharded batches."""
        bs = self.batch_size
        padded = np.concatenate([ids, np.zeros((-len(ids) % bs, ids.shape[1]), ids.dtype)])
        batch_sharding = sharding.batch_sharding(self.ctx.mesh)
        out = []
        for start in range(0, len(padded), bs):
            block = padded[start:start + bs]
            arr = jax.make_array_from_callback(block.shape, batch_sharding, lambda idx, b=block: b[idx])
            out.append(host(self.call(self._embed, params, arr)))
        return np.concatenate(out)[:len(ids)]

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.ctx.tokenizer.encode_batch([t.strip() for t in texts], self.ctx.cfg.data.text_len)

    def setup_labels(self, spec: dict[str, Any]) -> None:
        """Where labels come from: the int field (`label_key`, default: the dataset's), else
        the class whose name matches the `text_key` text; class names from `classnames`,
        default: the dataset manifest's `classes`."""
        manifest = self.manifest()
        self.label_key = spec["label_key"] or manifest.get("label_key", "")
        self.text_key = spec["text_key"] or self.ctx.cfg.data.text_key
        names = spec["classnames"] or manifest.get("classes") or ()
        self.classnames = list(imagenet_classes.CLASSNAMES if names == "imagenet" else names)
        self.mapping = TextLabels(self.tokenize(self.classnames)) if self.classnames else None

    def labelled(self, params: Any, frozen: Any, split: str, max_examples: int = -1) -> dict[str, np.ndarray]:
        return self.collect(self.predict_images, params, frozen, split=split, text_key=self.text_key,
                            label_key=self.label_key, max_examples=max_examples)

    def labels(self, out: dict[str, np.ndarray], mapping: TextLabels | None, split: str) -> np.ndarray:
        if "label" in out:
            labels = out["label"].astype(np.int32)
            if self.classnames and labels.max() >= len(self.classnames):
                raise Ov3Error(f"{self.key('classnames')}: split {split!r} has label {labels.max()} but "
                               f"there are {len(self.classnames)} class names; list them all, in label order.")
            return labels
        if mapping is None:
            raise Ov3Error(f"{self.key('classnames')} is empty and {self.data_config().path} has no "
                           f"int labels nor class list: give the class names in label order "
                           f"(or 'imagenet').")
        labels = mapping(out["ids"])
        bad = np.flatnonzero(labels < 0)
        if bad.size:
            shown = [self.ctx.tokenizer.decode(out["ids"][i]) for i in bad[:3]]
            raise Ov3Error(f"{self.key('classnames')}: {bad.size} of {len(labels)} examples of split "
                           f"{split!r} have a {self.text_key!r} text that is no class name, e.g. {shown}; "
                           f"list every class as the records store it, or set {self.key('text_key')} to "
                           "the field that holds the class name.")
        return labels


@register("retrieval")
class Retrieval(_Understanding):
    """One text per image (`text_key`), or several (`texts_key`: Karpathy COCO / Flickr30k
    from `python -m ov3.data.convert karpathy`, 5 captions an image): then an image->text
    hit is any of its captions in the top K, a text->image hit its own image."""
    KEYS = {
        "text_key": "",          # record field to retrieve ("caption"...), cut to config.data.text_len
                                 # tokens like in training; "": config.data.text_key (alt-text)
        "texts_key": "",         # field with several captions an image; "": the dataset's
                                 # (manifest texts_key) unless text_key is set
        "max_texts": 0,          # captions read per image; 0: the split's most (manifest), else 8
        "ks": (1, 5, 10),
    }
    NEEDS = ("encode_image", "encode_text")

    @classmethod
    def check(cls, spec):
        errors = _check_ks(spec)
        if spec["max_texts"] < 0:
            errors.append(f"max_texts={spec['max_texts']}: use a count of captions, or 0 for the split's most")
        return errors

    def __init__(self, name: str, spec: dict[str, Any], ctx: Context):
        super().__init__(name, spec, ctx)
        self.text_key = spec["text_key"] or ctx.cfg.data.text_key
        manifest = self.manifest()
        self.texts_key = spec["texts_key"] or ("" if spec["text_key"] else manifest.get("texts_key", ""))
        most = manifest.get("per_split", {}).get(self.split, {}).get("max_texts", 0)
        self.max_texts = int(spec["max_texts"]) or most or 8

    def run(self, params: Any, frozen: Any) -> dict[str, float]:
        if self.texts_key:
            return self.run_captions(params, frozen)
        out = self.collect(self.predict_images, params, frozen, text_key=self.text_key)
        # The same tokens are the same text: embed each distinct one once.
        _, first, group = np.unique(out["ids"], axis=0, return_index=True, return_inverse=True)
        texts = self.embed_texts(params, out["ids"][first])
        result = metrics_lib.retrieval_recall(out["pooled"], texts, image_to_text=group.reshape(-1),
                                              ks=tuple(self.spec["ks"]))
        result.update(num_images=float(len(group)), num_texts=float(len(first)))
        return result

    def run_captions(self, params: Any, frozen: Any) -> dict[str, float]:
        out = self.collect(self.predict_images, params, frozen, texts_key=self.texts_key,
                           max_texts=self.max_texts)
        counts = out["num_texts"].astype(np.int64)
        has_text = counts > 0  # the converter keeps none without, other sources may
        rows = np.repeat(np.arange(int(has_text.sum())), counts[has_text])
        ids = np.concatenate([t[:n] for t, n in zip(out["texts"][has_text], counts[has_text])])
        result = metrics_lib.retrieval_recall(out["pooled"][has_text], self.embed_texts(params, ids),
                                              text_to_image=rows, ks=tuple(self.spec["ks"]))
        result.update(num_images=float(has_text.sum()), num_texts=float(len(ids)))
        return result


LABEL_KEYS = {
    "label_key": "",        # int label field; "": the dataset's (manifest), else labels from text
    "text_key": "",         # field holding the class name when there is no int label; "": config.data.text_key
}


@register("zero_shot")
class ZeroShot(_Understanding):
    KEYS = {
        "classnames": "",       # in label order: a list, "imagenet" (ov3.evals.imagenet_classes),
                                # "": the dataset manifest's `classes`
        "templates": "openai",  # "openai" (80 CLIP prompts), "simple" (7), or a list with "{}"
        **LABEL_KEYS,
        "ks": (1, 5),
    }
    NEEDS = ("encode_image", "encode_text")

    @classmethod
    def check(cls, spec):
        errors = _check_ks(spec)
        if spec["classnames"]:
            errors += _check_str_list(spec["classnames"], "classnames", ("imagenet",))
        errors += _check_str_list(spec["templates"], "templates", tuple(TEMPLATE_SETS))
        if not isinstance(spec["templates"], str):
            errors += [f"templates: {t!r} has no '{{}}' for the class name"
                       for t in spec["templates"] if "{}" not in t]
        return errors

    def __init__(self, name: str, spec: dict[str, Any], ctx: Context):
        super().__init__(name, spec, ctx)
        self.setup_labels(spec)
        if not self.classnames:
            raise Ov3Error(f"{self.key('classnames')} is empty and {self.data_config().path} lists no "
                           "classes: give the class names in label order, or 'imagenet'.")
        templates = spec["templates"]
        self.templates = list(TEMPLATE_SETS[templates] if isinstance(templates, str) else templates)
        self.prompt_ids = self.tokenize([t.format(c) for c in self.classnames for t in self.templates])

    def class_embeddings(self, params: Any) -> np.ndarray:
        """Per class: the mean of its normalised prompt embeddings (CLIP's ensembling)."""
        emb = _normalize(self.embed_texts(params, self.prompt_ids))
        return emb.reshape(len(self.classnames), len(self.templates), -1).mean(axis=1)

    def run(self, params: Any, frozen: Any) -> dict[str, float]:
        classes = self.class_embeddings(params)
        out = self.labelled(params, frozen, self.split)
        labels = self.labels(out, self.mapping, self.split)
        acc = metrics_lib.zero_shot_topk(out["pooled"], classes, labels, ks=tuple(self.spec["ks"]))
        return {**acc, "num_images": float(len(labels))}


@register("linear_probe")
class LinearProbe(_Understanding):
    KEYS = {
        "train_split": "",        # fit on this split; "": config.data.train_split (`split` is the test)
        "max_train_examples": 0,  # 0: the whole train split
        "classnames": "",         # label order; "": the manifest's `classes`, else the train split's texts
        **LABEL_KEYS,
        "features": FEATURES,     # pooled embedding and/or the mean of the tokens z_u
        "l2": 1e-4,
        "max_iters": 1000,
    }

    @classmethod
    def check(cls, spec):
        errors = []
        if spec["classnames"]:
            errors += _check_str_list(spec["classnames"], "classnames", ("imagenet",))
        bad = [f for f in spec["features"] if f not in FEATURES]
        if bad or not spec["features"]:
            errors.append(f"features={spec['features']!r}: use a non-empty subset of {FEATURES}")
        if spec["l2"] < 0 or spec["max_iters"] <= 0 or spec["max_train_examples"] < 0:
            errors.append("l2, max_iters, max_train_examples: need l2 >= 0, max_iters > 0, "
                          "max_train_examples >= 0")
        return errors

    def __init__(self, name: str, spec: dict[str, Any], ctx: Context):
        super().__init__(name, spec, ctx)
        self.train_split = spec["train_split"] or ctx.cfg.data.train_split
        self.check_split(self.train_split, "train_split")
        self.setup_labels(spec)

    def run(self, params: Any, frozen: Any) -> dict[str, float]:
        s = self.spec
        train = self.labelled(params, frozen, self.train_split, int(s["max_train_examples"]))
        test = self.labelled(params, frozen, self.split)
        # No class list and no int labels: the classes are the train split's distinct texts.
        mapping = self.mapping or (None if "label" in train else TextLabels(_unique_rows(train["ids"])))
        train_y = self.labels(train, mapping, self.train_split)
        test_y = self.labels(test, mapping, self.split)
        num_classes = len(self.classnames) or (mapping.num_classes if mapping else None)
        result = {"num_train": float(len(train_y)), "num_test": float(len(test_y))}
        for feature in s["features"]:
            r = probe_lib.linear_probe(train[feature], train_y, test[feature], test_y,
                                       num_classes=num_classes, l2=float(s["l2"]),
                                       max_iters=int(s["max_iters"]))
            result.update({f"{feature}/test_top1": r["test_top1"], f"{feature}/train_top1": r["train_top1"]})
        return result
