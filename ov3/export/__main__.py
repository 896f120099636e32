"""CLI: python -m ov3.export --workdir DIR [--step N] --out OUT --format open_clip|hf|decoder [--beit]
                         [--license apache-2.0] [--base-model REPO_ID] [--push-to-hub ORG/NAME [--private]]

Reads DIR/config.json, DIR/tokenizer.json and the params of checkpoint N (default: latest),
and writes a self-describing folder (weights, configs, loader code, README.md model card with
Hub metadata); `--push-to-hub` then uploads it to a Hugging Face model repo.
Mistakes a user can make print one message and exit 2, as `python -m ov3.main` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ov3 import paths
from ov3.errors import Ov3Error

FORMATS = ("open_clip", "hf", "decoder")


def export(workdir: str | Path, out: str | Path, fmt: str, step: int | None = None, beit: bool = False,
           license: str = "apache-2.0", base_model: str | None = None) -> Path:
    from ov3.export import card, load

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
    card.add_hub_metadata(out / "README.md", fmt, license, base_model)
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
    parser.add_argument("--license", default="apache-2.0",
                        help="the card's license (Hub identifier); ov3's code is Apache-2.0, the "
                             "weights may be bound by the training data's and the VAE's terms")
    parser.add_argument("--base-model", default=None,
                        help="Hub repo id the run was initialised from (config.init_from), for the card")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="upload the folder to this Hugging Face model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    try:
        out = export(args.workdir, args.out, args.format, args.step, args.beit, args.license, args.base_model)
    except Ov3Error as e:
        print(f"ov3: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (see {out / 'README.md'})")
    if args.push_to_hub:
        from ov3.export import card
        try:
            url = card.push_to_hub(out, args.push_to_hub, args.private)
        except Ov3Error as e:
            print(f"ov3: error: {e}", file=sys.stderr)
            return 2
        print(f"uploaded {out} to {args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
