"""A TFDS dataset already on disk as a pipeline source (config.data.source = "tfds").

    config.data.source = "tfds"
    config.data.path = "/data/tensorflow_datasets"  # a TFDS data dir, with
    config.data.tfds_name = "imagenet2012:5.1.0"    #   name[/config][:version] in it;
    # or config.data.path = "/data/tfds/my_set/1.0.0" (a builder dir) and tfds_name = "".
    config.data.image_key = "image"   # an Image feature
    config.data.text_key = "label"    # a Text feature, or a ClassLabel: its class name
    config.data.caption_key = "label"
    config.data.label_key = "label"   # optional: yielded as batch["label"]

Examples are read with `builder.as_data_source(split)`: random access, no TensorFlow.
That needs the array_record file format (what ov3 writes, and `tfds build
--file_format=array_record`); TFRecord-format datasets must be rewritten first, e.g. with
`python -m ov3.data.convert` from their source files. TFDS does not decode the image
(`SkipDecoding`): ov3.data.decode does, as for ov3 records (same skip reasons, JPEG draft
decoding). An ov3 records folder is itself a TFDS builder dir.
"""

from __future__ import annotations

from typing import Any

from ov3.errors import Ov3Error


def open_builder(path: str, name: str = ""):
    """The read-only TFDS builder of a builder dir, or of `name` in the data dir `path`."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import read_only_builder
    try:
        if name:
            return read_only_builder.builder_from_files(name, data_dir=path)
        return tfds.builder_from_directory(path)
    except Exception as e:  # TFDS raises several types (DatasetNotFoundError, FileNotFound…)
        what = f"dataset {name!r} in the data dir {path}" if name else f"builder dir {path}"
        raise Ov3Error(
            f"config.data.path / tfds_name: cannot open the TFDS {what} ({type(e).__name__}: "
            f"{e}). Set data.path to a folder holding dataset_info.json + features.json, or "
            "to a TFDS data dir and data.tfds_name to 'name[/config][:version]'.") from e


class TfdsSource:
    """grain random-access source: example i → {"image": bytes, "text", "caption"(, "label")}.

    Picklable (for grain workers): the TFDS data source is reopened in each process.
    """

    def __init__(self, path: str, name: str, split: str, *, image_key: str,
                 text_keys: tuple[str, ...], label_key: str = "", texts_key: str = ""):
        import tensorflow_datasets as tfds
        builder = open_builder(path, name)
        where = f"TFDS dataset {builder.info.full_name} ({builder.data_dir})"
        splits = builder.info.splits
        if split not in splits:
            raise Ov3Error(f"Split {split!r} is not in the {where}; it has {sorted(splits)}. "
                           "Set config.data.train_split / eval_split.")
        file_format = str(getattr(builder.info, "file_format", "") or "")
        if "array_record" not in file_format.lower():
            raise Ov3Error(
                f"The {where} is stored as {file_format or 'tfrecord'}; reading it without "
                "TensorFlow needs array_record files. Rebuild it with `tfds build "
                "--file_format=array_record`, or convert its source data with python -m "
                "ov3.data.convert.")
        features = builder.info.features
        self._names: dict[str, list[str]] = {}  # ClassLabel text keys → class names
        wanted = {"image_key": image_key, "text_key": text_keys[0],
                  "caption_key": text_keys[1], "label_key": label_key, "texts_key": texts_key}
        for role, key in wanted.items():
            if key and key not in features:
                setting = "evals.<name>.texts_key" if role == "texts_key" else f"config.data.{role}"
                raise Ov3Error(f"{setting}={key!r} is not a feature of the {where}; "
                               f"it has {sorted(features)}.")
        if not isinstance(features[image_key], tfds.features.Image):
            raise Ov3Error(f"config.data.image_key={image_key!r} is a "
                           f"{type(features[image_key]).__name__} in the {where}, not an Image.")
        for k in text_keys:
            if isinstance(features[k], tfds.features.ClassLabel):
                self._names[k] = list(features[k].names)
            elif not isinstance(features[k], tfds.features.Text):
                raise Ov3Error(f"config.data text/caption key {k!r} is a "
                               f"{type(features[k]).__name__} in the {where}; use a Text or "
                               "ClassLabel feature.")
        self._args = (path, name, split, image_key)
        self._keys = {"image": image_key, "text": text_keys[0], "caption": text_keys[1]}
        if label_key:
            self._keys["label"] = label_key
        if texts_key:
            if not (isinstance(features[texts_key], tfds.features.Sequence)
                    and isinstance(features[texts_key].feature, tfds.features.Text)):
                raise Ov3Error(f"{texts_key!r} is a {type(features[texts_key]).__name__} in the {where}; "
                               "several texts per image need a Sequence(Text) feature.")
            self._keys["texts"] = texts_key
        self._len = splits[split].num_examples
        self._source = None

    def _open(self):
        import tensorflow_datasets as tfds
        path, name, split, image_key = self._args
        return open_builder(path, name).as_data_source(
            split, decoders={image_key: tfds.decode.SkipDecoding()})

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self._source is None:
            self._source = self._open()
        example = self._source[index]
        out = {}
        for role, key in self._keys.items():
            value = example[key]
            if key in self._names and role != "label":
                value = self._names[key][int(value)]  # a ClassLabel as text: its class name
            elif role == "label":
                value = int(value)
            elif role == "texts":
                value = list(value)
            out[role] = value
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"TfdsSource{self._args[:3]}"
