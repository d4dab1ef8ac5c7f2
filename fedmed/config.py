"""The one configuration schema shared by simulations, sites and the server.

A config is a TOML file with the sections below; every field has a default, so an
empty file is the quickstart. Values are typed once, here: list-valued settings
(`data.classes`, `privacy.budgets`, ...) are tuples after validation. Flower carries the
same config as a flat run config (`"federation.rounds": 10`), where every value is a
scalar: `flat()` writes the lists back as comma-joined strings, `from_flat` reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, ValidationError, model_validator

from fedmed.errors import FedmedError


class _Section(BaseModel):
    # No setting is infinite or NaN: privacy.epsilon = inf would calibrate DP-SGD to no noise at all.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a hospital's name: it names files
DEFAULT_CLASSES = ("glioma", "meningioma", "no_tumour", "pituitary")
MAX_HOSPITALS = 10_000  # a simulated hospital's data is made when it is first asked: many never cost anything
TUMOUR_FREE = "no_tumour"  # the class coarse labels know apart from the tumours


def _items(value: Any) -> Any:
    """`"a, b"` (TOML, or Flower's wire) or `["a", "b"]` (a TOML array) -> ("a", "b"), each
    item stripped; an empty string is no items. Anything else is left for pydantic to refuse."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",")) if value.strip() else ()
    if isinstance(value, (list, tuple)):
        return tuple(item.strip() if isinstance(item, str) else item for item in value)
    return value


def _named(items: tuple[str, ...]) -> tuple[str, ...]:
    if any(not item or "," in item for item in items):
        raise ValueError("expects names, comma-separated, none of them empty or holding a comma")
    return items


def _pairs(separator: str, number: bool) -> BeforeValidator:
    """`"k1<sep>v1, k2<sep>v2"` -> (("k1", v1), ("k2", v2)); an item that is not a pair
    stays a string, for the section's validator to name."""

    def parse(value: Any) -> Any:
        items = _items(value)
        if not isinstance(items, tuple):
            return items
        out: list[Any] = []
        for item in items:
            key, sep, raw = item.partition(separator) if isinstance(item, str) else ("", "", "")
            try:
                out.append((key.strip(), float(raw) if number else raw.strip()) if sep and key.strip() and raw.strip() else item)
            except ValueError:
                out.append(item)
        return tuple(out)

    return BeforeValidator(parse)


def _joined(separator: str) -> PlainSerializer:
    def join(value: tuple) -> str:
        return ",".join(item if isinstance(item, str) else f"{item[0]}{separator}{item[1]}" for item in value)

    return PlainSerializer(join, return_type=str)


Names = Annotated[tuple[str, ...], BeforeValidator(_items), AfterValidator(_named), _joined("")]
AUGMENTATIONS = ("flip", "rotate", "zoom", "intensity", "bias_field", "noise")


def _augmentations(value: Any) -> Any:
    """true (an older config's) is `flip`; false none; else names, each known."""
    if isinstance(value, bool):
        return ("flip",) if value else ()
    items = _items(value)
    if isinstance(items, tuple):
        unknown = [item for item in items if item not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not an augmentation: choose among {', '.join(AUGMENTATIONS)}")
    return items


Augmentations = Annotated[tuple[str, ...], BeforeValidator(_augmentations), _joined("")]
# Malformed items stay strings until the section's validator names them.
Aliases = Annotated[tuple[tuple[str, str] | str, ...], _pairs(":", number=False), _joined(":")]
Budgets = Annotated[tuple[tuple[str, float] | str, ...], _pairs("=", number=True), _joined("=")]


class DataConfig(_Section):
    """Where the images come from: the embedded demo hospitals, or a dataset on disk."""

    source: Literal["demo", "disk"] = Field(
        "demo", description="`demo` (embedded simulated hospitals) or `disk` (the dataset at `data.path`)."
    )
    path: str = Field("", description="Dataset on disk (`source = disk`): a folder, or an `.npz` file.")
    format: Literal["auto", "imagefolder", "nifti", "dicom", "npz"] = Field(
        "auto", description="`auto` (from the files found), `imagefolder`, `nifti`, `dicom` or `npz`."
    )
    classes: Names = Field(DEFAULT_CLASSES, description="Class names, comma-separated, in label order.")
    class_map: Aliases = Field(
        (),
        description="Extra folder-name aliases, `folder:class` comma-separated (built in: `notumor`, `no_tumor`, `*_tumor`).",
    )
    labels_csv: str = Field(
        "", description="CSV with `volume,label` rows labelling volumes or images instead of class folders (path relative to `data.path`)."
    )
    partition: Literal["pool", "folders"] = Field(
        "pool",
        description="Where hospitals come from: `pool` (one pool shared out by patient, as `[skew]` says) or `folders` (`ROOT/<hospital>/...`: one top folder per hospital, the natural split).",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of each class's patients held out for testing when the dataset has no `Testing` split."
    )
    val_fraction: float = Field(
        0.0,
        ge=0,
        le=0.5,
        description="Share of each hospital's training patients (all their images) held back for validation: hospitals report the global model's accuracy on it, and `fedmed sweep` chooses tuned settings by it (`sweep.tune`), never by a test split. 0: none.",
    )
    dedupe: bool = Field(True, description="Drop test images that exactly duplicate a training image (reported either way).")
    strict: bool = Field(False, description="Fail on any unreadable file instead of skipping and reporting it.")
    slab: float = Field(0.6, gt=0, le=1, description="Central share of each volume's brain slices used (NIfTI, DICOM).")
    min_foreground: float = Field(
        0.05, ge=0, lt=1, description="Skip volume slices with less than this share of non-background pixels."
    )
    normalise: Literal["percentile", "zscore"] = Field(
        "percentile", description="Per-volume intensity scaling: `percentile` (clip 0.5-99.5 %) or `zscore` (clip at 3 SD)."
    )
    modality: str = Field("", description="Only volumes named `*_<modality>.nii[.gz]` (BraTS style, e.g. `t1ce`); empty: all.")
    workers: int = Field(0, ge=0, le=256, description="Processes decoding images on first load; 0: one per CPU core.")
    max_pixels: int = Field(
        25_000_000,
        gt=0,
        description="Most pixels one file may declare (an image's width x height, a DICOM file's rows x columns x frames, a NIfTI volume's voxels, each image of an `.npz`), read from its header before decoding: a larger file is skipped with the reason, a larger `.npz` refused. 25 million (5000 x 5000) is far above brain MRI (slices of 256-1024 pixels square, volumes rarely over 21 million voxels) and keeps a decoded array to about 100 MB (float32), where a 20 KB file declaring 13,000 x 13,000 pixels would take over a gigabyte.",
    )
    image_size: int = Field(64, ge=32, le=256, description="Side of the square images in pixels (32-256).")
    hospitals: int = Field(8, ge=1, le=MAX_HOSPITALS, description="Number of simulated hospitals.")
    train_per_hospital: int = Field(600, ge=4, description="Training images per hospital (demo only).")
    test_per_hospital: int = Field(50, ge=4, description="Test images per hospital (demo only).")
    global_test_size: int = Field(800, ge=4, description="Images in the held-out global test set (demo only).")
    cache_dir: str = Field(
        "", description="Where generated and decoded data is cached; empty: `$FEDMED_CACHE` or `~/.cache/fedmed`."
    )

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        names = self.classes
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"data.classes needs two or more distinct names, comma-separated (got {','.join(names)!r})")
        if self.source == "demo" and names != DEFAULT_CLASSES:
            raise ValueError(f"the demo data has the classes {','.join(DEFAULT_CLASSES)}; data.classes applies to source = disk")
        if self.source == "disk" and not self.path:
            raise ValueError("data.source = disk needs data.path (the dataset's folder or .npz file)")
        for item in self.class_map:
            if isinstance(item, str) or item[1] not in names:
                shown = item if isinstance(item, str) else ":".join(item)
                raise ValueError(f"data.class_map entry {shown!r} must be `folder:class` with class one of {', '.join(names)}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def aliases(self) -> dict[str, str]:
        """`data.class_map` as folder name -> class."""
        return dict(self.class_map)  # type: ignore[arg-type]  # validated: pairs only


class SkewConfig(_Section):
    """How different the hospitals are: label skew and quantity skew (composable), and
    scanner shift. Applies to the demo data and to `data.partition = pool`."""

    labels: Literal["iid", "dirichlet", "classes"] = Field(
        "iid",
        description="`iid`, `dirichlet` (each class spread over hospitals by Dirichlet(`beta`)) or `classes` (each hospital holds exactly `classes_per_hospital` classes).",
    )
    beta: float = Field(0.5, gt=0, description="Dirichlet concentration for `labels = dirichlet` (small: more skew).")
    classes_per_hospital: int = Field(2, ge=1, description="Classes each hospital holds for `labels = classes` (#C=k).")
    quantity: Literal["equal", "dirichlet", "power"] = Field(
        "equal", description="Hospital sizes: `equal`, `dirichlet` (by Dirichlet(`quantity_beta`)) or `power` (rank^-`power`)."
    )
    quantity_beta: float = Field(1.0, gt=0, description="Dirichlet concentration of hospital sizes (`quantity = dirichlet`).")
    power: float = Field(1.0, gt=0, le=5, description="Exponent of the power law of hospital sizes (`quantity = power`).")
    min_size: int = Field(8, ge=1, description="Fewest training images a skewed hospital may get; skews are redrawn until it holds.")
    scanners: Literal["native", "shared", "simulated"] = Field(
        "native",
        description="Scanner shift: `native` (demo hospitals each have their own scanner; images on disk stay as they are), `shared` (demo: one scanner for all) or `simulated` (images on disk re-acquired with a simulated scanner per hospital).",
    )


class LabelsConfig(_Section):
    """Partial labels: which hospitals label what. Test sets stay fully labelled, to measure."""

    scenario: Literal["full", "unlabelled", "fraction", "subset", "coarse"] = Field(
        "full",
        description="`full`; `unlabelled` (some hospitals have no labels); `fraction` (hospitals label a share `fraction` of their images); `subset` (hospitals annotate only the classes `annotated`; their other images are unknown, not negatives); `coarse` (hospitals know only tumour vs `no_tumour`).",
    )
    hospitals: float = Field(0.5, gt=0, le=1, description="Share of hospitals the scenario applies to (chosen by `seed`); the others are fully labelled.")
    fraction: float = Field(0.3, ge=0, le=1, description="`fraction`: share of an affected hospital's images that carry a label.")
    annotated: Names = Field(("glioma", "no_tumour"), description="`subset`: the classes affected hospitals annotate, comma-separated.")
    unlabelled: Literal["ignore", "pseudo"] = Field(
        "ignore", description="Images without a (full) label: `ignore` them, or `pseudo`-label them with the received global model (a `subset` hospital's unknown image may take any class, and then trains over all classes)."
    )
    threshold: float = Field(0.9, gt=0, le=1, description="`pseudo`: the model's confidence needed to take its prediction as a label.")


class ModelConfig(_Section):
    """The network every hospital trains."""

    name: Literal["cnn", "resnet18"] = Field("cnn", description="`cnn` (small, fast on CPU) or `resnet18`.")
    width: int = Field(16, ge=4, le=256, description="Channels in the CNN's first block (doubles twice).")
    norm: Literal["group", "batch"] = Field(
        "group", description="The CNN's normalisation layers: `group` (GroupNorm, works with DP-SGD) or `batch` (BatchNorm, refused with DP-SGD)."
    )


class TrainConfig(_Section):
    """Training at each hospital, the same everywhere and in the baselines."""

    local_epochs: int = Field(1, ge=1, le=1000, description="Passes over a hospital's data per round.")
    batch_size: int = Field(4, ge=1, le=4096, description="Mini-batch size.")
    optimizer: Literal["sgd", "adam"] = Field("adam", description="`adam` or `sgd` (with momentum); state is reset each round.")
    lr: float = Field(0.001, gt=0, le=10, description="Learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (sgd only).")
    weight_decay: float = Field(0.0, ge=0, le=1, description="L2 weight decay.")
    augment: Augmentations = Field(
        ("flip",),
        description="Augmentations during training, comma-separated: `flip` (left-right), `rotate`, `zoom`, `intensity` (scale and contrast), `bias_field`, `noise` (Rician); true is `flip`, false or empty none. Each image's drawn from a seed of its own (MONAI's transforms; see fedmed/training/augment.py).",
    )
    schedule: Literal["constant", "cosine", "step"] = Field(
        "constant",
        description="The learning rate across rounds, set by the server in each round's request (so a resumed run continues it): `constant`; `cosine` (from `lr` in round 1 to `lr_min` in the last); `step` (times `step_gamma` every `step_rounds` rounds).",
    )
    lr_min: float = Field(0.0, ge=0, le=10, description="`cosine`: the learning rate of the last round.")
    step_rounds: int = Field(10, ge=1, le=100_000, description="`step`: rounds between two decays.")
    step_gamma: float = Field(0.5, gt=0, le=1, description="`step`: the factor of each decay.")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="`cpu`, `cuda`, or `auto` (CUDA if present).")


class FederationConfig(_Section):
    """How hospitals cooperate, and the baselines to compare against."""

    mode: Literal["federated", "pooled", "local"] = Field(
        "federated",
        description="`federated` (FedAvg), `pooled` (all data centralised) or `local` (each hospital alone).",
    )
    rounds: int = Field(10, ge=1, le=100_000, description="Federated rounds (baselines train the same number of sample-gradient steps).")
    strategy: Literal[
        "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedbn", "scaffold", "krum", "multikrum", "bulyan", "median", "trimmed_mean"
    ] = Field(
        "fedavg",
        description="`fedavg`; `fedprox` (proximal term `proximal_mu`); server optimisers `fedadam`, `fedyogi`, `fedadagrad` (`server_lr`) and `fedavgm` (`server_lr`, `server_momentum`); `fedbn` (FedAvg; normalisation layers stay at each hospital); `scaffold` (control variates; `train.optimizer = sgd`); robust `krum`, `multikrum`, `bulyan` (`byzantine`, `krum_select`), `median` (coordinate-wise) and `trimmed_mean` (`trim_fraction`). References: README, Algorithms.",
    )  # fmt: skip
    proximal_mu: float = Field(0.01, ge=0, le=100, description="FedProx: weight of the proximal term mu/2 ||w - w_global||^2.")
    server_lr: float = Field(
        0.0, ge=0, le=10, description="The server's learning rate: FedAdam, FedYogi, FedAdagrad, FedAvgM and SCAFFOLD. 0: the usual one (0.01 for FedAdam, FedYogi and FedAdagrad; 1.0 for FedAvgM and SCAFFOLD)."
    )
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM: the server's momentum on the averaged update.")
    byzantine: int = Field(
        1, ge=0, le=MAX_HOSPITALS, description="Krum, Multi-Krum, Bulyan: how many hospitals a round may send anything (f); a round must ask more than 2f + 2 (Bulyan: 4f + 2)."
    )
    krum_select: int = Field(0, ge=0, le=MAX_HOSPITALS, description="Multi-Krum: how many of the best-scored updates are averaged (m). 0: the hospitals asked minus `byzantine`.")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="Trimmed mean: the share of values cut at each end, coordinate by coordinate (beta); it must cut at least one hospital.")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Fraction of hospitals that train each round.")
    fraction_evaluate: float = Field(1.0, ge=0, le=1, description="Fraction of hospitals that evaluate each round.")
    round_timeout: float = Field(3600.0, gt=0, description="Seconds to wait for hospitals' replies in a round.")
    min_hospitals: int = Field(
        0,
        ge=0,
        le=MAX_HOSPITALS,
        description="Hospitals that must be connected for a round to start; a round goes on without those that drop out or time out. 0: all `data.hospitals`.",
    )

    def server_step(self) -> float:
        """`server_lr`, or the strategy's usual one."""
        if self.server_lr:
            return self.server_lr
        return 0.01 if self.strategy in ("fedadam", "fedyogi", "fedadagrad") else 1.0


