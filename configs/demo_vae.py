"""Fit the tiny demo AutoencoderKL (16 latent channels, FLUX-style: no quant convs, but x4
downsampling: at 32 px an x8 VAE's 4x4 latent grid is smaller than the shapes it must keep,
and a tiny x8 VAE learned only the background) on the procedural demo images: L1 + KL. The result, saved in diffusers layout under
DIR/vae/, is what `configs/demo.py` uses as its frozen VAE (shipped in ov3/assets/demo_vae).

    python -m ov3.data.synthetic --out runs/demo_data --size 32
    python -m ov3.main --config configs/demo_vae.py --workdir runs/demo_vae
"""

from ov3.config import base_config


def get_config():
    c = base_config()
    c.task = "vae"
    c.seed = 0
    c.image_size = 32
    c.batch_size = 64
    c.total_steps = 800
    c.log_every = 50
    c.checkpoint_every = 200
    c.vae.path = "configs/demo_vae"      # architecture only: trained from random init
    c.loss.kl = 1e-6
    c.optim.base_lr = 8e-3               # lr = 2e-3 at batch 64
    c.optim.warmup_steps = 100
    c.optim.weight_decay = 0.0
    c.optim.mu_dtype = "float32"
    c.data.path = "runs/demo_data"
    c.data.augment = "center_crop"       # the demo images are already 32 px
    c.data.read_threads = 1
    return c
