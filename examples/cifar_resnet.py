"""CIFAR-10 ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2), under GradGuard.

The network: a 3x3 convolution with 16 filters, three stages of ``n`` basic blocks (two 3x3
convolutions each) on 32x32, 16x16 and 8x8 feature maps with 16, 32 and 64 filters, global average
pooling and a 10-way linear layer: ``6n + 2`` weighted layers (ResNet-20, 32, 44, 56, 110 for
``n = 3, 5, 7, 9, 18``). Where a stage halves the resolution and doubles the width the shortcut is
either option A (identity, subsampled by 2, the new channels zero-padded; no parameters) or option
B (1x1 projection). ``--plain`` drops the shortcuts (the paper's plain nets, whose deep versions
train worse: watch the vanishing gradients of the first layers), ``--no-bn`` drops batch
normalisation (at the paper's learning rate of 0.1 gradients explode: watch GradGuard clip them).

The recipe of the paper: SGD with momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1
divided by 10 at 50% and 75% of training (32k and 48k of 64k iterations, about 164 epochs),
4-pixel padding + random 32x32 crop + horizontal flip, per-channel normalisation. Reported test
errors: ResNet-20 8.75%, ResNet-32 7.51%, ResNet-44 7.17%, ResNet-56 6.97%, ResNet-110 6.43%.

Data: the standard ``cifar-10-batches-py`` folder (``--data-dir``, or ``--download`` to fetch and
verify the official archive). Without it the example trains on a SYNTHETIC CIFAR-shaped data set
(class-dependent colours and stripes plus noise) so that it always runs; those accuracies mean
nothing for CIFAR.

Usage::

    python -m examples.cifar_resnet --data-dir ~/data --download            # ResNet-20, 164 epochs
    python -m examples.cifar_resnet --data-dir ~/data --depth 56 --shortcut B
    python -m examples.cifar_resnet --data-dir ~/data --depth 56 --plain     # vanishing gradients
    python -m examples.cifar_resnet --data-dir ~/data --depth 56 --no-bn     # exploding gradients
    python -m examples.cifar_resnet --l2           # GradGuard's L2(1e-4) instead of weight decay
    python -m examples.cifar_resnet --quick        # a few steps on synthetic data, runs in seconds

    # the same experiment through LightningCLI, configured in YAML:
    python -m examples.cifar_resnet fit --config examples/configs/cifar_resnet.yaml

    tensorboard --logdir gradguard_logs
"""

from __future__ import annotations

import argparse
import hashlib
import math
import pickle
import shutil
import sys
import tarfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import L2, GradGuard, LRGuard, ZClip

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
#: Per-channel mean and standard deviation of the CIFAR-10 training images, on the [0, 1] scale.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Images in the real CIFAR-10 training set: an epoch at batch 128 is 391 steps.
CIFAR_TRAIN_SIZE = 50000
#: Test error (%) of the CIFAR ResNets in He et al. 2016, table 6.
PAPER_ERROR: dict[int, float] = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}

__all__ = [
    "CifarDataModule",
    "ResNetModule",
    "StepTimer",
    "build_guard",
    "cifar_resnet",
    "cli_main",
    "download_cifar10",
    "load_cifar10",
    "main",
    "random_crop_flip",
    "synthetic_cifar",
]


