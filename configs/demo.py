"""The CPU demo: a tiny OpenVision 3 trained on the procedural captioned scenes with the frozen
tiny demo VAE; < 10 minutes on 2 cores.

The demo VAE downsamples x4 (FLUX's downsamples x8): at 32 px that gives an 8x8 latent grid,
and the mu/2 encoder (patch 2, as the paper's B/2) turns it into 16 tokens; everything else is
the same code path as the real configs.

    python -m ov3.data.synthetic --out runs/demo_data --size 32
    python -m ov3.main --config configs/demo.py --workdir runs/demo

Demo-scale versions of the paper's ablations:
    --config.loss.rec_to_encoder=False   only the understanding loss reaches the encoder (Sec. 5.1)
    --config.loss.und_to_encoder=False   only the reconstruction loss reaches the encoder (Sec. 5.1)
    configs/demo.py:no_vae               no VAE (Sec. 5.2): mu/8 on pixels, the same 16 tokens
"""

from ov3.config import base_config
from ov3.data.synthetic import SHAPES


def get_config(arg=None):
    if arg not in (None, "", "no_vae"):
        raise ValueError(f"configs/demo.py:{arg}: the only variant is 'no_vae'")
    c = base_config()
    c.seed = 0
    c.image_size = 32
    c.batch_size = 64
    c.total_steps = 600
    c.log_every = 25
    c.checkpoint_every = 200
    c.model.update(encoder="mu/2", decoder="mu/1", text="mu")
    c.vae.path = "ov3/assets/demo_vae"   # trained with configs/demo_vae.py (see its docstring)
    c.optim.base_lr = 4e-3               # lr = 1e-3 at batch 64
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.05
    c.optim.mu_dtype = "float32"
    c.data.path = "runs/demo_data"
    c.data.text_len = 16
    c.data.caption_len = 64
    c.data.augment = "center_crop"
    c.loss.contrastive_texts = ("alt_text", "caption_sentence")  # OpenVision's two positives
    c.data.read_threads = 1              # tiny PNGs: threads only add overhead
    # Held-out evals every 200 steps and after the last (metrics.jsonl: eval/<name>/<metric>);
    # retrieval counts a repeated alt-text as the same text.
    c.evals.retrieval = dict(type="retrieval", every=200)
    c.evals.reconstruction = dict(type="reconstruction", every=200)
    # After the last step only: the bound a perfect encoder + decoder could reach (the demo VAE
    # alone), and classification by colour on the labelled set (one group per image): zero-shot
    # from prompts naming the colour with every shape, and a linear probe on frozen features.
    c.evals.vae_only = dict(type="reconstruction", vae_only=True)
    colours = dict(data_path="runs/demo_data/colours", split="heldout")
    c.evals.zero_shot = dict(type="zero_shot", templates=[f"a {{}} {shape}" for shape in SHAPES], ks=[1, 2],
                             **colours)
    c.evals.linear_probe = dict(type="linear_probe", train_split="train", **colours)
    if arg == "no_vae":  # the encoder patchifies pixels: 8 px patches give the 4x4 tokens of VAE x4 + patch 2
        c.model.update(input="pixels", encoder="mu/8")
        c.vae.path = ""
        del c.evals["vae_only"]  # no VAE: its bound is the identity
    return c
