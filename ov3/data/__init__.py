"""Data: tokenizer, storage, decoding, the grain input pipeline, converters and caches.

    tokenizer.py      offline WordPiece (BERT uncased) -> fixed-length int32 ids
    records.py        ArrayRecord shards of tf.train.Example + manifest (grain and TFDS read them)
    decode.py         robust image/text decoding; bad examples become counted skip reasons
    pipeline.py       make_iterator(): shuffled, process-sharded, resumable global batches
    tfds_source.py    datasets already on disk in TFDS (array_record) format
    convert.py        python -m ov3.data.convert {webdataset,table,imagefolder} (+ convert_inputs.py,
                      resumable.py): parallel, resumable converters into records
    cache_latents.py  python -m ov3.data.cache_latents: encode a dataset once with the frozen VAE
    synthetic.py      procedural captioned shapes for the CPU demo (python -m ov3.data.synthetic)
"""
