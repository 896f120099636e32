"""The CPU demo: a tiny OpenVision 3 trained on the procedural captioned scenes with the frozen
tiny demo VAE; < 10 minutes on 2 cores.

At 32 px the x8 VAE gives a 4x4 latent grid, so the demo encoder uses patch 1 ("mu/1": 16
tokens) where the paper's 128-256 px runs use patch 2 ("B/2"); everything else is the same
code path as the real configs.

    python -m ov3.data.synthetic --out runs/demo_data --size 32
    python -m ov3.main --config configs/demo.py --workdir runs/demo
"""

from ov3.config import base_config


def get_config():
    c = base_config()
    c.seed = 0
    c.image_size = 32
    c.batch_size = 64
    c.total_steps = 600
    c.log_every = 25
    c.checkpoint_every = 200
    c.model.update(encoder="mu/1", decoder="mu/1", text="mu")
    c.vae.path = "ov3/assets/demo_vae"   # trained with configs/demo_vae.py (see its docstring)
    c.optim.base_lr = 4e-3               # lr = 1e-3 at batch 64
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.optim.mu_dtype = "float32"
    c.data.path = "runs/demo_data"
    c.data.text_len = 16
    c.data.caption_len = 64
    c.data.augment = "center_crop"
    c.data.read_threads = 1              # tiny PNGs: threads only add overhead
    return c
