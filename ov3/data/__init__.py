"""Data: tokenizer, storage, decoding, the grain input pipeline, and the demo data set.

    tokenizer.py  offline WordPiece (BERT uncased) → fixed-length int32 ids
    records.py    ArrayRecord shards of tf.train.Example + manifest (grain and TFDS read them)
    decode.py     robust image/text decoding; bad examples become counted skip reasons
    pipeline.py   make_iterator(): shuffled, process-sharded, resumable global batches
    synthetic.py  procedural captioned shapes for the CPU demo (python -m ov3.data.synthetic)
"""