def share(hospitals: int, fraction: float) -> int:
    """How many of `hospitals` a round asks for `fraction` (at least one)."""
    return min(hospitals, max(1, round(fraction * hospitals)))


class PrivacyConfig(_Section):
    """Differential privacy: sample-level DP-SGD at each hospital (Opacus), or
    client-level DP-FedAvg at the server. Epsilon is over the whole planned run."""

    mode: Literal["off", "sample", "client"] = Field(
        "off",
        description="`off`; `sample` (DP-SGD at each hospital: protects one image of one hospital) or `client` (DP-FedAvg at the server: protects a whole hospital's contribution).",
    )
    epsilon: float = Field(8.0, gt=0, description="Target epsilon for the whole planned run (`federation.rounds`); sigma is calibrated once to meet it.")
    noise_multiplier: float = Field(0.0, ge=0, description="Sigma, set explicitly instead of calibrating it from `epsilon`; 0: calibrate.")
    delta: float = Field(
        0.0, ge=0, lt=1, description="Delta; must be below 1/n (n: a hospital's images, or the hospitals for `client`). 0: min(1e-5, 0.1/n)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Clipping bound: of each image's gradient (`sample`) or each hospital's update (`client`).")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Privacy accountant: `prv` (tight) or `rdp` (Renyi DP, about 10 % higher).")
    budget: float = Field(
        0.0, ge=0, description="`sample`: the most epsilon each hospital will spend in a run; a hospital declines a round that would exceed it. 0: no limit."
    )
    budgets: Budgets = Field(
        (), description="Per-hospital budgets overriding `budget`, `hospital-02=2.0` comma-separated. A real node is sent only its own; its `site.max_epsilon`, a lifetime cap, applies besides."
    )
    reproducible: bool = Field(
        False,
        description="Draw the DP noise and batches from the run's seed so a study reproduces. Anyone with the seed could then remove the noise: for simulations only (a node with its own budget refuses). false: from the system's entropy.",
    )
    canaries: int = Field(
        0,
        ge=0,
        le=10000,
        description="Empirical privacy audit: this many synthetic canary images, each added to the first hospital's training data with probability 1/2; `fedmed audit --empirical` scores them (needs `output.save_model`). 0: none; otherwise at least 8 (a few hundred give a useful bound).",
    )

    @model_validator(mode="after")
    def _budgets_are_pairs(self) -> PrivacyConfig:
        for item in self.budgets:
            if isinstance(item, str) or not (math.isfinite(item[1]) and item[1] > 0):
                shown = item if isinstance(item, str) else f"{item[0]}={item[1]:g}"
                raise ValueError(f"privacy.budgets expects hospital=epsilon pairs with epsilon > 0, comma-separated (got {shown!r})")
        return self

    def budget_for(self, hospital: str) -> float:
        """What the server sets for this hospital: its `budgets` entry, else `budget` (0: none)."""
        return dict(self.budgets).get(hospital, self.budget)  # type: ignore[arg-type]  # validated: pairs only


