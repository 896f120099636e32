"""Offline WordPiece tokenizer (BERT uncased), as OpenVision uses.

Built on the `tokenizers` package; nothing is downloaded. Two kinds of file load:

- a BERT `vocab.txt` (one token a line, e.g. bert-base-uncased's 30522 tokens): it gets
  BERT's uncased pipeline (clean text, CJK split, lower case, strip accents, split on
  whitespace and punctuation, WordPiece with `##` continuations, `[UNK]` fallback);
- a `tokenizers` `tokenizer.json` (e.g. the one `train_wordpiece` writes): its own
  normalizer / pre-tokenizer / model are used as saved.

Ids. `[PAD]` must be id 0 (the models treat 0 as padding). BOS and EOS: OpenVision
added `[bos]`/`[eos]` to its vocabulary file; we use those when the vocabulary has them
and otherwise BERT's own `[CLS]` (BOS) and `[SEP]` (EOS), which every BERT vocabulary
has — so the plain bert-base-uncased vocabulary needs no extra rows and its encodings
equal `BertTokenizerFast(...)(text, max_length=L, truncation=True, padding="max_length")`.

`encode_batch(texts, max_len)` gives `[BOS] tokens... [EOS] 0 0 ...` (int32 [B, max_len]);
too long texts are cut so that EOS stays last. As in BertTokenizerFast, special-token
text inside a caption (a literal "[SEP]") becomes that token's id.

Embedding tables can be larger than `vocab_size` (OpenVision pads to 32000); that
padding is the model's business.

Training reads `<data.path>/tokenizer.json` unless `config.data.tokenizer` names a file. To put
one in a converted folder:

    python -m ov3.data.tokenizer train --data DIR [--vocab-size 32000]   # learned from DIR's texts
    python -m ov3.data.tokenizer train --data DIR --from-vocab vocab.txt  # bert-base-uncased's, as OpenVision
"""

from __future__ import annotations

import argparse
import collections
import heapq
import itertools
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from ov3 import paths
from ov3.errors import Ov3Error

PAD, UNK = "[PAD]", "[UNK]"
# (BOS, EOS) candidates in order of preference: OpenVision's added tokens, then BERT's.
_BOS_EOS_CANDIDATES = (("[bos]", "[eos]"), ("[BOS]", "[EOS]"), ("[CLS]", "[SEP]"))
# Special tokens a trained vocabulary starts with; [PAD] first so that it is id 0.
TRAIN_SPECIAL_TOKENS = (PAD, UNK, "[CLS]", "[SEP]", "[MASK]")


