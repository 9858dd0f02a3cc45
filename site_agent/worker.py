"""A site's training side without any transport: where a site answers a batch of synthetic images.

`SiteWorker` owns the site's opened dataset, its label maps (for the upload at join), its discriminators and
their optimiser (the SiteLearner), and the one method that turns a decoded SyntheticBatch into an ImageGradient:

    check the fakes' shape -> real samples for the batch's keys, with the batch's crop and flips
    -> discriminator step(s) and dL_G/dfake (site_agent/gradients.py) -> ImageGradient

The gRPC agent (site_agent/agent.py) and the in-process sites (simulation/local_sites.py) both answer through
this class, so the checks and the math cannot drift apart. Nothing here imports grpc or server code.
"""

from __future__ import annotations

import logging
import pathlib

import torch

from asyndgan.common import serde
from asyndgan.common.conditions import augment
from asyndgan.common.config import PrivacyConfig, SiteFacingConfig
from asyndgan.common.errors import DataError, ProtocolError
from asyndgan.common.families import get_family
from asyndgan.common.intensity_statistics import names as released_names
from asyndgan.site_agent import site_statistics, state
from asyndgan.formats.datasets import Patients, SiteDataset
from asyndgan.site_agent.gradients import SiteLearner
from asyndgan.site_agent.privacy import FrozenPublicLearner, PrivacyLedger, PrivateSiteLearner, noise_for_budget

log = logging.getLogger(__name__)