# ----------------------------------------------------------------------------------------------- data


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR-10 python batch; ``ValueError`` naming the file on anything unexpected."""
    try:
        with open(path, "rb") as f:
            # The official batches are pickles written by Python 2: bytes keys, numpy arrays.
            entry = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file can fail in many ways inside pickle
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(entry).__name__}")
    missing = [k for k in (b"data", b"labels") if k not in entry]
    if missing:
        # Shown as the keys are (b'data', not 'data'): a batch written with str keys shows why it does not load.
        raise ValueError(f"{path}: missing key(s) {missing} (bytes keys); found {sorted(map(repr, entry))}")
    data, labels = entry[b"data"], entry[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 numpy array, got {kind}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' must have shape [N, 3072], got {list(data.shape)}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: b'labels' is not a list of integers ({err})") from err
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return data, labels


def _batch_folder(root: str | Path) -> Path:
    root = Path(root).expanduser()
    for folder in (root / CIFAR10_FOLDER, root):
        if (folder / "data_batch_1").is_file():
            return folder
    raise FileNotFoundError(
        f"no CIFAR-10 python batches in {root} (expected {root / CIFAR10_FOLDER}/data_batch_1..5 and test_batch; "
        f"use --download to fetch them)"
    )


def load_cifar10(root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loads CIFAR-10 from its standard python batches.

    The official files are pickles: only load batches from a source you trust.

    Args:
        root: The ``cifar-10-batches-py`` folder, or a folder that contains it.

    Returns:
        ``(train_x, train_y, test_x, test_y)``: images as uint8 tensors of shape ``[N, 3, 32, 32]``
        (RGB), labels as int64 tensors of shape ``[N]``.

    Raises:
        FileNotFoundError: No batches under ``root``.
        ValueError: A batch is corrupt or does not match the format (the message names the file).

    Example:
        >>> load_cifar10("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: no CIFAR-10 python batches in /nonexistent ...
    """
    folder = _batch_folder(root)

    def read(names: list[str]) -> tuple[Tensor, Tensor]:
        parts = [_read_batch(folder / name) for name in names]
        data = np.concatenate([d for d, _ in parts])
        labels = np.concatenate([y for _, y in parts])
        # Each row is channel-major: 1024 red, then 1024 green, then 1024 blue values, row by row.
        images = torch.from_numpy(data).reshape(-1, 3, 32, 32)
        return images, torch.from_numpy(labels)

    train_x, train_y = read([f"data_batch_{i}" for i in range(1, 6)])
    test_x, test_y = read(["test_batch"])
    return train_x, train_y, test_x, test_y


