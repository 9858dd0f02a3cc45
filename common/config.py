"""Typed configuration for server and sites: one tree of pydantic sections, validated once at load.

Precedence is CLI > file > defaults: `load_config(Model, file, overrides)` reads a TOML or JSON file, applies
dotted overrides (`train.steps=100`), validates, and turns any validation failure into a ConfigError whose one
line names the field. The part every site must agree on (family, model shape, losses, discriminator optimiser,
schedule) is `SiteFacingConfig`; the server sends it to each site in Welcome, so a hospital only needs to say
where its data is and where the server is.
"""

from __future__ import annotations

import json
import pathlib
import tomllib
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from asyndgan.common.errors import ConfigError
from asyndgan.common.identifiers import SITE_ID_PATTERN

WireDType = Literal["float32", "float16", "bfloat16", "q8"]
WireRegion = Literal["full", "brain", "auto"]
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


MEMBER_PATTERN = r"^[a-z][a-z0-9_]{0,31}$"  # a registered generator's or discriminator's name


class Image2DConfig(_Section):
    """Label map -> multi-channel image (pix2pix-style)."""

    image_size: int = Field(256, ge=16, le=1024, description="square side of G's input and output")
    load_size: int | None = Field(None, ge=16, le=2048, description="side the sites resize to before a random "
                                  "crop of image_size (pix2pix: 286 for 256); None: same as image_size, no crop")
    modalities: list[str] = Field(default_factory=lambda: list(BRATS_MODALITIES), min_length=1)
    num_classes: int = Field(5, ge=2, le=64, description="label values 0..num_classes-1 in the label maps")
    generator: str = Field(
        "resnet", pattern=MEMBER_PATTERN, description="a generator registered in common/families.py "
        "(register_generator): resnet, pix2pix's ResNet generator (the papers'); spade, the same with the label "
        "map in every block of its second half (SPADE normalisation, GauGAN; needs MONAI: the server's 'research' "
        "extra); unet, a U-Net with skip connections. Only the server builds it")
    ngf: int = Field(64, ge=1, le=512)
    n_blocks: int = Field(9, ge=0, le=32, description="residual blocks (resnet and spade generators)")
    unet_depth: int = Field(7, ge=2, le=8, description="down-samplings (unet generator)")
    ndf: int = Field(64, ge=1, le=512)
    d_layers: int = Field(3, ge=1, le=6, description="PatchGAN strided layers (3 -> 70x70 receptive field)")
    d_network: str = Field("patchgan", pattern=MEMBER_PATTERN, description="a discriminator network registered in "
                           "common/families.py (register_discriminator), built by every site: patchgan, pix2pix's "
                           "PatchGAN (d_layers, d_scales)")
    d_scales: int = Field(1, ge=1, le=3, description="PatchGANs per discriminator, each at half the resolution of "
                          "the one before (pix2pixHD's multi-scale discriminator: the coarse ones judge the layout); "
                          "1 (default): the papers' single PatchGAN")
    discriminator: Literal["per_modality", "joint"] = Field(
        "per_modality", description="per_modality: one PatchGAN per modality a site holds (the multi-modal "
        "method); joint: one PatchGAN over the label map and every held modality together (a private site then "
        "adds its noise to one network instead of one per modality)")
    init: Literal["pytorch", "normal"] = Field(
        "pytorch", description="initial weights of the generator and the discriminators: 'pytorch', each layer's "
        "own PyTorch default (convolutions Kaiming-uniform with a = sqrt(5), biases uniform in +-1/sqrt(fan_in); "
        "norm layers weight 1, bias 0), what every committed report used; 'normal', pix2pix's N(0, 0.02) for "
        "every convolution and linear weight, biases 0. Drawn from the seeded random generator either way")

    @model_validator(mode="after")
    def _check(self) -> "Image2DConfig":
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities repeat: {self.modalities}")
        if self.load_size is not None and self.load_size < self.image_size:
            raise ValueError(f"load_size {self.load_size} must be at least image_size {self.image_size}")
        if self.image_size % 4:
            raise ValueError(f"image_size {self.image_size} must be a multiple of 4")
        if self.generator == "unet" and self.image_size % (2**self.unet_depth):
            raise ValueError(f"image_size {self.image_size} must be a multiple of 2**unet_depth={2**self.unet_depth}")
        # The PatchGAN halves the map d_layers times, then a stride-1 layer with instance norm takes 1 pixel off
        # each side: that map must keep more than one pixel, or every site dies on its first batch.
        if self.image_size // 2 ** (self.d_scales - 1) // 2**self.d_layers < 3:
            coarsest = self.image_size // 2 ** (self.d_scales - 1)
            deepest = max((n for n in range(1, 7) if coarsest // 2**n >= 3), default=0)
            raise ValueError(f"d_layers {self.d_layers} is too deep for image_size {self.image_size}"
                             f"{f' at d_scales {self.d_scales}' if self.d_scales > 1 else ''}: the discriminator's "
                             f"last normalised map would be under 2x2 pixels; use image_size >= "
                             f"{3 * 2**self.d_layers * 2 ** (self.d_scales - 1)} or d_layers <= {deepest}")
        return self

    @property
    def stored_size(self) -> int:
        """Side of the label maps and images as the sites store and upload them."""
        return self.load_size or self.image_size


class MLP1DConfig(_Section):
    """Noise -> scalar, for the paper's 1-D Gaussian-mixture experiment."""

    noise_dim: int = Field(8, ge=1, le=256)
    hidden: int = Field(64, ge=1, le=4096)
    depth: int = Field(3, ge=1, le=16, description="hidden layers in G and D")


class ModelConfig(_Section):
    family: Literal["image2d", "mlp1d"] = "image2d"
    image2d: Image2DConfig = Field(default_factory=Image2DConfig)
    mlp1d: MLP1DConfig = Field(default_factory=MLP1DConfig)


class LossConfig(_Section):
    generator: Literal["vanilla", "kl"] = Field(
        "vanilla", description="adversarial part of L_G: vanilla (non-saturating BCE, the papers') or kl "
        "(f-GAN forward KL, -exp(logit); see site_agent/gradients.py)")
    lambda_l1: float = Field(0.0, ge=0, description="weight of |fake - real| in L_G (paired families only). The "
                             "papers use 100, but its gradient gives each real pixel away and private sites "
                             "(privacy.enabled, their default) refuse it: see docs/privacy.md, 'What the gradients reveal'")


class OptimizerConfig(_Section):
    name: Literal["adam", "sgd"] = Field("adam", description="adam (the method's); sgd makes exactness tests sharp")
    lr: float = Field(2e-4, gt=0, le=1.0)
    beta1: float = Field(0.5, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class ScheduleConfig(_Section):
    steps: int = Field(10_000, ge=1, description="generator steps to train")
    decay_start: float = Field(0.5, ge=0, le=1, description="fraction of steps after which lr decays linearly to 0")


class SiteFacingConfig(_Section):
    """What the server tells every site in Welcome."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    d_optim: OptimizerConfig = Field(default_factory=OptimizerConfig)
    d_steps: int = Field(1, ge=1, le=16, description="discriminator updates per received batch")
    diff_augment: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=list, description="differentiable augmentation of everything a site's discriminators see, "
        "real and synthetic (common/diff_augment.py; image2d): a small site's slices, seen hundreds of times, are "
        "then not memorised. Empty (default): none")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    seed: int = 0
    public_start: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the public "
                                     "discriminator weights every site starts from (set by the server from "
                                     "--init; the weights follow Welcome, proto PublicWeights)")

    @model_validator(mode="after")
    def _check(self) -> "SiteFacingConfig":
        if self.diff_augment and self.model.family != "image2d":
            raise ValueError(f"site.diff_augment transforms images; the {self.model.family} family has none")
        return self


class GuardConfig(_Section):
    """Bounds on what one site's answer can do to a step (central_server/guard.py)."""

    clip_factor: float = Field(4.0, ge=0, description="a row (one fake's gradient) whose RMS exceeds this many "
                               "times the step's reference (the lower median over sites of each site's median row "
                               "RMS) is scaled down to it; 0: no clipping")
    reject_factor: float = Field(20.0, ge=0, description="a site whose median row RMS exceeds this many times the "
                                 "reference is left out of the step and counted as rejected; 0: never")
    max_share: float = Field(0.5, gt=0, le=1, description="the largest weight one site can have in the combination "
                             "when others answered (uploading more label maps buys no more)")
    robust: Literal["none", "median"] = Field("none", description="'median': with three or more sites answering, "
                                              "G's step takes the coordinate-wise median of the sites' own gradients "
                                              "with respect to G's parameters (one backward pass per site), so one "
                                              "site cannot steer a parameter the others do not also push; 'none' "
                                              "(default): the weighted sum")
    window: int = Field(20, ge=1, description="steps over which rejections are counted")
    max_rejections: int = Field(5, ge=1, description="a site rejected this often within `window` steps is removed "
                                "from the run (it cannot rejoin until the server restarts)")

    @classmethod
    def off(cls) -> "GuardConfig":
        """No bounds: the papers' algorithm exactly (n_j / N weights), for runs whose sites are all trusted, such
        as the experiments that reproduce the committed reports."""
        return cls(clip_factor=0, reject_factor=0, max_share=1.0)


ANCHOR_DEFAULT = 100.0  # TrainConfig.anchor_weight with --init when unset


class TrainConfig(_Section):
    batch_size: int = Field(1, ge=1, le=4096, description="samples per site per step ('balance') or in all ('uniform')")
    sampling: Literal["balance", "uniform"] = "balance"
    min_sites: int = Field(1, ge=1, description="quorum: sites that must answer for a step to count")
    step_deadline_s: float = Field(60.0, gt=0, description="how long a step waits for sites' gradients")
    wire_dtype: WireDType = Field("q8", description="fakes and gradients on the wire: q8 (8 bits per value with a "
                                  "per-sample, per-channel offset and step; 4x fewer bytes than float32 at no "
                                  "measured Dice cost, docs/results/bandwidth-cpu), float16, bfloat16 or float32")
    wire_region: WireRegion = Field("auto", description="'brain': only pixels inside each label map's brain cross "
                                    "the wire (image2d; the generator's output and the sites' real samples are the "
                                    "background, -1, outside it); 'auto' (default): brain when the modalities are "
                                    "BraTS MRI (label maps carry the brain outline), else full; with q8, 12.8x "
                                    "fewer bytes than float32 at no measured Dice cost (docs/results/bandwidth-cpu)")

    def region_for(self, model: "ModelConfig") -> str:
        """The wire region this run uses: 'auto' resolved for the model."""
        if self.wire_region != "auto":
            return self.wire_region
        mri = model.family == "image2d" and set(model.image2d.modalities) <= set(BRATS_MODALITIES)
        return "brain" if mri else "full"
    flip: bool = Field(True, description="random left-right flips drawn by the server (image2d)")
    guard: GuardConfig = Field(default_factory=GuardConfig)
    statistics_weight: float = Field(1.0, ge=0, description="weight of the term that pulls the generator's "
                                     "per-site intensity statistics towards those the sites released (privacy."
                                     "statistics_share); each number weighted by 1 / (its noise variance + "
                                     "statistics_floor^2)")
    statistics_floor: float = Field(0.05, gt=0, description="the smallest standard deviation a released statistic "
                                    "is trusted to (so exact, noise-free numbers cannot dominate the loss)")
    adversarial_weight: float = Field(1.0, ge=0, description="weight of the sites' combined gradient in the "
                                      "generator's step; 0 keeps only the server's own terms (the statistics pull and "
                                      "the anchor): the sites then contribute only their released statistics")
    anchor_weight: float | None = Field(None, ge=0, description="with a public start (--init): weight of a "
                                        "server-side term anchor_weight x mean |G(x) - G_public(x)| inside the brain, "
                                        "which keeps the generator near the public generator's output on the same "
                                        "label maps (it uses no site data, so it costs no privacy budget); 0 turns it "
                                        "off; unset: ANCHOR_DEFAULT (100) with --init, 0 without (chosen on public "
                                        "data: `asyndgan experiment anchor-tuning`; without it the private "
                                        "fine-tunes measured collapsed)")

    def anchor_for(self, public_start: bool) -> float:
        """The anchor weight a run uses: the set value, else ANCHOR_DEFAULT with a public start and 0 without."""
        if self.anchor_weight is not None:
            return self.anchor_weight
        return ANCHOR_DEFAULT if public_start else 0.0
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an exponential moving average of the "
                                    "generator's weights with this decay per step (e.g. 0.999); checkpoints keep "
                                    "it, and it is the generator a run publishes (export, generate, samples from a "
                                    "checkpoint, the public start). Unset: off")
    ema_warmup: bool = Field(False, description="the moving average's decay at its n-th update is min(ema_decay, "
                             "(1 + n) / (10 + n)), TensorFlow's num_updates rule: the average forgets the untrained "
                             "start within a few hundred steps, where a constant decay keeps ema_decay^steps of it "
                             "(13.5% of the first step's weights after 2000 steps at 0.999)")
    pipeline: int = Field(0, ge=0, le=1, description="0 (default): lock-step; each gradient is applied to the "
                          "weights that made its fakes (exact). 1: the next step's fakes go out while the sites answer "
                          "the last ones, so a round trip hides behind the server's and the sites' compute; the "
                          "gradient of step t is applied at step t+1, through the weights that made its fakes "
                          "(docs/architecture.md, 'Asynchrony')")
    late_steps: int = Field(0, ge=0, le=8, description="0 (default): an answer that comes after its step stopped "
                            "waiting is dropped. k: it is still applied up to k steps late (weighted as "
                            "late_weight says), through the weights that made its fakes; a slow site then costs "
                            "the others no time and still contributes")
    late_weight: Literal["discount", "catch_up"] = Field("discount", description="a late answer's share, for "
                                                         "lateness s: 'discount' 1 / (1 + s) of its site's share "
                                                         "(a stale answer moves G less); 'catch_up' (1 + s) times "
                                                         "it (the steps its site was absent from, so a slow site "
                                                         "keeps its share of the objective over time)")
    straggler_wait: float | None = Field(None, gt=0, description="with late_steps: once the fastest site answered "
                                         "(a seconds after the fakes went out), the step waits at most "
                                         "straggler_wait x a seconds more for the others; the rest answer into a "
                                         "later step. Unset: wait up to step_deadline_s")
    seed: int = 0

    @model_validator(mode="after")
    def _asynchrony(self) -> "TrainConfig":
        if self.straggler_wait is not None and self.late_steps == 0:
            raise ValueError("train.straggler_wait needs train.late_steps > 0 (else a site that misses the wait "
                             "is dropped from every step it is slower than the others)")
        if (self.pipeline or self.late_steps) and self.guard.robust == "median":
            raise ValueError("train.guard.robust = 'median' needs every answer of a step to judge the same fakes: "
                             "it cannot be combined with train.pipeline or train.late_steps")
        return self


class LimitsConfig(_Section):
    """What one peer may hold on the server, so that silent or hostile peers cannot lock real sites out."""

    max_sessions: int = Field(64, ge=1, le=4096, description="training streams open at once (joining or "
                              "joined); more are refused with RESOURCE_EXHAUSTED")
    hello_timeout_s: float = Field(20.0, gt=0, description="a new stream must send Hello within this time")
    upload_idle_s: float = Field(120.0, gt=0, description="a joining site must send its next upload message "
                                 "(label-map chunk or Ready) within this time")
    max_label_maps: int = Field(1_000_000, ge=1, le=5_000_000, description="label maps one site may upload "
                                "(BraTS 2021 has about 100k tumour slices; each 256 px map is 64 KiB on disk)")
    status_threads: int = Field(8, ge=1, le=256, description="worker threads kept beyond max_sessions for "
                                "Status and health calls")


class ServerConfig(_Section):
    host: str = "0.0.0.0"
    certs: pathlib.Path = Field(pathlib.Path("certs"), description="ca.crt, server.crt, server.key, revoked.txt")
    insecure: bool = Field(False, description="plain text, no identities: for local tests only")
    allowed_sites: list[str] | None = Field(None, description="if set, only these site names may join")
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port")
    run_dir: pathlib.Path = pathlib.Path("runs/server")
    checkpoint_every: int = Field(500, ge=1)
    sample_every: int = Field(250, ge=1)
    exit_when_done: bool = Field(True, description="stop serving once the last step is taken")
    resume: Literal["never", "always", "auto"] = Field(
        "never", description="at start: 'always' continues from the newest usable checkpoint in run_dir (an error "
        "when there is none), 'auto' continues when there is one and starts a new run otherwise (containers with "
        "a restart policy), 'never' starts a new run")
    health_port: int | None = Field(None, ge=0, le=65535, description="also serve the gRPC health service "
                                    "alone, in plain text, on 127.0.0.1:PORT (container health checks that hold "
                                    "no certificate; nothing else is served there)")
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: torch's choice)")
    operators: list[str] = Field(default_factory=lambda: ["operator"], description="certificate names that "
                                 "may read Status even when allowed_sites does not list them")
    tensorboard: bool = Field(True, description="write TensorBoard event files to run_dir/tensorboard")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    init: pathlib.Path | None = Field(None, description="a pretraining folder (`asyndgan-server pretrain`): the "
                                      "generator starts from its weights, the sites' discriminators from its "
                                      "public discriminator")
    g_optim: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    site: SiteFacingConfig = Field(default_factory=SiteFacingConfig)


def _default_cache() -> pathlib.Path:
    import os

    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "asyndgan"


def _default_state() -> pathlib.Path:
    import os

    return pathlib.Path(os.environ.get("XDG_DATA_HOME", pathlib.Path.home() / ".local" / "share")) / "asyndgan"


class DataPrepConfig(_Section):
    """How a site turns its files into training slices (site-local; nothing here leaves the site)."""

    modalities: list[str] | None = Field(None, description="modalities to use (default: every one found)")
    min_tumour_pixels: int = Field(20, ge=0, description="axial slices with fewer tumour pixels are left out")
    healthy_ratio: float = Field(0.0, ge=0, le=4, description="healthy brain slices (no tumour) added per tumour "
                                 "slice of each case, evenly spaced among its slices whose brain covers at least "
                                 "half of its largest brain slice: the generator then also learns the slices a "
                                 "whole synthetic volume is mostly made of. 0 (default): tumour slices only, as in "
                                 "the papers")
    clip_percentiles: tuple[float, float] = Field((0.5, 99.5), description="per volume and modality, in the brain")
    on_bad_case: Literal["skip", "error"] = Field("skip", description="skip a bad case with a warning, or stop")
    cache_dir: pathlib.Path = Field(default_factory=_default_cache, description="prepared slices (memory-mapped)")
    workers: int = Field(1, ge=1, le=64, description="processes preparing cases in parallel on the first start")

    @model_validator(mode="after")
    def _check(self) -> "DataPrepConfig":
        lo, hi = self.clip_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"clip_percentiles {self.clip_percentiles} must satisfy 0 <= low < high <= 100")
        return self


class PrivacyConfig(_Section):
    """The site's own differential-privacy guarantee (site_agent/privacy.py). Site-local: the server can read
    what was spent (status) but cannot set or lower any of it.

    On: the site trains its discriminators with DP-SGD on real data it draws itself (Poisson sampling of its
    patients, with a secret random source), and returns only the adversarial gradient, which depends on its
    images through those discriminators alone. The unit protected is one patient (unit = "patient"): all of a
    patient's slices together, clipped as one. It refuses a server that asks for an L1 term (computed on real
    images directly)."""

    enabled: bool = Field(True, description="differential privacy for everything this site sends")
    unit: Literal["patient", "slice"] = Field(
        "patient", description="what one DP step's clipping bounds: 'patient' (default; all slices of one case "
        "folder, or of one patient in an image folder's patients.csv) or 'slice' (the older, weaker guarantee: "
        "a patient with k slices is covered only by group privacy, which is vacuous for tens of slices)")
    epsilon: float = Field(10.0, gt=0, le=100, description="total budget: the site stops answering before it "
                           "would spend more, across runs and restarts")
    delta: float = Field(1e-5, gt=0, lt=1, description="the guarantee's delta; at most 1/(10 x patients) "
                         "(unit patient) or 1/slices (unit slice)")
    noise_multiplier: float | None = Field(
        None, ge=0.3, le=500, description="DP-SGD noise std = this x max_grad_norm. Unset (default): the site "
        "computes it from its remaining budget, the sampling rate and the run's planned discriminator steps, so "
        "that the planned run ends near its budget; set: fixed, and the site stops when the budget is spent")
    max_grad_norm: float = Field(1.0, gt=0, description="clipping bound of one unit's (patient's) gradient")
    sample_rate: float = Field(0.5, gt=0, le=1, description="Poisson rate at which the site draws its units "
                               "(patients) for each discriminator step; 1 = every patient every step (full batch)")
    slices_per_patient: int = Field(8, ge=0, le=4096, description="a drawn patient contributes a random subset "
                                    "of this many of its slices (0: all of them)")
    augmentations: int = Field(1, ge=1, le=16, description="augmentation multiplicity: each drawn slice is seen "
                               "this many times with independent flips (and crops), averaged inside the patient's "
                               "clipped gradient, so the views cost no privacy")
    update_every: int = Field(1, ge=1, le=64, description="take a DP discriminator step every this many batches; "
                              "the batches between are answered by the discriminators as they are (post-processing "
                              "of a private model: no budget spent)")
    trainable: str = Field("auto", pattern=r"^(auto|all|none|last:[1-9][0-9]?)$", description="which discriminator "
                           "parameters learn under DP: 'all', 'last:K' (the last K layers with parameters of each "
                           "discriminator; the rest stays as initialised, e.g. from public weights; fewer noisy "
                           "parameters, less noise in all), 'none' (the public discriminators stay as they are: "
                           "the answers depend on no private data and cost nothing; only a statistics release "
                           "spends privacy; needs a public start), or 'auto' (default): last:1 when the run starts "
                           "from public weights, all otherwise")
    planned_spare: float = Field(0.05, ge=0, le=1, description="extra fraction of the planned steps the computed "
                                 "noise allows for (steps the server retries after a missed quorum)")
    statistics_share: float = Field(0.0, ge=0, le=1, description="share of epsilon spent on a one-shot release of "
                                    "per-modality intensity statistics of the brain and the tumour, which the server "
                                    "steers the generator towards (0: none); DP-SGD gets the rest (1: all of it, "
                                    "only with trainable=none)")
    statistics_clip: float = Field(2.0, gt=0, description="clipping bound of one patient's statistics vector")

    @model_validator(mode="after")
    def _budget_left_for_dp_sgd(self) -> "PrivacyConfig":
        if self.statistics_share >= 1 and self.trainable != "none":
            raise ValueError("privacy.statistics_share=1 leaves nothing for DP-SGD: set privacy.trainable=none (the "
                             "public discriminators stay frozen) or a smaller share")
        return self

class SiteConfig(_Section):
    site_id: str = Field(..., min_length=1, max_length=64, pattern=SITE_ID_PATTERN)
    server: str = Field("localhost:50051", pattern=r"^[^\s:]+(:\d+)$|^\[[0-9a-fA-F:]+\]:\d+$")
    certs: pathlib.Path | None = Field(None, description="the site's kit: ca.crt, site.crt, site.key "
                                       "(default certs/sites/<site_id>)")
    insecure: bool = Field(False, description="plain text, no identities: for local tests only")
    data: pathlib.Path
    device: str = "cpu"
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: torch's choice)")
    connect_timeout_s: float = Field(20.0, gt=0, description="how long to try reaching the server at start")
    upload_chunk_mb: float = Field(4.0, gt=0, le=32, description="label-map upload chunk size")
    reconnect_for_s: float = Field(6 * 3600, ge=0, description="after losing a joined server, keep retrying this long")
    backoff_s: tuple[float, float] = Field((1.0, 30.0), description="reconnect delay: first, and the cap it doubles to")
    busy_backoff_s: tuple[float, float] = Field((0.5, 4.0), description="retry delay when the server is full (its "
                                                "connections taken, e.g. by idle peers it will cut): first, and the "
                                                "cap it grows to by half each time; jittered, and short, so a site "
                                                "gets in soon after a place frees")
    state_dir: pathlib.Path = Field(default_factory=_default_state, description="where the site keeps its "
                                    "discriminator state between runs")
    save_every: int = Field(100, ge=1, description="save the discriminator state every this many batches")
    prep: DataPrepConfig = Field(default_factory=DataPrepConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)


M = TypeVar("M", bound=BaseModel)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); value parsed as JSON when it parses (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def read_config_file(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be parsed: {exc}") from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def load_config(
    model: type[M], file: pathlib.Path | None = None, overrides: dict[str, Any] | None = None
) -> M:
    tree: dict[str, Any] = read_config_file(file) if file is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc)}") from None


def validate_json(model: type[M], text: str) -> M:
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc)}") from None


def make_optimizer(params, cfg: OptimizerConfig):
    import torch

    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def linear_decay(step: int, schedule: ScheduleConfig) -> float:
    """Learning-rate factor: 1 until decay_start * steps, then linearly down to 0 at `steps` (pix2pix's policy)."""
    start = int(schedule.decay_start * schedule.steps)
    if step < start or schedule.steps <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (schedule.steps - start))