class SiteWorker:
    """One site's dataset and discriminators under the server's settings (from Welcome)."""

    def __init__(self, cfg: SiteFacingConfig, dataset: SiteDataset, device: str = "cpu",
                 privacy: PrivacyConfig | None = None, ledger_path: pathlib.Path | None = None,
                 site_id: str = "site", start_step: int = 0, initial: dict | None = None):
        """privacy: the site's own settings (None or disabled: the papers' algorithm, nothing protected);
        ledger_path: where spent privacy is kept (required with privacy on); start_step: the server's step at
        join (a private site plans its noise for the steps left); initial: public discriminator weights to start
        from (a state dict, already checked against the digest the server announced)."""
        self.cfg = cfg
        self.family = get_family(cfg.model.family)
        if dataset.family != self.family.name:
            raise DataError(f"the site holds {dataset.family} data but the server trains the {self.family.name} family")
        self.dataset = dataset
        # Read once: they are uploaded at join and indexed by key for every batch.
        self.label_maps: torch.Tensor | None = dataset.label_maps() if self.family.uploads_maps else None
        self.maps_digest = serde.maps_digest(self.label_maps)
        self.ledger: PrivacyLedger | None = None
        self.statistics: site_statistics.Statistics | None = None
        if privacy is not None and privacy.enabled:
            if ledger_path is None:
                raise ValueError("a private site needs a ledger path")
            self.ledger = PrivacyLedger(ledger_path, site_id, privacy)
            if privacy.statistics_share > 0 and self.label_maps is not None:
                # before DP-SGD's noise is computed: that noise is for what the release leaves of the budget
                self.statistics = self._release_statistics(
                    privacy, site_statistics.statistics_path(ledger_path.parent, site_id))
            if privacy.trainable == "none":
                self.learner: SiteLearner = FrozenPublicLearner(cfg, dataset.modalities, initial, device)
            else:
                self.learner = PrivateSiteLearner(cfg, dataset.modalities, dataset, self.label_maps, privacy,
                                                  self.ledger, device, start_step=start_step, initial=initial)
        else:
            self.learner = SiteLearner(cfg, dataset.modalities, device)
            if initial is not None:
                self.learner.load_public(initial)
        self.state_digest = state.settings_digest(cfg, dataset.modalities, private=self._dp_state_kind(privacy))

    def _release_statistics(self, privacy: PrivacyConfig, path: pathlib.Path) -> site_statistics.Statistics:
        """The site's one release (site_statistics.py): made, charged to the ledger and kept on the first join;
        read back on every later one (sending the same numbers again costs nothing)."""
        digest = f"{self.maps_digest}:{','.join(self.dataset.modalities)}:{privacy.unit}:{privacy.statistics_clip}"
        kept = site_statistics.load(path, digest)
        if kept is not None:
            return kept
        assert self.ledger is not None and self.label_maps is not None
        patients = self.dataset.patients() if privacy.unit == "patient" else Patients.one_each(len(self.dataset))
        members = patients.members()
        sigma = noise_for_budget(privacy.epsilon * privacy.statistics_share, privacy.delta, 1.0, 1)
        self.ledger.describe(statistics={"noise_multiplier": sigma, "clip": privacy.statistics_clip,
                                         "numbers": len(released_names(self.modalities)), "file": path.name})
        self.ledger.charge(sigma, 1.0, 1)  # recorded before anything is computed from the data
        released = site_statistics.release(self.dataset, self.label_maps, members, sigma, privacy.statistics_clip)
        site_statistics.save(path, released, digest)
        log.info("privacy: released %d intensity statistics (noise multiplier %.3g, clip %g; noise std %.3g..%.3g "
                 "on the released values); epsilon %.3g of %g spent", len(released.values), sigma,
                 privacy.statistics_clip, min(released.noise_std.values(), default=0.0),
                 max(released.noise_std.values(), default=0.0), self.ledger.epsilon_spent, privacy.epsilon)
        return released

    def _dp_state_kind(self, privacy: PrivacyConfig | None) -> str | None:
        """What the saved discriminator state must have been trained under: the DP unit, and the trained part
        when it is not the whole (its optimiser state covers only that part)."""
        if self.ledger is None or privacy is None:
            return None
        assert isinstance(self.learner, (PrivateSiteLearner, FrozenPublicLearner))  # a ledger means a private learner
        trainable = self.learner.trainable
        return privacy.unit if trainable == "all" else f"{privacy.unit}:{trainable}"

    @property
    def epsilon_spent(self) -> float | None:
        """Differential privacy spent so far by this site (all runs), or None when privacy is off."""
        return None if self.ledger is None else self.ledger.epsilon_spent

    def privacy_status(self, exhausted: bool = False) -> serde.PrivacyStatus:
        return serde.PrivacyStatus() if self.ledger is None else self.ledger.status(exhausted)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def modalities(self) -> list[str]:
        return list(self.dataset.modalities)

    @property
    def stored_size(self) -> int | None:
        """Side of the stored label maps, against which the server's crops are checked (None: no maps)."""
        return None if self.label_maps is None else int(self.label_maps.shape[-1])

    def expected_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the fakes for n samples: only the channels of the modalities this site holds."""
        channels = len(self.dataset.modalities) if self.family.modalities(self.cfg.model) else None
        return self.family.sample_shape(self.cfg.model, n, channels)

    def answer(self, batch: serde.SyntheticBatch) -> serde.ImageGradient:
        """The gradient of this site's L_G w.r.t. batch.fake [n, C, ...]; ProtocolError when the fakes do not
        fit this site's samples (the server must not be trusted to have sent the right shape)."""
        fake = batch.fake.float()
        n = int(batch.keys.numel())
        want = self.expected_shape(n)
        if tuple(fake.shape) != want:
            raise ProtocolError(f"server sent fakes of shape {tuple(fake.shape)} for {n} keys; this site expects "
                                f"{want} ({len(self.dataset.modalities)} modalities held)")
        real = augment(self.dataset.real(batch.keys), batch.aug)
        if real.shape != fake.shape:
            # e.g. a crop of another size than G's output: the fakes cannot be compared with the real samples.
            raise ProtocolError(f"server sent fakes of shape {tuple(fake.shape)} for real samples of shape "
                                f"{tuple(real.shape)} after its augmentation")
        if batch.region is not None:
            # Only the region crossed the wire and the server's fakes hold the background outside it: the real
            # samples get the same background there, or the discriminators would tell real from fake by the brain
            # rim outside the region, which the generator can never change (it gets no gradient there).
            real = torch.where(batch.region[:, None], real, torch.tensor(serde.BACKGROUND, dtype=real.dtype))
        maps = None if self.label_maps is None else augment(self.label_maps[batch.keys], batch.aug)
        grad, losses = self.learner.step(batch.step, maps, real, fake)
        return serde.ImageGradient(step=batch.step, round=batch.round, gradient=grad, losses=losses,
                                   privacy=self.privacy_status())

    # ---- state kept at the site between runs (site_agent/state.py) ------------------------------------------
    def save_state(self, path: pathlib.Path, step: int) -> None:
        state.save(path, self.learner, self.state_digest, step)

    def restore_state(self, path: pathlib.Path) -> int | None:
        """Load saved discriminator state trained under the same settings; the step it was saved at, or None."""
        return state.restore(path, self.learner, self.state_digest)