def download_cifar10(root: str | Path) -> Path:
    """Downloads the official CIFAR-10 python archive, checks its MD5 and extracts it under ``root``.

    Does nothing when the batches are already there.

    Args:
        root: Folder that receives ``cifar-10-batches-py``.

    Returns:
        The ``cifar-10-batches-py`` folder.

    Raises:
        ValueError: The downloaded archive's MD5 does not match (the file is deleted).

    Example:
        >>> folder = download_cifar10("data")  # doctest: +SKIP
    """
    root = Path(root).expanduser()
    try:
        return _batch_folder(root)
    except FileNotFoundError:
        pass
    root.mkdir(parents=True, exist_ok=True)
    archive = root / CIFAR10_URL.rsplit("/", 1)[1]
    partial = archive.with_suffix(".part")
    print(f"Downloading {CIFAR10_URL} to {archive} ...")
    with urllib.request.urlopen(CIFAR10_URL, timeout=60) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    digest = hashlib.md5()
    with open(partial, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != CIFAR10_MD5:
        partial.unlink()
        raise ValueError(f"{archive}: MD5 {digest.hexdigest()} does not match the official {CIFAR10_MD5}")
    partial.replace(archive)
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            # Refuse anything that would land outside root (absolute paths, "..", links).
            name = Path(member.name)
            if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
                raise ValueError(f"{archive}: unexpected archive member {member.name!r}")
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse unsafe metadata as well
            tar.extractall(root, members=members, filter="data")
        else:
            tar.extractall(root, members=members)
    return _batch_folder(root)


def synthetic_cifar(n: int, seed: int = 0, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """A SYNTHETIC CIFAR-shaped data set that a small net can learn above chance.

    Class ``c`` has its own mean colour and a stripe pattern of its own orientation and
    frequency; every image gets a random phase, contrast, colour shift and Gaussian noise, so the
    classes overlap: neither colour nor stripes alone tell them apart reliably (the mean colour
    alone classifies about half the images). The orientations lie between 0 and 81 degrees, so a
    horizontal flip (the augmentation), which mirrors an angle to 180 degrees minus it, never turns
    one class's stripes into another's. Deterministic given ``seed``. Not a substitute for CIFAR-10.

    Args:
        n: Number of images.
        seed: Random seed.
        num_classes: Number of classes.

    Returns:
        ``(images, labels)``: uint8 ``[n, 3, 32, 32]`` and int64 ``[n]``.

    Example:
        >>> x, y = synthetic_cifar(8, seed=1)
        >>> x.shape, x.dtype, y.shape
        (torch.Size([8, 3, 32, 32]), torch.uint8, torch.Size([8]))
    """
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    # The class patterns come from a fixed stream, so training and test sets (other seeds) agree.
    g_cls = torch.Generator().manual_seed(12345)
    colours = 0.35 + 0.3 * torch.rand(num_classes, 3, generator=g_cls)
    angles = torch.arange(num_classes) * (torch.pi / 2 / num_classes)
    freqs = 0.3 + 0.6 * torch.rand(num_classes, generator=g_cls)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    direction = torch.cos(angles)[labels, None, None] * xs + torch.sin(angles)[labels, None, None] * ys
    phase = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
    stripes = torch.sin(freqs[labels, None, None] * direction + phase)
    contrast = 0.05 + 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    shift = 0.08 * torch.randn(n, 3, 1, 1, generator=g)
    images = colours[labels, :, None, None] + shift + contrast * stripes[:, None]
    images = images + 0.15 * torch.randn(n, 3, 32, 32, generator=g)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """The paper's augmentation on a batch: zero-pad, random crop back to size, random horizontal flip.

    Args:
        images: Batch ``[N, C, H, W]`` (any dtype, any device).
        padding: Pixels of zero padding on every side.
        generator: Random generator on ``images.device`` (the global one when ``None``).

    Returns:
        A batch of the same shape.

    Example:
        >>> out = random_crop_flip(torch.ones(2, 3, 8, 8), padding=2)
        >>> out.shape
        torch.Size([2, 3, 8, 8])
    """
    n, _, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)  # [N, H]
    cols = dx + torch.arange(w, device=device)  # [N, W]
    flip = torch.rand(n, 1, device=device, generator=generator) < 0.5
    # Flipping is reading the chosen columns right to left.
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    # Advanced indices split by a slice put their broadcast shape first: [N, H, W, C].
    crops = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


class CifarDataModule(L.LightningDataModule):
    """CIFAR-10 from its python batches, or a synthetic stand-in when there is no data.

    Images travel as uint8; the batch is augmented (training only) and normalised after it reaches
    the device, which keeps the data loader trivial and the host-to-device copy small.

    Args:
        data_dir: Folder with (or that will receive) ``cifar-10-batches-py``; ``None`` for synthetic data.
        download: Fetch the official archive into ``data_dir`` when the batches are missing.
        batch_size: Batch size (128 in the paper).
        augment: Random crop with 4-pixel padding and horizontal flip on training batches.
        synthetic_train: Training-set size of the synthetic stand-in.
        synthetic_test: Test-set size of the synthetic stand-in.
        seed: Seed of the synthetic stand-in.
        num_workers: Data loader workers.

    Example:
        >>> dm = CifarDataModule(synthetic_train=16, synthetic_test=8, batch_size=4)
        >>> dm.setup("fit")  # doctest: +ELLIPSIS
        SYNTHETIC data: ...
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype
        (torch.Size([4, 3, 32, 32]), torch.uint8)
    """

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = False,
        batch_size: int = 128,
        augment: bool = True,
        synthetic_train: int = 10000,
        synthetic_test: int = 2000,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if download and data_dir is None:
            raise ValueError("download=True needs a data_dir to download into")
        for name, value in (
            ("batch_size", batch_size),
            ("synthetic_train", synthetic_train),
            ("synthetic_test", synthetic_test),
        ):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.augment = augment
        self.synthetic_train = synthetic_train
        self.synthetic_test = synthetic_test
        self.seed = seed
        self.num_workers = num_workers
        self.synthetic = False
        self._train: TensorDataset | None = None
        self._test: TensorDataset | None = None

    def prepare_data(self) -> None:
        if self.download and self.data_dir is not None:
            download_cifar10(self.data_dir)

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        if self.data_dir is not None:
            train_x, train_y, test_x, test_y = load_cifar10(self.data_dir)
            print(f"CIFAR-10 from {self.data_dir}: {len(train_y)} training and {len(test_y)} test images")
        else:
            self.synthetic = True
            print(
                f"SYNTHETIC data: {self.synthetic_train} training and {self.synthetic_test} test images of "
                "class-coloured stripes, NOT CIFAR-10 (pass --data-dir, with --download, for the real thing; under"
                " LightningCLI: --data.data_dir, with --data.download true)"
            )
            train_x, train_y = synthetic_cifar(self.synthetic_train, seed=self.seed)
            test_x, test_y = synthetic_cifar(self.synthetic_test, seed=self.seed + 1)
        self._train = TensorDataset(train_x, train_y)
        self._test = TensorDataset(test_x, test_y)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "call setup() first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        # The paper reports test error; we watch the test set too (no model selection happens on it).
        return self._loader(self._test, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._test, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self.augment and self.trainer is not None and self.trainer.training:
            images = random_crop_flip(images)
        mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255 - mean) / std, labels


# ---------------------------------------------------------------------------------------------- model


class _ShortcutA(nn.Module):
    """Option A: identity, subsampled by ``stride`` and zero-padded to ``out_channels``; no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # Half the new channels before, half after, as in the common re-implementations.
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an optional shortcut: ``relu(F(x) + shortcut(x))``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution (2 where the stage halves the resolution).
        shortcut: ``"A"`` (identity / zero padding), ``"B"`` (1x1 projection where the shape changes).
        plain: No shortcut at all.
        batch_norm: Batch normalisation after each convolution (convolutions get a bias without it).

    Example:
        >>> BasicBlock(16, 32, stride=2)(torch.zeros(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        shortcut: Literal["A", "B"] = "A",
        plain: bool = False,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        norm = nn.BatchNorm2d if batch_norm else nn.Identity
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=not batch_norm)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=not batch_norm)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module | None
        if plain:
            self.shortcut = None
        elif stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ShortcutA(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=not batch_norm), norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


def cifar_resnet(
    depth: int = 20,
    shortcut: Literal["A", "B"] = "A",
    plain: bool = False,
    batch_norm: bool = True,
    num_classes: int = 10,
) -> nn.Sequential:
    """The CIFAR ResNet (or plain net) of depth ``6n + 2``, Kaiming-initialised.

    Args:
        depth: ``6n + 2`` weighted layers: 8, 14, 20, 32, 44, 56, 110, ...
        shortcut: ``"A"`` or ``"B"``, see :class:`BasicBlock`.
        plain: No shortcuts (the paper's plain baseline).
        batch_norm: With batch normalisation.
        num_classes: Output classes.

    Returns:
        ``nn.Sequential`` with named parts ``stem``, ``stage1..3``, ``pool``, ``fc``.

    Example:
        >>> net = cifar_resnet(20)
        >>> sum(p.numel() for p in net.parameters())  # 0.27M in the paper's table 6
        269722
        >>> net(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    norm = nn.BatchNorm2d if batch_norm else nn.Identity
    parts: dict[str, nn.Module] = {
        "stem": nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=not batch_norm), norm(16), nn.ReLU())
    }
    in_channels = 16
    for stage, width in enumerate((16, 32, 64), start=1):
        blocks = []
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            blocks.append(BasicBlock(in_channels, width, stride, shortcut, plain, batch_norm))
            in_channels = width
        parts[f"stage{stage}"] = nn.Sequential(*blocks)
    parts["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    parts["fc"] = nn.Linear(64, num_classes)
    net = nn.Sequential()
    for name, module in parts.items():
        net.add_module(name, module)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class ResNetModule(L.LightningModule):
    """A CIFAR ResNet trained with the recipe of He et al. 2016.

    Args:
        depth: ``6n + 2`` weighted layers (20, 32, 44, 56, 110, ...).
        shortcut: ``"A"`` (identity, zero padding) or ``"B"`` (1x1 projections).
        plain: No shortcuts.
        batch_norm: With batch normalisation.
        lr: Initial learning rate (0.1).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (1e-4); 0 when a GradGuard ``L2`` regularizer replaces it.
        milestones: Fractions of training after which the learning rate is divided by 10.
        num_classes: Output classes.

    Example:
        >>> m = ResNetModule(depth=8)
        >>> m(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        depth: int = 20,
        shortcut: Literal["A", "B"] = "A",
        plain: bool = False,
        batch_norm: bool = True,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        milestones: tuple[float, float] = (0.5, 0.75),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not all(0 < m < 1 for m in milestones):
            raise ValueError(f"milestones must be fractions of training in (0, 1), got {milestones}")
        self.save_hyperparameters()
        self.net = cifar_resnet(depth, shortcut, plain, batch_norm, num_classes)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        # Milestones in optimizer steps, like the paper's 32k/48k of 64k iterations.
        total = int(self.trainer.estimated_stepping_batches)
        milestones = sorted({max(1, round(total * f)) for f in self.hparams.milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ------------------------------------------------------------------------------------------------ run


def build_guard(l2: float = 0.0, max_grad_norm: float | None = 5.0) -> GradGuard:
    """The guard of this example: ZClip, LR backoff, skip non-finite steps, optionally ``L2(l2)``.

    ZClip clips norms that jump above the run's own recent history. Its cap ``max_grad_norm`` also
    holds during ZClip's warm-up, when there is no history yet, and that matters here: without
    batch norm, ResNet-20 at the paper's learning rate reaches NaN at its third step, long before
    any adaptive threshold exists. With batch norm, ResNet-20's gradient norm starts below 10 and
    falls under 5 within a few steps, so the cap only trims its first steps; ResNet-56 starts
    higher (about 17 to 36 over its first steps, while its loss climbs from 5.6 to 22 before it
    settles: the early instability He et al. met in ResNet-110 with 400 warm-up iterations at
    lr 0.01), and there the cap acts as a warm-up.

    Args:
        l2: Strength of GradGuard's L2 regularizer (0: none, the optimizer's weight decay is used).
        max_grad_norm: Absolute cap of ZClip's threshold (``None``: adaptive only).

    Example:
        >>> guard = build_guard(l2=1e-4)
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    regularizers = [L2(l2)] if l2 > 0 else []
    return GradGuard(
        clip=ZClip(max_grad_norm=max_grad_norm), lr_guard=LRGuard(), regularizers=regularizers, on_nonfinite="skip"
    )


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.cifar_resnet",
        description="CIFAR-10 ResNets of He et al. 2016 under GradGuard.",
    )
    p.add_argument("--depth", type=int, default=20, help="6n+2 layers: 20, 32, 44, 56, 110 (default: 20)")
    p.add_argument("--shortcut", choices=("A", "B"), default="A", help="A: identity + zero padding, B: projection")
    p.add_argument("--plain", action="store_true", help="no shortcuts (vanishing-gradient showcase)")
    p.add_argument("--no-bn", action="store_true", help="no batch norm (exploding-gradient showcase at lr 0.1)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    p.add_argument("--epochs", type=int, default=164, help="epochs (default: 164, i.e. 64k iterations)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-batches-py (default: synthetic data)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    p.add_argument(
        "--l2",
        action="store_true",
        help="GradGuard's L2(1e-4) instead of SGD's weight decay (same gradient, but biases and BN left out)",
    )
    p.add_argument("--no-guard", action="store_true", help="train without GradGuard")
    p.add_argument("--quick", action="store_true", help="a few steps on a small synthetic set (seconds; for tests)")
    p.add_argument("--logdir", default="gradguard_logs", help="TensorBoard log root (default: gradguard_logs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers (default: 0)")
    args = p.parse_args(argv)
    if args.download and args.data_dir is None:
        p.error("--download needs --data-dir")
    if args.l2 and args.no_guard:
        p.error("--l2 uses GradGuard's regularizer; it cannot be combined with --no-guard")
    try:
        cifar_resnet(args.depth)
    except ValueError as err:
        p.error(str(err))
    return args


class StepTimer(Callback):
    """Wall time of each training step (batch start to batch end: forward, backward, guard, optimizer step).

    Validation, data-module setup and the first ``skip`` steps (allocator and kernel warm-up) are left out, so
    :attr:`per_step_s` times the number of steps in an epoch is the training time of that epoch.

    Args:
        skip: Leading steps not counted.

    Example:
        >>> timer = StepTimer(skip=5)
        >>> timer.per_step_s  # nothing timed yet
        nan
    """

    def __init__(self, skip: int = 5) -> None:
        if not isinstance(skip, int) or skip < 0:
            raise ValueError(f"`skip` must be an int >= 0, got {skip!r}")
        self.skip = skip
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the step's kernels, not just their launches
        self.times.append(time.perf_counter() - self._start)

    @property
    def per_step_s(self) -> float:
        """Mean seconds per training step after the first ``skip`` (``nan`` when none was timed)."""
        timed = self.times[self.skip :]
        return sum(timed) / len(timed) if timed else float("nan")

    @property
    def n_timed(self) -> int:
        """How many steps :attr:`per_step_s` averages (those after the first ``skip``)."""
        return len(self.times[self.skip :])


MIN_TIMED_STEPS = 20  # fewer timed steps give no per-epoch estimate: warm-up and machine load dominate them


def epoch_estimate(per_step_s: float, n_timed: int, batch_size: int) -> str:
    """The per-epoch training time on the real CIFAR-10 training set, as a phrase for the run's report.

    Projected from ``per_step_s`` only when at least :data:`MIN_TIMED_STEPS` steps were timed, and labelled
    as rough even then: a few steps on a shared machine say little about a whole epoch.

    Example:
        >>> epoch_estimate(0.05, 100, 128)
        'per-epoch estimate: ~0.3 min (rough: from 100 timed steps, 391 steps per epoch of 50000 images)'
        >>> epoch_estimate(0.05, 6, 128)
        'too few steps timed for an epoch estimate (6 < 20)'
    """
    if n_timed < MIN_TIMED_STEPS or not math.isfinite(per_step_s):
        return f"too few steps timed for an epoch estimate ({n_timed} < {MIN_TIMED_STEPS})"
    steps = math.ceil(CIFAR_TRAIN_SIZE / batch_size)
    return (
        f"per-epoch estimate: ~{per_step_s * steps / 60:.1f} min (rough: from {n_timed} timed steps,"
        f" {steps} steps per epoch of {CIFAR_TRAIN_SIZE} images)"
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains a CIFAR ResNet and prints what the guard did; returns the figures.

    Args:
        argv: Command-line arguments (``sys.argv[1:]`` when ``None``); see ``--help``.

    Returns:
        A dict with ``test_acc``, ``train_loss`` (the last logged one), ``synthetic``, ``steps``,
        ``wall_s``, ``step_s`` (mean seconds per training step after the first 5), ``guard`` (the guard's
        ``summary()``, or ``None``) and ``log_dir``.
    """
    args = _parse(argv)
    L.seed_everything(args.seed, verbose=False)
    quick = args.quick
    dm = CifarDataModule(
        data_dir=args.data_dir,
        download=args.download,
        batch_size=32 if quick else args.batch_size,
        synthetic_train=256 if quick else 10000,
        synthetic_test=128 if quick else 2000,
        seed=args.seed,
        num_workers=args.workers,
    )
    module = ResNetModule(
        depth=args.depth,
        shortcut=args.shortcut,
        plain=args.plain,
        batch_norm=not args.no_bn,
        lr=args.lr,
        weight_decay=0.0 if args.l2 else 1e-4,
    )
    guard = None if args.no_guard else build_guard(1e-4 if args.l2 else 0.0)
    timer = StepTimer(skip=2 if quick else 5)
    callbacks: list[Callback] = [timer] if guard is None else [guard, timer]
    name = f"{'plain' if args.plain else 'resnet'}{args.depth}{args.shortcut}" + ("_nobn" if args.no_bn else "")
    name += "_noguard" if args.no_guard else ""
    logger = TensorBoardLogger(args.logdir, name=name)
    trainer = L.Trainer(
        max_epochs=1 if quick else args.epochs,
        limit_train_batches=8 if quick else None,
        limit_val_batches=2 if quick else None,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=2 if quick else 50,
        enable_checkpointing=not quick,
        enable_progress_bar=not quick,
        enable_model_summary=not quick,
        num_sanity_val_steps=0,
        accelerator="auto",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall_s = time.perf_counter() - start
    train_loss = float(trainer.callback_metrics.get("train_loss", float("nan")))
    test_acc = trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]

    summary = guard.summary() if guard is not None else None
    arch = f"Plain-{args.depth}" if args.plain else f"ResNet-{args.depth}, shortcut {args.shortcut}"
    arch += ", no BN" if args.no_bn else ""
    print()
    print(
        f"{arch}, lr={args.lr:g}, {trainer.global_step} steps in {wall_s:.0f} s, last training loss {train_loss:.4g}"
        + (" (no guard)" if guard is None else "")
    )
    batch_size = dm.batch_size
    if timer.n_timed:
        print(
            f"Time per training step: {1000 * timer.per_step_s:.0f} ms at batch {batch_size}"
            f" (mean of {timer.n_timed} timed steps); {epoch_estimate(timer.per_step_s, timer.n_timed, batch_size)}"
        )
    else:  # a run of a few steps: the first ones (warm-up) are not timed
        print(f"Time per training step: not measured ({trainer.global_step} steps, the first {timer.skip} untimed)")
    if summary is not None:
        print("GradGuard events: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    data = "SYNTHETIC data, not comparable to the paper" if dm.synthetic else "CIFAR-10"
    line = f"Test accuracy: {100 * test_acc:.2f}% (error {100 * (1 - test_acc):.2f}%, {data})"
    if not dm.synthetic and not args.plain and args.depth in PAPER_ERROR:
        line += f"; He et al. 2016 report {PAPER_ERROR[args.depth]:.2f}% error for ResNet-{args.depth}"
    print(line)
    print(f"TensorBoard logs: {logger.log_dir}\n  tensorboard --logdir {args.logdir}")
    return {
        "test_acc": test_acc,
        "train_loss": train_loss,
        "synthetic": dm.synthetic,
        "steps": trainer.global_step,
        "wall_s": wall_s,
        "step_s": timer.per_step_s,
        "guard": summary,
        "log_dir": logger.log_dir,
    }


def _print_guard_report(trainer: L.Trainer) -> None:
    """Prints the event counts of every GradGuard among the trainer's callbacks, and where the logs are."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, GradGuard):
            print("GradGuard events: " + ", ".join(f"{k}={v}" for k, v in cb.summary().items()))
    if trainer.logger is not None and trainer.logger.log_dir is not None:
        print(f"TensorBoard logs: {trainer.logger.log_dir}\n  tensorboard --logdir {trainer.logger.save_dir}")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """The LightningCLI entry point: ``python -m examples.cifar_resnet fit --config CONFIG``.

    Args:
        args: Arguments for LightningCLI (``sys.argv[1:]`` when ``None``).
        run: Whether to run the subcommand; with ``False`` the CLI only builds its objects.

    Returns:
        The ``LightningCLI`` instance (its ``trainer``, ``model`` and ``datamodule``).
    """
    from lightning.pytorch.cli import LightningCLI  # needs jsonargparse, an optional dependency

    class _CLI(LightningCLI):
        def after_fit(self) -> None:
            _print_guard_report(self.trainer)

    return _CLI(
        ResNetModule,
        CifarDataModule,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate", "test", "predict"):
        cli_main()
    else:
        main()