class PersonalConfig(_Section):
    """Personalisation: a model of each hospital's own beside the global one, evaluated on
    the hospital's own test split next to the global model."""

    method: Literal["none", "finetune", "ditto", "fedper"] = Field(
        "none",
        description="`none`; `finetune` (after the last round each hospital trains `epochs` more on its own data); `ditto` (each hospital keeps a personal model, trained `epochs` a round towards the global one with weight `ditto_lambda`; Li et al. 2021); `fedper` (the classifier head stays at each hospital, the body is shared; Arivazhagan et al. 2019).",
    )
    epochs: int = Field(1, ge=1, le=1000, description="`finetune`: epochs after the last round; `ditto`: the personal model's epochs each round.")
    ditto_lambda: float = Field(0.1, ge=0, le=100, description="`ditto`: weight of lambda/2 ||v - w_global||^2 in the personal model's loss.")


class AttackConfig(_Section):
    """Hospitals that misbehave, in simulation only: what they send instead of an honest
    update. Recorded in the run's config and summary."""

    kind: Literal["none", "label_flip", "sign_flip", "scale", "gaussian", "free_rider"] = Field(
        "none",
        description="`none`; `label_flip` (trains on labels reversed, class c as C-1-c); `sign_flip` (sends its update negated); `scale` (its update times `factor`); `gaussian` (sends the global model plus Gaussian noise of `std` on every weight); `free_rider` (sends back the model it received).",
    )
    hospitals: int | Names = Field(
        1, description="The attackers: how many, drawn from the seed (a number), or which (`hospital-02,hospital-05`)."
    )
    factor: float = Field(10.0, ge=-1e6, le=1e6, description="`scale`: the factor on the attacker's update.")
    std: float = Field(1.0, gt=0, le=1e6, description="`gaussian`: the noise's standard deviation.")

    @property
    def active(self) -> bool:
        return self.kind != "none"


