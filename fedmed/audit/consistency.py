"""Consistency: the parties' records agree with each other and with the run's files:
the same config and architecture everywhere, the model each hospital received is the one
the server sent, each update the server recorded is the one the hospital sent, each
round's global model follows from the last, and (with saved updates) each aggregate
recomputes from the updates."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from fedmed.audit.evidence import Evidence, Finding, PartyLedger
from fedmed.config import FedmedConfig, load
from fedmed.errors import FedmedError
from fedmed.federation import wire
from fedmed.federation.aggregation import Saved, replay
from fedmed.ledger.digests import arrays_digest, state_digest
from fedmed.ledger.server import CONTROL, SENT, STATE
from fedmed.run.directory import RunDirectory
from fedmed.run.record import strip_prefix

NOT_RECOMPUTABLE = "DP-FedAvg"  # its noise is drawn at the server and never saved
STATELESS = ("fedavg", "fedprox", "fedbn", "krum", "multikrum", "bulyan", "median", "trimmed_mean")  # no state carried between steps
State = dict[str, dict[str, np.ndarray]]  # an aggregation's server state (`aggregation.STATE`)


def _by_round(party: PartyLedger, event: str) -> dict[int, tuple[int, dict[str, Any]]]:
    return {int(r["round"]): (i, r) for i, r in party.events(event)}


def run_config(evidence: Evidence) -> FedmedConfig | None:
    path = evidence.run_dir / RunDirectory.CONFIG if evidence.run_dir else None
    if path is None or not path.exists():
        return None
    try:
        return load(path)
    except FedmedError:
        return None


def consistency(evidence: Evidence) -> list[Finding]:
    out: list[Finding] = []
    server = evidence.server
    starts = server.events("run-start")
    if not starts:
        return [Finding("consistency", server.name, "no run-start record")]
    start = starts[0][1]["payload"]
    out += _same_run(evidence, start)
    out += _rounds(evidence, start)
    out += _hospital_side(evidence, start)
    out += _reported_metrics(evidence)
    return out


def _reported_metrics(evidence: Evidence) -> list[Finding]:
    """The hospitals' figures in metrics.jsonl (their epsilon among them), and the final
    accuracy in summary.json, are those the ledgers recorded."""
    if evidence.run_dir is None or not (evidence.run_dir / RunDirectory.METRICS).exists():
        return []
    logged = {
        (name, int(r["round"]), phase): strip_prefix(r["payload"].get("metrics", {}))
        for name, h in evidence.hospitals.items()
        for phase, event in (("train", "train"), ("eval", "evaluate"))
        for _, r in h.events(event)
    }
    out = []
    lines = (evidence.run_dir / RunDirectory.METRICS).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            out.append(Finding("consistency", f"{RunDirectory.METRICS} line {number}", "not valid JSON"))
            continue
        for name, phases in (record.get("hospitals") or {}).items():
            for phase, reported in (phases or {}).items():
                mine = logged.get((name, record.get("round"), phase))
                if mine is None:
                    continue
                changed = sorted(k for k, v in reported.items() if k in mine and mine[k] != v and not (v is None and mine[k] is None))
                if changed:
                    out.append(Finding("consistency", f"{RunDirectory.METRICS} line {number}", f"{name}'s {phase} figures in round {record.get('round')} ({', '.join(changed)}) are not those its ledger recorded"))
    ends = evidence.server.events("run-end")
    summary = evidence.run_dir / RunDirectory.SUMMARY
    if ends and summary.exists():
        claimed = (json.loads(summary.read_text(encoding="utf-8")).get("test") or {}).get("accuracy")
        if claimed != ends[-1][1]["payload"].get("test_accuracy"):
            out.append(Finding("consistency", RunDirectory.SUMMARY, f"reports test accuracy {claimed}; the server's ledger recorded {ends[-1][1]['payload'].get('test_accuracy')}"))
    return out


def _hospital_side(evidence: Evidence, start: dict[str, Any]) -> list[Finding]:
    """From the hospitals' side: each round trained in the privacy mode the run set, and
    each update sent was received (listed by the server, or counted among its failures)."""
    out = []
    listed = {
        (int(r["round"]), e.get("hospital")): r["payload"].get("failures", 0)
        for _, r in evidence.server.events("train-round")
        for e in r["payload"].get("participants", [])
    }
    failures = {int(r["round"]): r["payload"].get("failures", 0) for _, r in evidence.server.events("train-round")}
    cut = {int(r["payload"].get("after_round", -1)) + 1 for _, r in evidence.server.events("interrupted")}  # rounds a signal cut short
    for name, hospital in evidence.hospitals.items():
        for index, record in hospital.events("train"):
            rnd, mode = int(record["round"]), record["payload"].get("privacy", {}).get("mode")
            if mode != start.get("privacy_mode"):
                out.append(Finding("consistency", hospital.where(index), f"trained with privacy mode {mode!r}; the run's is {start.get('privacy_mode')!r}"))
            if (rnd, name) in listed or failures.get(rnd):
                continue
            if rnd in cut:
                evidence.notes.append(f"{hospital.where(index)}: trained in round {rnd}, which an interruption of the run cut short: its update was never aggregated")
            else:
                out.append(Finding("consistency", hospital.where(index), "sent an update the server's ledger neither aggregated nor counted as failed: it was dropped unrecorded"))
    return out


def _same_run(evidence: Evidence, start: dict[str, Any]) -> list[Finding]:
    out = []
    for hospital in evidence.hospitals.values():
        mine = hospital.events("run-start")
        if not mine:
            out.append(Finding("consistency", hospital.name, "no run-start record"))
            continue
        index, record = mine[0]
        # A real node is sent fewer settings than the server holds: it records their digest.
        sent = start.get("hospital_config_sha256", start.get("config_sha256"))  # ledgers before fedmed sent real nodes fewer settings
        expected = {"config_sha256": sent, "architecture_sha256": start.get("architecture_sha256"), "run": start.get("run")}
        for key, theirs in expected.items():
            if record["payload"].get(key) != theirs:
                out.append(Finding("consistency", hospital.where(index), f"{key} differs from the server's: {record['payload'].get(key)} vs {theirs}"))
    cfg = run_config(evidence)
    if evidence.run_dir is not None:
        if cfg is None:
            out.append(Finding("consistency", RunDirectory.CONFIG, "missing or not a valid fedmed config"))
        elif cfg.digest() != start.get("config_sha256"):
            out.append(Finding("consistency", RunDirectory.CONFIG, "its settings differ from those the server's ledger recorded at run start (config_sha256)"))
    return out


def _not_asked(where: str, rnd: Any, payload: dict[str, Any]) -> list[Finding]:
    """A hospital recorded in a round it was not asked to (the ledger's `asked`, where it has one)."""
    if not isinstance(payload.get("asked"), list):
        return []
    named = {e.get("hospital") for key in ("participants", "declined") for e in payload.get(key, []) if isinstance(e, dict)}
    extra = sorted(str(site) for site in named - set(payload["asked"]))
    return [Finding("consistency", where, f"records {extra[0]} in round {rnd}, but not among the hospitals it asked")] if extra else []


def _rounds(evidence: Evidence, start: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    cfg = run_config(evidence)  # the run's settings, read once: every round's replay uses them
    server = evidence.server
    hospital_train = {n: _by_round(h, "train") for n, h in evidence.hospitals.items()}
    hospital_declined = {n: _by_round(h, "declined") for n, h in evidence.hospitals.items()}
    hospital_eval = {n: _by_round(h, "evaluate") for n, h in evidence.hospitals.items()}
    current = start.get("initial_model_sha256")
    model_after = {0: current}  # the global model after each round, for a resumed server to pick up
    state: State | None = {}  # the aggregation's state the next step starts from (None: not known)
    state_after: dict[int, State | None] = {0: state}
    for index, record in enumerate(server.file.records):
        if record is None:
            continue
        where, payload, rnd = server.where(index), record.get("payload", {}), record.get("round")
        event = record.get("event")
        if event == "resume":  # back to the checkpoint's model: what a crash cut short is redone
            current = model_after.get(payload.get("after_round"), current)
            state = state_after.get(payload.get("after_round"))
            continue
        if event in ("train-round", "evaluate-round") and payload.get("sent_sha256") != current:
            out.append(Finding("consistency", where, f"sent model {str(payload.get('sent_sha256'))[:12]}... is not the current global model {str(current)[:12]}..."))
        if event in ("train-round", "evaluate-round"):
            out += _not_asked(where, rnd, payload)
        if event == "train-round":
            for entry in payload.get("participants", []):
                out += _train_entry(evidence, hospital_train, where, rnd, payload, entry)
            for entry in payload.get("declined", []):
                if entry.get("hospital") in evidence.parties and rnd not in hospital_declined.get(entry["hospital"], {}):
                    out.append(Finding("consistency", where, f"records that {entry['hospital']} declined, but its ledger has no refusal in round {rnd}"))
            if payload.get("participants"):
                found, state = _aggregate(evidence, cfg, start, where, rnd, payload, state)
                out += found
            if payload.get("new_global_sha256"):
                current = payload["new_global_sha256"]
            model_after[rnd], state_after[rnd] = current, state
        elif event == "evaluate-round":
            for entry in payload.get("participants", []):
                mine = hospital_eval.get(entry.get("hospital"), {}).get(rnd)
                if entry.get("hospital") in evidence.parties and mine is None:
                    out.append(Finding("consistency", where, f"records {entry['hospital']}'s evaluation, but its ledger has none in round {rnd}"))
                elif mine is not None and mine[1]["payload"].get("received_sha256") != payload.get("sent_sha256"):
                    out.append(Finding("consistency", evidence.parties[entry["hospital"]].where(mine[0]), "evaluated a model other than the one the server sent"))
        elif event == "run-end":
            if payload.get("final_model_sha256") != current:
                out.append(Finding("consistency", where, "the final model is not the last round's global model"))
            model = evidence.run_dir / RunDirectory.MODEL if evidence.run_dir else None
            if model is not None and model.exists() and arrays_digest(torch.load(model, weights_only=True)) != payload.get("final_model_sha256"):
                out.append(Finding("consistency", RunDirectory.MODEL, "is not the final model the server's ledger recorded (final_model_sha256)"))
    return out


def _train_entry(evidence: Evidence, hospital_train: dict, where: str, rnd: int, payload: dict, entry: dict) -> list[Finding]:
    name = entry.get("hospital")
    if name not in evidence.parties:
        return []  # reported by the checkpoint check
    mine = hospital_train[name].get(rnd)
    if mine is None:
        return [Finding("consistency", where, f"aggregates an update from {name}, but {name}'s ledger has no training in round {rnd}")]
    index, record = mine
    theirs, hwhere = record["payload"], evidence.parties[name].where(index)
    out = []
    if theirs.get("received_sha256") != payload.get("sent_sha256"):
        out.append(Finding("consistency", hwhere, "trained from a model other than the one the server recorded sending"))
    if theirs.get("update_sha256") != entry.get("update_sha256"):
        out.append(Finding("consistency", where, f"the update it recorded from {name} is not the one {name} recorded sending ({hwhere})"))
    if theirs.get("control_sha256") != entry.get("control_sha256"):
        out.append(Finding("consistency", where, f"the control variate change it recorded from {name} is not the one {name} recorded sending ({hwhere})"))
    if theirs.get("metrics", {}).get(wire.WEIGHT) != entry.get("weight"):
        out.append(Finding("consistency", where, f"weights {name}'s update by {entry.get('weight')}, but {name} reported {theirs.get('metrics', {}).get(wire.WEIGHT)} examples"))
    return out


def _aggregate(
    evidence: Evidence, cfg: FedmedConfig | None, start: dict, where: str, rnd: int, payload: dict, carried: State | None
) -> tuple[list[Finding], State | None]:
    """Replay the round's aggregation from the saved updates, as the server ran it
    (`aggregation.replay`: the same strategy, from the server state saved before the
    step, which must be the state the previous step left), and compare the new global
    model (and, for Krum, Multi-Krum and Bulyan, the updates kept) with the ledger's.
    Returns the findings and the state after the step (None where it is not known)."""
    if not start.get("updates_saved") or evidence.run_dir is None or cfg is None or start.get("aggregation") == NOT_RECOMPUTABLE:
        return [], None
    path = evidence.run_dir.updates_of(rnd)
    shown = f"{RunDirectory.UPDATES}/{path.name}"
    if not path.exists():
        return [Finding("consistency", where, f"the server saved updates, but {shown} is missing")], None
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, value in arrays.items():
        owner, _, key = name.partition("/")
        if owner in (CONTROL, STATE):  # @control/<hospital>/<key>, @state/<attribute>/<key>
            inner, _, key = key.partition("/")
            owner = f"{owner}/{inner}"
        groups.setdefault(owner, {})[key] = value
    sent = groups.pop(SENT, {})
    if arrays_digest(sent) != payload.get("sent_sha256"):
        return [Finding("consistency", shown, "the saved model sent is not the one the ledger recorded")], None
    before = {name.partition("/")[2]: values for name, values in groups.items() if name.startswith(f"{STATE}/")}
    if "state_sha256" not in payload:  # an older fedmed's run: it kept no server state to replay from
        if cfg.federation.strategy not in STATELESS:
            evidence.notes.append(f"{where}: the server kept no optimiser state with its updates (an older fedmed): {start.get('aggregation')}'s step is not recomputed")
            return [], None
    elif state_digest(before) != payload["state_sha256"]:
        return [Finding("consistency", shown, "the saved server state before this round's step is not the one the ledger recorded")], None
    if carried is not None and state_digest(before) != state_digest(carried):
        return [Finding("consistency", shown, "the server state saved before this round's step is not the one the previous step left")], None
    updates = []
    for entry in payload.get("participants", []):
        site = entry["hospital"]
        update, control = groups.get(site), groups.get(f"{CONTROL}/{site}", {})
        if update is None or arrays_digest(update) != entry.get("update_sha256"):
            return [Finding("consistency", shown, f"the saved update of {site} is missing or not the one the ledger recorded")], None
        if entry.get("control_sha256") and arrays_digest(control) != entry["control_sha256"]:
            return [Finding("consistency", shown, f"the saved control variate change of {site} is not the one the ledger recorded")], None
        updates.append(Saved(site, update, int(entry["weight"]), control))
    replayed = replay(cfg, rnd, sent, updates, before)
    out = []
    if replayed.selected is not None and replayed.selected != payload.get("selected"):
        out.append(Finding("consistency", where, f"records the updates of {payload.get('selected')} as kept, but {start.get('aggregation')} keeps {replayed.selected}"))
    new = {k: (replayed.new[k] if k in replayed.new else sent[k]) for k in sent} if replayed.new is not None else None  # FedBN, FedPer: kept layers as sent
    if (arrays_digest(new) if new is not None else None) != payload.get("new_global_sha256"):
        out.append(Finding("consistency", where, f"the new global model does not follow from the recorded updates ({start.get('aggregation')} replayed from {shown})"))
    return out, replayed.state


