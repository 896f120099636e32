"""OV3-L: FLUX.1 VAE + ViT-L/2 encoder, B/1 decoder, L text encoder and caption decoder.

Same stages and variants as configs/ov3_b.py (see its docstring and ov3/recipes.py):

    python -m ov3.stages --pretrain_config configs/ov3_l.py:pretrain \
        --finetune_config configs/ov3_l.py:finetune --workdir DIR \
        --pretrain_config.vae.path=ae.safetensors --finetune_config.vae.path=ae.safetensors ...
"""

from ov3 import recipes


def get_config(arg=None):
    return recipes.ov3_config(arg, encoder="L/2")