class Tokenizer:
    """WordPiece tokenizer producing fixed-length int32 id arrays."""

    def __init__(self, tok: tokenizers.Tokenizer, source: str = "<memory>"):
        # We add BOS/EOS, truncate and pad ourselves (in numpy), so switch off whatever
        # post-processing a saved tokenizer.json carries.
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        self._source = source
        vocab = tok.get_vocab(with_added_tokens=True)
        if vocab.get(PAD) != 0:
            raise Ov3Error(
                f"Tokenizer {source}: token {PAD!r} must have id 0 (it has "
                f"{vocab.get(PAD)}); ov3 uses 0 as padding. Put [PAD] on the first line "
                "of vocab.txt, or retrain with ov3.data.tokenizer.train_wordpiece.")
        for bos, eos in _BOS_EOS_CANDIDATES:
            if bos in vocab and eos in vocab:
                self._bos_id, self._eos_id = vocab[bos], vocab[eos]
                break
        else:
            raise Ov3Error(
                f"Tokenizer {source}: found no BOS/EOS tokens; the vocabulary needs one of "
                f"the pairs {_BOS_EOS_CANDIDATES} (e.g. add [CLS] and [SEP] lines).")

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        """Loads a BERT `vocab.txt`, a `tokenizer.json`, or a folder holding either."""
        path = os.fspath(path)
        where = paths.path(path)
        if where.is_dir():
            for name in ("tokenizer.json", "vocab.txt"):
                if (where / name).exists():
                    return cls.from_file(str(where / name))
            raise Ov3Error(f"Tokenizer folder {path} has neither tokenizer.json nor "
                           "vocab.txt; pass the file itself.")
        if not where.exists():
            raise Ov3Error(f"Tokenizer file {path} does not exist. Pass a BERT vocab.txt or "
                           "a tokenizer.json (python -m ov3.data.synthetic writes one).")
        if path.endswith(".json"):
            try:
                tok = tokenizers.Tokenizer.from_str(where.read_text(encoding="utf-8"))
            except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
                raise Ov3Error(f"Tokenizer file {path} is not a valid tokenizers "
                               f"tokenizer.json: {e}") from e
            return cls(tok, path)
        return cls(_bert_uncased(path), path)

    # --- ids -----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    # --- encode / decode -----------------------------------------------------------
    def encode(self, text: str, max_len: int) -> np.ndarray:
        """One text → int32 [max_len]: BOS, tokens, EOS, then pad 0."""
        return self.encode_batch([text], max_len)[0]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> np.ndarray:
        """Texts → int32 [len(texts), max_len]: BOS, tokens, EOS, pad 0; EOS kept if cut."""
        if max_len < 2:
            raise Ov3Error(f"max_len={max_len} leaves no room for BOS and EOS; use >= 2.")
        out = np.zeros((len(texts), max_len), np.int32)
        # add_special_tokens=False: tokenizer.json files often carry BERT's post
        # processor, which would add [CLS]/[SEP] a second time. encode_batch hands work to
        # a thread pool, which costs more than it saves for one text (the per-example path).
        if len(texts) == 1:
            encs = [self._tok.encode(texts[0], add_special_tokens=False)]
        else:
            encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        for row, enc in zip(out, encs):
            ids = enc.ids[:max_len - 2]
            row[0] = self._bos_id
            row[1:len(ids) + 1] = ids
            row[len(ids) + 1] = self._eos_id
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Ids → text; stops at the first EOS and drops BOS and padding."""
        kept = []
        for i in (int(i) for i in ids):
            if i == self._eos_id:
                break
            if i not in (self._bos_id, self.pad_id):
                kept.append(i)
        return self._tok.decode(kept, skip_special_tokens=True)

    def save(self, directory: str) -> str:
        """Writes `directory/tokenizer.json` (loadable by `from_file`); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "tokenizer.json")
        self._tok.save(path)
        return path

    def __repr__(self) -> str:
        return (f"Tokenizer({self._source!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")


def _bert_uncased(vocab_path: str) -> tokenizers.Tokenizer:
    """BERT's uncased pipeline over a vocab.txt (what tensorflow_text.BertTokenizer does)."""
    # Not splitlines(): the vocabulary may hold unusual line-break characters as tokens.
    tokens = paths.path(vocab_path).read_text(encoding="utf-8").split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    if UNK not in tokens:
        raise Ov3Error(f"Vocabulary {vocab_path} has no {UNK} line; is it a BERT vocab.txt?")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=UNK,
                                                max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # Registered as special, as BertTokenizerFast does, so both loaders agree.
    specials = [t for t in (PAD, UNK, "[CLS]", "[SEP]", "[MASK]", "[bos]", "[eos]",
                            "[BOS]", "[EOS]") if t in vocab]
    tok.add_special_tokens(specials)
    return tok


def train_wordpiece(texts: Iterable[str], vocab_size: int, out_path: str,
                    min_frequency: int = 2) -> Tokenizer:
    """Learns an uncased BERT-style WordPiece vocabulary from `texts`; saves tokenizer.json.

    The result has [PAD]=0, [UNK]=1, [CLS]=2 (BOS), [SEP]=3 (EOS), [MASK]=4, then the
    characters (alone and as `##` continuations), then merged pieces in the order learnt.
    We learn the merges ourselves (BPE-style: repeatedly join the most frequent adjacent
    pair, ties broken alphabetically) because the `tokenizers` trainer breaks ties by hash
    order, so it gives a different vocabulary on every run; ours is a pure function of
    the texts. It suits a dataset's own captions (about a minute for 5·10^4 distinct
    words and an 8k vocabulary); for web-scale text use bert-base-uncased's vocab.txt.
    Stops early when no pair occurs `min_frequency` times.
    """
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    word_counts: dict[str, int] = collections.Counter()
    for text in texts:
        word_counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = _learn_pieces(word_counts, vocab_size - len(TRAIN_SPECIAL_TOKENS), min_frequency)
    vocab = {t: i for i, t in enumerate(list(TRAIN_SPECIAL_TOKENS) + vocab)}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=UNK,
                                                max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(TRAIN_SPECIAL_TOKENS))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(out_path)
    return Tokenizer(tok, out_path)


