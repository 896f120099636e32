"""OV3-B: FLUX.1 VAE + ViT-B/2 encoder, B/1 decoder, B text encoder and caption decoder.

The paper's two stages (Table 1, ov3/recipes.py), picked by the config argument:

    python -m ov3.main --config configs/ov3_b.py:pretrain --workdir DIR/pretrain \
        --config.vae.path=ae.safetensors --config.data.path=DATA --config.data.tokenizer=vocab.txt
    python -m ov3.main --config configs/ov3_b.py:finetune --workdir DIR/finetune \
        --config.init_from=DIR/pretrain --config.lpips.vgg_path=vgg16-397923af.pth ...
    python -m ov3.stages --pretrain_config configs/ov3_b.py:pretrain \
        --finetune_config configs/ov3_b.py:finetune --workdir DIR ...     # both in sequence

Variants: `:finetune,res=224`, `:pretrain,encoder=So400m/2`, `:pretrain,decoder=L/1`, ...
"""

from ov3 import recipes


def get_config(arg=None):
    return recipes.ov3_config(arg, encoder="B/2")