class SimulationConfig(_Section):
    """The Ray-based Simulation Engine."""

    cpus_per_hospital: float = Field(1.0, gt=0, description="CPU cores reserved per simulated hospital (sets how many train at once).")
    gpus_per_hospital: float = Field(0.0, ge=0, description="Fraction of a GPU per simulated hospital.")
    ray_address: str = Field("", description="Attach to this Ray cluster (`HOST:PORT`) instead of starting one.")
    node_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds the ServerApp waits for a first SuperNode before it fails (a `flwr run` federation without any). Any number of SuperNodes serves any number of hospitals.",
    )


class OutputConfig(_Section):
    """The run directory."""

    dir: str = Field("runs", description="Parent folder of run directories.")
    name: str = Field("", description="Run directory name; empty: a timestamped name.")
    save_model: bool = Field(True, description="Write the final global model weights (`model.pt`).")
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard event files (`RUN/tensorboard/`): per round the global test figures, the hospitals' pooled and own evaluations, their training loss and the fairness figures, so `tensorboard --logdir runs/` shows every run. Needs `pip install 'fedmed[tensorboard]'`.",
    )
    save_updates: bool = Field(
        True,
        description="Keep every round's model sent and updates received (`updates/`, about (hospitals + 1) x model size per round) so `fedmed audit` can recompute each aggregate.",
    )


