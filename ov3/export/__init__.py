"""Getting a trained ov3 model out of JAX.

    python -m ov3.export --workdir DIR --out OUT --format open_clip|hf|decoder

  load.py              workdir -> (config, params): config.json + orbax checkpoint (params only)
  open_clip.py         open_clip CLIP state dict + config; open_clip_loader.py loads it (no ov3)
  hf.py                transformers ViTModel / SiglipTextModel (/ BeitForImageClassification)
  decoder.py           the latent decoder for decoder_torch.py (plain PyTorch, no ov3)
  import_open_clip.py  the reverse: a released open_clip checkpoint -> Flax params
  layout.py            the Flax <-> torch tensor layouts all of them share
  tokenizer_files.py   the training tokenizer as transformers / open_clip tokenizer files
  card.py              README.md model card (the VAE and latent normalisation, load code)
  testing.py           tiny models and workdirs for tests

Inference from JAX without exporting: ov3/inference.py (Encoder) and python -m ov3.embed.
"""