def _learn_pieces(word_counts: dict[str, int], budget: int, min_frequency: int) -> list[str]:
    """Alphabet plus up to `budget` pieces in total, by deterministic pair merging."""
    words = sorted(word_counts)
    counts = [word_counts[w] for w in words]
    symbols = [[w[0]] + ["##" + c for c in w[1:]] for w in words]
    alphabet = collections.Counter()
    for syms, n in zip(symbols, counts):
        alphabet.update({s: n for s in syms})
    # Keep the most frequent characters if even they exceed the budget (rest → [UNK]).
    pieces = sorted(sorted(alphabet), key=lambda s: -alphabet[s])[:budget]
    pieces.sort()
    known = set(pieces)

    pair_counts: dict[tuple[str, str], int] = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += counts[i]
            where[pair].add(i)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)
    while len(pieces) < budget and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg:
            continue  # Stale entry: the count changed since it was pushed.
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b[2:]
        if merged not in known:
            known.add(merged)
            pieces.append(merged)
        changed = set()
        for i in sorted(where.pop(pair)):
            syms, n = symbols[i], counts[i]
            for p in zip(syms, syms[1:]):  # Remove this word's old pairs...
                pair_counts[p] -= n
                changed.add(p)
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            symbols[i] = out
            for p in zip(out, out[1:]):  # ...and add its new ones.
                pair_counts[p] += n
                where[p].add(i)
                changed.add(p)
        for p in sorted(changed):
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                pair_counts.pop(p)
    return pieces


# ----------------------------------------------------------------------------- CLI

TEXT_FIELDS = ("alt_text", "caption")


def dataset_texts(data: str, split: str = "train", max_examples: int = 0) -> Iterator[str]:
    """The alt-texts and captions of `split` of the ov3 records folder `data`, in shard order
    (the first `max_examples` examples when > 0)."""
    import grain
    from ov3.data import records
    source = grain.sources.ArrayRecordDataSource(records.split_files(data, split))
    count = min(len(source), max_examples) if max_examples > 0 else len(source)
    for i in range(count):
        fields = records.parse_example(source[i])
        for name in TEXT_FIELDS:
            text = fields.get(name, b"").decode("utf-8", "replace").strip()
            if text:
                yield text


def describe(data: str) -> str:
    """One line for the end of a converter: the tokenizer training will use, or how to add one."""
    path = os.path.join(data, "tokenizer.json")
    if os.path.exists(path):
        return f"tokenizer: {path} ({Tokenizer.from_file(path).vocab_size} tokens); training uses it by default."
    return (f"tokenizer: none in {data}; training reads {path} unless config.data.tokenizer names one. "
            f"Add one: python -m ov3.data.tokenizer train --data {data} --from-vocab vocab.txt "
            f"(bert-base-uncased's vocab.txt, as OpenVision) or --vocab-size 32000 (learned from the captions).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ov3.data.tokenizer",
                                description="Write DIR/tokenizer.json for an ov3 records folder.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="learn a WordPiece vocabulary from DIR's texts, or convert a vocab.txt")
    t.add_argument("--data", required=True, help="ov3 records folder (it gets DIR/tokenizer.json)")
    t.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size to learn (OpenVision: 32000)")
    t.add_argument("--from-vocab", default="", help="a BERT vocab.txt to use instead of learning one")
    t.add_argument("--split", default="train", help="the split whose texts are learnt from")
    t.add_argument("--max-examples", type=int, default=200_000,
                   help="learn from the first N examples of the split (0: all; word counting runs "
                        "in Python, so a whole web-scale split would take hours)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing DIR/tokenizer.json")
    args = p.parse_args(argv)
    out = os.path.join(args.data, "tokenizer.json")
    try:
        if os.path.exists(out) and not args.overwrite:
            raise Ov3Error(f"{out} exists (runs trained on {args.data} use it); pass --overwrite to replace it.")
        if args.from_vocab:
            Tokenizer.from_file(args.from_vocab).save(args.data)
        else:
            texts = dataset_texts(args.data, args.split, args.max_examples)
            first = list(itertools.islice(texts, 1))
            if not first:
                raise Ov3Error(f"split {args.split!r} of {args.data} has no alt-text or caption to learn from; "
                               "use --from-vocab vocab.txt.")
            train_wordpiece(itertools.chain(first, texts), args.vocab_size, out)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        return 2
    print(describe(args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