class ServerConfig(_Section):
    """The coordinating centre's deployment (`fedmed server start`); paths are relative
    to the folder the command runs in."""

    address: str = Field("0.0.0.0:9093", description="HOST:PORT the SuperLink listens on for hospitals (one HTTPS port).")
    certs: str = Field("server/certs", description="Folder with `ca.crt`, `server.crt` and `server.key` (`fedmed certs init`).")
    enrolled: str = Field("server/enrolled", description="Folder of enrolled hospitals' node keys, `NAME.pub` each (`fedmed certs site NAME`).")
    state: str = Field("server/state", description="The SuperLink's database, logs, the current run's pointer (for `status` and `--resume`) and `keys/`: the server's ledger signing key and its runs' trust files.")


class SiteConfig(_Section):
    """One hospital's node (`fedmed site start`) and its policy; paths are relative to
    the folder the command runs in. Never sent to the server."""

    name: str = Field("", description="This hospital's name in the federation, as enrolled (`fedmed certs site NAME`).")
    server: str = Field("", description="The server's HOST:PORT, as its operator gives it.")
    ca_cert: str = Field("sites/keys/ca.crt", description="The federation's CA certificate (`ca.crt` from the operator).")
    key: str = Field("", description="This node's private key (`fedmed certs site`); empty: `sites/keys/<name>.key`.")
    ledger_dir: str = Field("sites/ledgers", description="Where this hospital's signed ledgers, their key and the node's log are kept.")
    max_epsilon: float = Field(
        0.0,
        ge=0,
        description="Policy: the most epsilon this hospital spends on its data over all runs (a lifetime cap, kept in its ledger directory); it then requires sample-level DP with secret noise. 0: no cap, no DP required.",
    )
    min_noise: float = Field(0.0, ge=0, description="Policy: the smallest DP-SGD noise multiplier (sigma) it accepts; it then requires sample-level DP. 0: any.")
    models: Names = Field(
        (), description="Policy: architecture digests it accepts (`fedmed model-digest`), comma-separated. Empty: any."
    )
    max_rounds: int = Field(0, ge=0, description="Policy: the last round it trains in; later rounds are declined. 0: no limit.")
    port: int = Field(0, ge=0, le=65535, description="Port of the node's ClientApp API on this machine (loopback only). 0: a free one.")

    @model_validator(mode="after")
    def _named_safely(self) -> SiteConfig:
        if self.name and not SITE_NAME.fullmatch(self.name):
            raise ValueError(f"site.name {self.name!r}: use letters, digits, '.', '_' and '-' (it names the node's files)")
        return self


