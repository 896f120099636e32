"""The training tokenizer as files stock `transformers` (and open_clip's HFTokenizer) load.

ov3 encodes a text as `BOS tokens EOS 0 0 ...` (`ov3.data.tokenizer.Tokenizer.encode_batch`),
adding BOS/EOS itself. For `AutoTokenizer.from_pretrained(folder)(texts, padding="max_length",
max_length=L, truncation=True)` to give the same ids, the exported tokenizer.json gets a
BOS/EOS template post-processor and tokenizer_config.json names [PAD] (id 0) as padding.
`model_input_names` is only `input_ids`: the text tower was trained *without* a padding mask,
so an `attention_mask` passed on to SiglipTextModel would change its output.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import tokenizers
from tokenizers import processors

from ov3.data.tokenizer import PAD, UNK, Tokenizer

TOKENIZER_NAME = "tokenizer.json"


def write(src: str | Path, out_dir: str | Path, max_len: int) -> Tokenizer:
    """Writes tokenizer.json + tokenizer_config.json for `src` (a vocab.txt or tokenizer.json)."""
    ov3_tok = Tokenizer.from_file(str(src))
    with tempfile.TemporaryDirectory() as tmp:
        raw = tokenizers.Tokenizer.from_file(ov3_tok.save(tmp))
    bos, eos = raw.id_to_token(ov3_tok.bos_id), raw.id_to_token(ov3_tok.eos_id)
    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, ov3_tok.bos_id), (eos, ov3_tok.eos_id)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw.save(str(out_dir / TOKENIZER_NAME))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos, "eos_token": eos, "pad_token": PAD, "unk_token": UNK,
        "model_max_length": max_len,
        "model_input_names": ["input_ids"],
        "padding_side": "right", "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ov3_tok
