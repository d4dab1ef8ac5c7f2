"""Data: with a hospital's data secret, which it may reveal to an auditor it chooses,
check that its ledger's commitment is to the data it says it trained on.

What each party can learn: the server and anyone holding the ledgers see only an HMAC
under a secret that never leaves the hospital, so a copy of a candidate dataset confirms
nothing. An auditor given the secret and the data can confirm the commitment; given the
secret alone, only test data it already holds."""

from __future__ import annotations

from pathlib import Path

from fedmed.audit.consistency import run_config
from fedmed.audit.evidence import AuditInputError, Evidence, Finding
from fedmed.config import PATH_KEYS, REDACTED, FedmedConfig, from_flat, load
from fedmed.errors import FedmedError
from fedmed.federation.client_app import hospital_data
from fedmed.ledger.digests import data_commitment
from fedmed.ledger.keys import read_data_secret

SUFFIX = ".data-secret"


def commitment(evidence: Evidence, secret_path: Path, data: Path | None) -> list[Finding]:
    """`secret_path`: the hospital's `NAME.data-secret`; `data`: its site config (a real
    hospital) or the simulation's config; by default the run directory's own config."""
    if not secret_path.name.endswith(SUFFIX):
        raise AuditInputError(f"{secret_path} is not a data secret: pass the hospital's keys/NAME{SUFFIX}")
    hospital = secret_path.name.removesuffix(SUFFIX)
    party = evidence.parties.get(hospital)
    if party is None:
        raise AuditInputError(f"no ledger of {hospital} among the inputs: pass its ledger with its data secret")
    starts = party.events("run-start")
    if not starts:
        return [Finding("data", party.name, "no run-start record, so no data commitment to check")]
    index, start = starts[0]
    try:
        secret = read_data_secret(secret_path)
        cfg, own, source = _data_settings(evidence, data, hospital)
        site, _ = hospital_data(cfg, own, _simulated_index(hospital) if own is None else 0)
    except OSError as exc:
        raise AuditInputError(f"cannot read {exc.filename or secret_path}: {exc.strerror}") from None
    except FedmedError as exc:
        raise AuditInputError(f"cannot check {hospital}'s data commitment: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - data that cannot be loaded is unusable input, not a crash
        raise AuditInputError(f"cannot load {hospital}'s data to check its commitment ({type(exc).__name__}: {exc})") from None
    if data_commitment(secret, site.train.x, site.train.y, site.test.x, site.test.y) != start.get("payload", {}).get("data_commitment"):
        return [Finding("data", party.where(index), f"the data commitment does not match {hospital}'s data in {source} under the given secret: it trained on other data, or the secret or data are not its own")]
    evidence.notes.append(f"{hospital}'s data commitment matches its data in {source} under the secret it revealed")
    return []


def _data_settings(evidence: Evidence, data: Path | None, hospital: str) -> tuple[FedmedConfig, FedmedConfig | None, str]:
    """(settings, a real hospital's own site config or None, what the data was read from)."""
    if data is not None:
        cfg = load(data)
        if cfg.site.name:
            if cfg.site.name != hospital:
                raise FedmedError(f"{data} is {cfg.site.name}'s site config, not {hospital}'s")
            return cfg, cfg, str(data)
        return cfg, None, str(data)
    cfg = run_config(evidence)
    if cfg is None:
        raise FedmedError("pass --data: the hospital's site config, or the simulation's config")
    flat = cfg.flat()
    if flat["data.path"] == REDACTED:
        raise FedmedError("the run trained on data on disk, whose path a run directory does not record: pass --data with the simulation's config")
    defaults = FedmedConfig().flat()
    return from_flat({**flat, **{k: defaults[k] for k in PATH_KEYS if flat[k] == REDACTED}}), None, "the run's config"


def _simulated_index(hospital: str) -> int:
    try:
        return int(hospital.rsplit("-", 1)[1]) - 1
    except (IndexError, ValueError):
        raise FedmedError(f"{hospital} is not a simulated hospital's name (hospital-NN): pass --data with its site config") from None
