"""The benchmark's peer: the same weights behind TorchServe's stock `image_classifier` handler."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from bundle import settings
from deploy.archive import shipped_config, write_checksum
from deploy.client import post, read_bytes
from deploy.server import TorchServe

MODEL = settings.MODEL_NAME


class StockAdapter(torch.nn.Module):
    """Feeds our model from the stock handler's fixed input (3x224x224, ImageNet-normalised)."""

    def __init__(self, model, prep):
        super().__init__()
        self.model = model
        self.size = prep.image_size
        self.grey = prep.channels == 1
        self.register_buffer("in_mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("in_std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std).view(1, -1, 1, 1))

    def forward(self, x):  # (B, 3, 224, 224) -> (B, K)
        """Undo the stock ImageNet normalisation, convert to the model's channels, size and
        normalisation, and return the model's logits."""
        x = x * self.in_std + self.in_mean  # back to 0..1
        if self.grey:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", antialias=True
            )
        return self.model((x - self.mean) / self.std)


def build_peer_archive(checkpoint: str, store: str, work: str, config_file: str) -> str:
    """Archive the checkpoint's model, traced behind StockAdapter, for TorchServe's stock
    image_classifier handler as version "stock" in `store`; returns the archive's path."""
    import warnings

    from model_src.manifest import Manifest
    from model_src.net import load_model
    from model_src.preprocessing import Preprocessing

    model, ckpt = load_model(checkpoint)
    known = Manifest.from_checkpoint(ckpt)
    adapter = StockAdapter(model, Preprocessing.from_dict(known.preprocessing)).eval()
    os.makedirs(work, exist_ok=True)
    peer_dir = tempfile.mkdtemp(dir=work)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(adapter, torch.zeros(1, 3, 224, 224))
    traced.save(os.path.join(peer_dir, "peer.pt"))
    with open(os.path.join(peer_dir, "index_to_name.json"), "w") as f:
        json.dump(known.index_to_name(), f)  # the stock handler's labels
    config_file = shipped_config(config_file, None, os.path.join(peer_dir, "model-config.yaml"))  # workers
    subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"),
            "--model-name",
            MODEL,
            "--version",
            "stock",
            "--serialized-file",
            os.path.join(peer_dir, "peer.pt"),
            "--handler",
            "image_classifier",
            "--extra-files",
            os.path.join(peer_dir, "index_to_name.json"),
            "--config-file",
            config_file,
            "--export-path",
            peer_dir,
        ],
        check=True,
        env={**os.environ, "TMPDIR": peer_dir},  # the archiver wipes $TMPDIR/<model-name>: keep it private
    )
    target = os.path.join(store, f"{MODEL}_vstock.mar")
    shutil.move(os.path.join(peer_dir, f"{MODEL}.mar"), target)
    write_checksum(target)
    return target


def rgb_copies(paths: list[str], work: str) -> list[str]:
    """RGB PNG copies of `paths` under `work`/rgb (made once), for the stock handler's 3-channel input."""
    from PIL import Image

    folder = os.path.join(work, "rgb")
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        out.append(os.path.join(folder, f"{i}.png"))
        if not os.path.exists(out[-1]):
            with Image.open(path) as img:
                img.convert("RGB").save(out[-1])
    return out


def peer_notes(ts: TorchServe, image: str, prep) -> dict:
    """What the stock handler does with the target's own images (before we hand it RGB copies)."""
    resp = post(ts, read_bytes(image), MODEL, "stock")
    return {"own_image_status": resp.status_code, "own_image_mode": "grey" if prep.channels == 1 else "RGB"}