RESULT_SECTIONS = ("seed", "data", "skew", "labels", "model", "train", "federation", "privacy", "personal", "attack")
# Where things are on this machine: not part of what a run is, never written to a run directory.
REDACTED = "<local, not recorded>"
PATH_KEYS = ("data.path", "data.labels_csv", "data.cache_dir")
MACHINE_KEYS = (*PATH_KEYS, "data.workers")
# What a real hospital's node is sent (`FedmedConfig.for_nodes`): whole sections, and single keys.
NODE_SECTIONS = ("seed", "model", "train", "privacy", "personal")
NODE_KEYS = ("federation.strategy", "federation.proximal_mu", "federation.rounds", "data.image_size", "data.classes")


class FedmedConfig(_Section):
    """A whole fedmed run."""

    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed for data, initialisation and training order.")
    data: DataConfig = DataConfig()
    skew: SkewConfig = SkewConfig()
    labels: LabelsConfig = LabelsConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    personal: PersonalConfig = PersonalConfig()
    attack: AttackConfig = AttackConfig()
    simulation: SimulationConfig = SimulationConfig()
    output: OutputConfig = OutputConfig()
    server: ServerConfig = ServerConfig()
    site: SiteConfig = SiteConfig()

    @model_validator(mode="after")
    def _scanners_fit_the_data(self) -> FedmedConfig:
        if self.skew.scanners == "simulated" and self.data.source != "disk":
            raise ValueError("skew.scanners = simulated re-acquires images on disk; the demo data has its own: use native or shared")
        if self.skew.scanners == "shared" and self.data.source != "demo":
            raise ValueError("skew.scanners = shared applies to the demo data; images on disk keep their own scanners (native)")
        return self

    @model_validator(mode="after")
    def _labels_fit_the_classes(self) -> FedmedConfig:
        names = self.data.classes
        if self.labels.scenario == "subset":
            unknown = [c for c in self.labels.annotated if c not in names]
            if unknown or not self.labels.annotated:
                raise ValueError(f"labels.annotated names {', '.join(unknown) or 'no class'}: choose among {', '.join(names)}")
            if len(self.labels.annotated) < 2:
                raise ValueError("labels.annotated needs two or more classes: a softmax over one class learns nothing")
        if self.labels.scenario == "coarse" and TUMOUR_FREE not in names:
            raise ValueError(f"labels.scenario = coarse needs a `{TUMOUR_FREE}` class in data.classes")
        return self

    @model_validator(mode="after")
    def _privacy_fits(self) -> FedmedConfig:
        private = self.privacy.mode
        if private != "off" and self.model.name == "cnn" and self.model.norm == "batch":
            raise ValueError("differential privacy cannot train BatchNorm (it mixes the images of a batch): set model.norm = group")
        if private == "client" and self.federation.strategy not in ("fedavg", "fedprox", "fedbn"):
            raise ValueError("privacy.mode = client averages the updates itself (DP-FedAvg): use federation.strategy fedavg, fedprox or fedbn")
        if private != "off" and self.federation.mode != "federated":
            raise ValueError(f"privacy.mode = {private} applies to federated runs; the {self.federation.mode} baseline has no privacy")
        if self.federation.min_hospitals > self.data.hospitals:
            raise ValueError(
                f"federation.min_hospitals ({self.federation.min_hospitals}) is more than data.hospitals ({self.data.hospitals})"
            )
        if 0 < self.privacy.canaries < 8:
            raise ValueError("privacy.canaries: use 0 (none) or at least 8; a few hundred give a useful bound")
        if self.privacy.canaries and not self.output.save_model:
            raise ValueError("privacy.canaries are scored against the final model: set output.save_model = true")
        if self.privacy.canaries and self.federation.mode != "federated":
            raise ValueError("privacy.canaries audit a federated run; the baselines keep no ledgers")
        return self

    @model_validator(mode="after")
    def _strategy_fits(self) -> FedmedConfig:
        """Robust rules checked against the hospitals a round asks; SCAFFOLD's step needs SGD."""
        f = self.federation
        asked = share(self.data.hospitals, f.fraction_train)
        advice = "ask more hospitals a round (data.hospitals, federation.fraction_train)"
        needs = {"krum": 2 * f.byzantine + 3, "multikrum": 2 * f.byzantine + 3, "bulyan": 4 * f.byzantine + 3}
        if f.strategy in needs and asked < needs[f.strategy]:
            bound = "4f + 2 (El Mhamdi et al. 2018)" if f.strategy == "bulyan" else "2f + 2 (Blanchard et al. 2017)"
            raise ValueError(
                f"federation.strategy = {f.strategy} with federation.byzantine = {f.byzantine} needs at least {needs[f.strategy]} hospitals a round (more than {bound}); this run asks {asked}: lower federation.byzantine or {advice}"
            )
        if f.strategy == "multikrum" and f.krum_select > asked - f.byzantine:
            raise ValueError(f"federation.krum_select = {f.krum_select} averages more updates than the {asked - f.byzantine} Multi-Krum may keep ({asked} asked a round, minus byzantine {f.byzantine}): lower it, or 0 for all of them")
        if f.strategy == "trimmed_mean" and int(f.trim_fraction * asked) < 1:
            raise ValueError(f"federation.trim_fraction = {f.trim_fraction:g} cuts no hospital of the {asked} asked a round: raise it to at least {1 / asked:.3g}, or {advice}")
        if f.strategy == "scaffold" and (self.train.optimizer != "sgd" or self.train.momentum):
            raise ValueError("federation.strategy = scaffold estimates gradients from plain SGD steps (Karimireddy et al. 2020): set train.optimizer = sgd and train.momentum = 0")
        if self.train.schedule == "cosine" and self.train.lr_min > self.train.lr:
            raise ValueError(f"train.lr_min ({self.train.lr_min:g}) is above train.lr ({self.train.lr:g}): a cosine schedule decays from lr to lr_min")
        if self.labels.scenario != "full" and (self.personal.method in ("finetune", "ditto") or self.attack.kind == "label_flip"):
            what = f"personal.method = {self.personal.method}" if self.personal.method in ("finetune", "ditto") else "attack.kind = label_flip"
            raise ValueError(f"{what} trains on exact labels; labels.scenario = {self.labels.scenario} leaves some unknown: use labels.scenario = full")
        if self.personal.method == "fedper" and f.strategy in ("scaffold", "fedbn", "fedadam", "fedyogi", "fedadagrad", "fedavgm"):
            raise ValueError(f"personal.method = fedper keeps the head at each hospital, which federation.strategy = {f.strategy} steps over the whole model: use fedavg, fedprox or a robust rule")
        if self.personal.method in ("finetune", "ditto") and self.privacy.mode != "off":
            raise ValueError(f"personal.method = {self.personal.method} trains a personal model outside DP's accounting: use fedper (its head trains under DP with the rest) or privacy.mode = off")
        if self.personal.method != "none" and self.federation.mode != "federated":
            raise ValueError(f"personal.method = {self.personal.method} personalises a federated model; the {self.federation.mode} baseline has none")
        a = self.attack
        if a.active:
            if self.federation.mode != "federated":
                raise ValueError(f"attack.kind = {a.kind} attacks a federation; the {self.federation.mode} baseline has none")
            if isinstance(a.hospitals, int) and not 1 <= a.hospitals <= self.data.hospitals:
                raise ValueError(f"attack.hospitals = {a.hospitals}: between 1 and data.hospitals ({self.data.hospitals}) hospitals can attack")
        return self

    def flat(self) -> dict[str, Any]:
        """Flat `section.key` view, the form Flower's run config and records use."""
        return flatten(self.model_dump())

    def digest(self) -> str:
        """SHA-256 of the settings that decide the results (not where outputs go)."""
        flat = {k: v for k, v in self.flat().items() if k.split(".")[0] in RESULT_SECTIONS and k not in MACHINE_KEYS}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()

    def shareable(self) -> dict[str, Any]:
        """The flat config with paths on this machine replaced: what a run directory records."""
        return {k: (REDACTED if k in PATH_KEYS and v else v) for k, v in self.flat().items()}

    def for_hospitals(self) -> dict[str, Any]:
        """What the server sends each simulated hospital: the settings that decide results.
        Simulated hospitals also find their data through it (data.path is the researcher's own)."""
        return {k: v for k, v in self.flat().items() if k.split(".")[0] in RESULT_SECTIONS}

    def for_nodes(self) -> dict[str, Any]:
        """What the server sends a real hospital's node: only the settings that change what
        it computes. No paths, no data settings but the image size and classes it must
        match, no server-side settings, and no budgets (they name other hospitals: each
        node is sent its own budget beside these)."""
        withheld = ("privacy.budget", "privacy.budgets", "privacy.canaries")  # budgets name hospitals; canaries are simulated only
        return {k: v for k, v in self.flat().items() if (k in NODE_KEYS or k.split(".")[0] in NODE_SECTIONS) and k not in withheld}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise FedmedError(f"config error: `{name}` conflicts with a value set above it")
        node[leaf] = value
    return tree


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        section = _section_of(error["loc"][:-1])
        known = ", ".join(section.model_fields) if section else ""
        return f"unknown config key `{loc}` (known here: {known})"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict) else ""
    message = error["msg"].removeprefix("Value error, ")
    if not loc or message.startswith(f"{loc}."):  # a section's own check names its key
        return message
    return f"`{loc}`: {message}{shown}"


