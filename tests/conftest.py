"""Shared fixtures. Tests run from the repository root, like the scripts."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)


@pytest.fixture(scope="session")
def digits():
    """The bundled default dataset (written once, deterministic)."""
    from train.data import DIGITS_DIR, write_digits

    return write_digits(DIGITS_DIR)


def train_run(out_dir, *extra):
    """Run train.main in-process with a shrunk recipe; returns the output dir."""
    from train.train import get_args_parser, main

    args = get_args_parser().parse_args(["--output-dir", str(out_dir), "--quiet", "--no-tensorboard", "--no-plots",
                                         *map(str, extra)])
    main(args)
    return str(out_dir)


@pytest.fixture(scope="session")
def trained(digits, tmp_path_factory):
    """A model trained for 3 epochs on all digits (~15 s): good enough to tell digits apart (>0.9)."""
    return train_run(tmp_path_factory.mktemp("run") / "small", "--epochs", 3)


@pytest.fixture(scope="session")
def checkpoint(trained):
    return os.path.join(trained, "checkpoint_best.pt")


@pytest.fixture(scope="session")
def exported(checkpoint, tmp_path_factory):
    """All four serving formats of the small model, checked against eager."""
    from train.export import export_all

    out = tmp_path_factory.mktemp("export") / "all"
    export_all(checkpoint, str(out))
    return str(out)
