"""Exports on the Hugging Face Hub: the card's metadata as huggingface_hub reads it, the upload
(`python -m ov3.export ... --push-to-hub ORG/NAME`) against a stand-in Hub on 127.0.0.1 reached
through HF_ENDPOINT, and the decoder's `from_pretrained` (PyTorchModelHubMixin), from a folder
and from that Hub, against ov3.inference."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
huggingface_hub = pytest.importorskip("huggingface_hub")

from ov3.export import testing  # noqa: E402
from ov3.export.__main__ import main as export_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COMMIT = "c0ffee" * 6 + "c0ff"   # 40 hex digits


class StandInHub:
    """The Hub endpoints huggingface_hub's create_repo, upload_folder and hf_hub_download call:
    repos/create, validate-yaml (the card), preupload (every file "regular": sent inline in the
    commit), commit (ndjson), resolve (HEAD + GET). Files live in `self.files`; `self.requests`
    logs (method, path, auth)."""

    def __init__(self):
        self.files: dict[str, dict[str, bytes]] = {}
        self.validated: list[str] = []
        self.requests: list[tuple[str, str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                hub.requests.append(("POST", self.path, self.headers.get("Authorization", "")))
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                host = f"http://{self.headers['Host']}"
                if self.path == "/api/repos/create":
                    req = json.loads(data)
                    repo = f"{req['organization']}/{req['name']}"
                    hub.files.setdefault(repo, {})
                    return self._json({"url": f"{host}/{repo}", "name": req["name"]})
                if self.path == "/api/validate-yaml":   # called when the upload holds a README.md
                    hub.validated.append(json.loads(data)["content"])
                    return self._json({"errors": [], "warnings": []})
                parts = self.path.split("/")   # /api/models/ORG/NAME/{preupload,commit}/main
                repo = f"{parts[3]}/{parts[4]}"
                if parts[5] == "preupload":
                    return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                 for f in json.loads(data)["files"]]})
                for line in data.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.files[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                return self._json({"commitUrl": f"{host}/{repo}/commit/{COMMIT}", "commitOid": COMMIT})

            def do_GET(self, head=False):
                hub.requests.append(("HEAD" if head else "GET", self.path, self.headers.get("Authorization", "")))
                parts = self.path.split("/", 5)   # /ORG/NAME/resolve/main/PATH
                body = hub.files.get(f"{parts[1]}/{parts[2]}", {}).get(parts[-1]) if len(parts) == 6 else None
                if body is None:
                    return self._json({"error": "not found"}, 404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET(head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tmp_path):
    server = StandInHub()
    yield server, {**os.environ, "HF_ENDPOINT": server.url, "HF_TOKEN": "hf_standin",
                   "HF_HUB_CACHE": str(tmp_path / "hf_cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    server.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    tok = testing.train_tokenizer(root / "tokenizer.json")   # noqa: F841 - written to the file
    params = testing.perturb(testing.init_params(testing.tiny_spec()), seed=5)
    return testing.write_workdir(root / "run", testing.tiny_config(), params, tokenizer=root / "tokenizer.json")


@pytest.mark.parametrize("fmt,library,pipeline", [("open_clip", "ov3", "image-feature-extraction"),
                                                  ("hf", "transformers", "image-feature-extraction"),
                                                  ("decoder", "ov3", None)])
def test_card_metadata_is_read_by_huggingface_hub(workdir, tmp_path, fmt, library, pipeline):
    out = tmp_path / fmt
    assert export_main(["--workdir", str(workdir), "--out", str(out), "--format", fmt,
                        "--base-model", "UCSC-VLAA/openvision3-vit-base-patch2-32"]) == 0
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0"
    assert (card.data.library_name, card.data.pipeline_tag) == (library, pipeline)
    assert card.data.base_model == "UCSC-VLAA/openvision3-vit-base-patch2-32"
    assert "ov3" in card.data.tags and "openvision3" in card.data.tags
    assert card.text.lstrip().startswith("# ov3 ")   # the card body follows the front matter intact
    if fmt == "open_clip":
        assert 'Not `open_clip.create_model("hf-hub:ORG/NAME")`' in card.text


def test_push_to_hub_then_decoder_from_pretrained_matches_inference(workdir, tmp_path, hub):
    from ov3.export.decoder_torch import LatentDecoder
    from ov3.inference import Encoder
    server, env = hub
    out = tmp_path / "decoder"
    cmd = [sys.executable, "-m", "ov3.export", "--workdir", str(workdir), "--out", str(out), "--format", "decoder",
           "--push-to-hub", "someorg/ov3-decoder"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (server.requests, run.stderr[-3000:])
    assert f"uploaded {out} to someorg/ov3-decoder: {server.url}/someorg/ov3-decoder/commit/{COMMIT}" in run.stdout
    assert server.files["someorg/ov3-decoder"] == {p.name: p.read_bytes() for p in out.iterdir()}
    assert server.validated == [(out / "README.md").read_text()]
    assert all(auth == "Bearer hf_standin" for method, _, auth in server.requests if method == "POST")

    encoder = Encoder.from_workdir(workdir)
    _, tokens = encoder.encode_latents(testing.random_latents(seed=4))
    tokens = np.array(tokens)
    tokens[1] += 0.5 * np.random.default_rng(0).standard_normal(tokens[1].shape).astype(np.float32)  # noisy z_u
    want = np.asarray(encoder.decode_tokens(tokens)).transpose(0, 3, 1, 2)   # NHWC -> NCHW
    np.save(tmp_path / "tokens.npy", tokens)
    # From the Hub repo id, in a process that sees only the stand-in Hub (HF_ENDPOINT).
    load = ("import numpy as np, sys, torch; from ov3.export.decoder_torch import LatentDecoder; "
            "m = LatentDecoder.from_pretrained('someorg/ov3-decoder'); assert not m.training; "
            "np.save(sys.argv[2], m(torch.from_numpy(np.load(sys.argv[1]))).detach().numpy())")
    run = subprocess.run([sys.executable, "-c", load, str(tmp_path / "tokens.npy"), str(tmp_path / "hub_out.npy")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        local = LatentDecoder.from_pretrained(out)(torch.from_numpy(tokens)).numpy()
    errs = {"folder": testing.max_err(local, want), "hub": testing.max_err(np.load(tmp_path / "hub_out.npy"), want)}
    print(f"decoder from_pretrained vs ov3.inference.decode_tokens: max abs error {errs}")
    assert max(errs.values()) <= 1e-5, errs


def test_decoder_from_pretrained_is_strict(workdir, tmp_path):
    """A weights file missing a tensor fails instead of leaving it at its random init."""
    from safetensors.torch import load_file, save_file

    from ov3.export.decoder_torch import LatentDecoder
    out = tmp_path / "decoder"
    assert export_main(["--workdir", str(workdir), "--out", str(out), "--format", "decoder"]) == 0
    weights = load_file(str(out / "model.safetensors"))
    del weights["head.bias"]
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(RuntimeError, match="head.bias"):
        LatentDecoder.from_pretrained(out)