def _section_of(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = FedmedConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            return None
        if not issubclass(field.annotation, BaseModel):
            return None
        model = field.annotation
    return model


def from_dict(tree: dict[str, Any]) -> FedmedConfig:
    """Validate a nested dict; any problem becomes one FedmedError line."""
    try:
        return FedmedConfig.model_validate(tree)
    except ValidationError as exc:
        raise FedmedError(f"config error: {_describe(exc.errors()[0])}") from None


def from_flat(flat: dict[str, Any]) -> FedmedConfig:
    return from_dict(unflatten(dict(flat)))


def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value`, the value read as TOML (bare words are strings)."""
    name, sep, raw = item.partition("=")
    name = name.strip()
    if not sep or not name:
        raise FedmedError(f"--set expects section.key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return name, value


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> FedmedConfig:
    """Read a TOML config (or the defaults), apply `--set` overrides and then
    `values` (already typed, e.g. from CLI options), validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise FedmedError(
                f"config file not found: {file} (pass an existing TOML file, "
                "e.g. simulations/quickstart.toml)"
            )
        try:
            tree = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise FedmedError(f"config file {file} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise FedmedError(f"cannot read config file {file}: {exc.strerror}") from None
    if "sweep" in tree:
        raise FedmedError(f"{path} is a study (it has a [sweep] table): run it with `fedmed sweep {path}`")
    flat = flatten(tree)
    for item in overrides or []:
        name, value = parse_override(item)
        flat[name] = value
    flat.update(values or {})
    return from_flat(flat)


def reference() -> list[tuple[str, str, str]]:
    """(key, default as it is written in TOML, description) for every field: the config
    reference in the docs (`docs/config.md`)."""
    defaults = FedmedConfig().flat()
    rows = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, f"{prefix}{name}.")
            else:
                key = f"{prefix}{name}"
                rows.append((key, json.dumps(defaults[key]), field.description or ""))

    walk(FedmedConfig, "")
    return rows
