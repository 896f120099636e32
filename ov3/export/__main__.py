"""CLI: python -m ov3.export --workdir DIR [--step N] --out OUT --format open_clip|hf|decoder [--beit]

Reads DIR/config.json, DIR/tokenizer.json and the params of checkpoint N (default: latest),
and writes a self-describing folder (weights, configs, loader code, README.md model card).
Mistakes a user can make print one message and exit 2, as `python -m ov3.main` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ov3 import paths
from ov3.errors import Ov3Error

FORMATS = ("open_clip", "hf", "decoder")


def export(workdir: str | Path, out: str | Path, fmt: str, step: int | None = None, beit: bool = False) -> Path:
    from ov3.export import load

    if fmt not in FORMATS:
        raise Ov3Error(f"--format {fmt!r} is not one of {FORMATS}.")
    if beit and fmt != "hf":
        raise Ov3Error("--beit adds a transformers BEiT folder; use it with --format hf.")
    if paths.is_remote(out):
        raise Ov3Error(f"--out {out}: exports are written to a local folder (then copy it, e.g. gcloud storage "
                       "cp -r); --workdir may be gs://.")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise Ov3Error(f"--out {out} exists and is not empty; pick a new folder (exports never overwrite).")
    config, params = load.load_params(workdir, step)
    spec = load.model_spec(config, params)
    tokenizer = load.tokenizer_file(workdir, config)
    if tokenizer is None and fmt != "decoder":
        print(f"ov3: warning: no tokenizer.json in {workdir} and config.data.tokenizer is missing; "
              "the export has no tokenizer files.", file=sys.stderr)
    if fmt == "open_clip":
        from ov3.export import open_clip
        open_clip.export(out, config, params, spec, tokenizer)
    elif fmt == "hf":
        from ov3.export import hf
        hf.export(out, config, params, spec, tokenizer, beit=beit)
    else:
        from ov3.export import decoder
        decoder.export(out, config, params, spec)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ov3.export", description=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="training workdir (config.json + checkpoints/)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--beit", action="store_true",
                        help="hf only: also write vision_beit/ (BeitForImageClassification whose logits "
                             "are the pooled image embedding)")
    args = parser.parse_args(argv)
    try:
        out = export(args.workdir, args.out, args.format, args.step, args.beit)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (see {out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
