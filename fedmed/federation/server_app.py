"""The ServerApp: FedAvg over the hospitals, centralised evaluation each round, and
the run directory. The same object runs in simulation and in a real deployment."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedmed.audit.server_side import ServerLedger
from fedmed.config import FedmedConfig, from_flat
from fedmed.data.sites import global_test, num_classes
from fedmed import heterogeneity
from fedmed.errors import FedmedError
from fedmed.federation import checkpoint
from fedmed.federation.records import NODES_KEY, RESUME_KEY, config_record
from fedmed.federation.rounds import run_rounds
from fedmed.federation.strategy import build_strategy
from fedmed.models import build_model, norm_keys
from fedmed.outputs import RunDirectory
from fedmed.privacy import report as privacy_report
from fedmed.privacy.client_level import ClientLevelDP
from fedmed.progress import RoundReporter
from fedmed.reporting import round_record, strip_prefix, summary
from fedmed.training.local import evaluate
from fedmed.training.metrics import from_confusion

app = ServerApp()
STRATEGY_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedyogi": "FedYogi", "fedbn": "FedBN"}


@app.main()
def main(grid: Grid, context: Context) -> None:
    values = dict(context.run_config)
    resume = str(values.pop(RESUME_KEY, "") or "")
    nodes = {int(k): v for k, v in json.loads(str(values.pop(NODES_KEY, "") or "{}")).items()}
    run(grid, from_flat(values), Path(resume) if resume else None, nodes)


def run(grid: Grid, cfg: FedmedConfig, resume: Path | None = None, nodes: dict[int, str] | None = None) -> None:
    """The whole run; with `resume` (a run directory), from the round after its last
    checkpoint. `nodes`: hospital names by node id, where the operator knows them."""
    started = time.time()
    client_dp = ClientLevelDP(cfg) if cfg.privacy.mode == "client" else None  # checks delta before anything is written
    previous = checkpoint.load(resume) if resume else None
    if previous is not None and previous.config_sha256 != cfg.digest():
        raise FedmedError(f"the settings differ from those {resume} started with: resume with the same config, or start a new run")
    out = RunDirectory.reopen(resume, previous.round) if resume and previous else RunDirectory.create(cfg)
    test_set = global_test(cfg)
    model = build_model(cfg.model, num_classes(cfg), seed=cfg.seed)
    rounds = cfg.federation.rounds
    n = cfg.data.hospitals
    aggregation = "DP-FedAvg" if client_dp else STRATEGY_NAMES[cfg.federation.strategy]
    title = f"fedmed: {STRATEGY_NAMES[cfg.federation.strategy]} over {cfg.data.hospitals} hospitals, {rounds} rounds -> {out.path}"
    reporter = RoundReporter(rounds, title + (f" (resumed after round {previous.round})" if previous else ""))
    ledger = ServerLedger(out.path, cfg.output.save_updates, previous.ledger_run if previous else "")
    initial = ArrayRecord(model.state_dict())
    minimum = cfg.federation.min_hospitals or n
    strategy = build_strategy(
        cfg.federation,
        norm_keys(model),
        client_dp,
        fraction_train=cfg.federation.fraction_train,
        fraction_evaluate=cfg.federation.fraction_evaluate,
        min_train_nodes=min(minimum, max(1, round(cfg.federation.fraction_train * n))),
        min_evaluate_nodes=min(minimum, max(1, round(cfg.federation.fraction_evaluate * n))) if cfg.federation.fraction_evaluate else 0,
        min_available_nodes=minimum,
        ledger=ledger,
        hospitals=n,
    )
    last_test: dict = {}
    label_counts: dict[str, list[int]] = {}  # hospital -> training labels, as it reports them
    if previous is None:
        ledger.start(cfg, model, initial, aggregation)
    else:
        ledger.resume(previous.round, aggregation)
        strategy.restore(previous.strategy)
        if client_dp is not None and previous.client_dp:
            client_dp.restore(previous.client_dp)
        last_test, label_counts = previous.server["last_test"], previous.server["label_counts"]
        initial = ArrayRecord({k: Array(v) for k, v in previous.arrays.items()})
    strategy.names.update(nodes or {})  # the operator's enrolment now, over the checkpoint's

    def note_hospitals(server_round: int) -> None:
        """(Re)write the heterogeneity report when hospitals report for the first time."""
        new = {
            site: phases["train"]["label-counts"]
            for site, phases in strategy.per_site.get(server_round, {}).items()
            if "train" in phases and site not in label_counts
        }
        if new:
            label_counts.update(new)
            rep = heterogeneity.report(label_counts, cfg.data.class_names())
            heterogeneity.write(out.path, rep)
            if server_round == 1:
                heterogeneity.print_table(reporter.console, rep)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> None:
        """The server's test of the round's model, and the round's record."""
        nonlocal last_test
        declined = {site: why["reason"] for site, why in sorted(strategy.declined.items()) if why["round"] == server_round}
        for site, reason in declined.items():
            reporter.console.print(f"round {server_round}: {site} declined to train: {reason}")
        for site in strategy.dropped.get(server_round, []):
            reporter.console.print(f"round {server_round}: {site} dropped out (no update); the round goes on without it")
        if strategy.all_declined:  # every hospital has spent its budget: the model no longer changes
            return
        if not any("train" in site for site in strategy.per_site.get(server_round, {}).values()):
            if not strategy.failures.get(server_round) and declined:
                reporter.console.print(f"round {server_round}: every hospital asked declined; the model stays as it is")
                return
            reasons = "; ".join(sorted(set(strategy.failures.get(server_round, ["no reply in time"]))))
            raise FedmedError(f"round {server_round}: no hospital returned an update ({reasons})")
        note_hospitals(server_round)
        model.load_state_dict(arrays.to_torch_state_dict())
        last_test = evaluate(model, test_set.x, test_set.y, cfg.train.device)
        hospitals = {
            site: {phase: strip_prefix(m) for phase, m in phases.items()}
            for site, phases in sorted(strategy.per_site.get(server_round, {}).items())
        }
        pooled_eval = strategy.federated_eval.get(server_round)
        federated = from_confusion(np.asarray(pooled_eval["eval-confusion"]).reshape(num_classes(cfg), num_classes(cfg))) if pooled_eval else {}
        took, elapsed = reporter.round_done(server_round, last_test, f"  hospitals {len(hospitals)}/{n}")
        out.append_round(
            round_record(
                server_round, took, elapsed, last_test, hospitals, federated_eval=federated,
                failures=len(strategy.failures.get(server_round, [])),
                dropped=sorted(strategy.dropped.get(server_round, [])),
                declined=sorted(declined),
                declined_reasons=declined,
                **({"privacy": client_dp.metrics()} if client_dp else {}),
            )
        )

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        evaluate_global(server_round, arrays)
        checkpoint.save(out.path, checkpoint.Checkpoint(
            round=server_round,
            config_sha256=cfg.digest(),
            arrays={k: v.numpy() for k, v in arrays.items()},
            strategy=strategy.state(),
            ledger_run=ledger.run_id,
            client_dp=client_dp.state() if client_dp else None,
            server={"last_test": last_test, "label_counts": label_counts},
        ))

    first = previous.round + 1 if previous else 1
    config = config_record(cfg)
    final_arrays = run_rounds(strategy, grid, initial, range(first, rounds + 1), cfg.federation.round_timeout, config, after_round)
    final = strategy.per_site.get(rounds, {})
    per_hospital = {
        site: {"accuracy": phases["eval"]["eval-accuracy"], "macro_f1": phases["eval"]["eval-macro-f1"]}
        for site, phases in sorted(final.items())
        if "eval" in phases
    }
    if cfg.output.save_model:
        out.save_model(final_arrays.to_torch_state_dict())
    ledger.end(final_arrays, rounds, last_test.get("accuracy"))
    spent = privacy_report.table(cfg, strategy.per_site, strategy.declined, client_dp.metrics() if client_dp else None)
    privacy_report.print_table(reporter.console, spent)
    out.write_summary(summary(cfg, last_test, per_hospital, time.time() - started, **({"privacy": spent} if spent else {})))
    reporter.console.print(f"run directory: {out.path}")

