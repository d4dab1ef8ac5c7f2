"""The ServerApp: the federation's rounds, the server's own evaluation of each round's
model, and the run directory. The same object runs in simulation and in a real deployment."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedmed.config import FedmedConfig, from_flat
from fedmed.data.demo import hospital_name
from fedmed.data.sites import describe, global_test
from fedmed.errors import FedmedError
from fedmed.federation import attack, checkpoint, sampling, wire
from fedmed.federation.aggregation import NAMES
from fedmed.federation.strategy import Recording, build_strategy
from fedmed.ledger.keys import KeyStore, default_key_store
from fedmed.ledger.server import ServerLedger
from fedmed.models import build_model, kept_at_hospitals
from fedmed.privacy import report as privacy_report
from fedmed.privacy.client_level import ClientLevelDP
from fedmed.run import heterogeneity, interrupt
from fedmed.run.deployed import RUN_FILE, DeployedRun
from fedmed.run.directory import RunDirectory
from fedmed.run.progress import RoundReporter, print_classes
from fedmed.run.record import NO_REPLY, RoundOutcome, round_record, summary
from fedmed.run.tensorboard import Scalars
from fedmed.training.loop import evaluate, predict
from fedmed.training.metrics import from_confusion

app = ServerApp()
REPLY_POLL_S = (0.2, 1.0)  # how soon it looks for replies again: at first, and at most (backing off while none come)
RESUME_RUN = "FEDMED_RESUME_RUN"  # a simulation resumed (`fedmed simulate --resume`): the run directory it continues
# What to do when a federation started by Flower (`flwr run`) has no SuperNode: `fedmed simulate` starts its own.
NO_NODES = 'run a simulation with SuperNodes (`flwr run . --federation-config "num-supernodes=2"`), or start `flower-supernode` processes against this SuperLink'


@app.main()
def main(grid: Grid, context: Context) -> None:
    deployed = os.environ.get(RUN_FILE)
    if not deployed:  # a simulation: the run config is the whole config
        resume = os.environ.get(RESUME_RUN)
        run(grid, from_flat(dict(context.run_config)), Path(resume) if resume else None)
        return
    job = DeployedRun.load(Path(deployed))
    run(grid, from_flat(job.config), Path(job.resume_from) if job.resume_from else None, job.nodes, KeyStore(Path(job.key_store)))


def run(
    grid: Grid, cfg: FedmedConfig, resume: Path | None = None, nodes: dict[int, str] | None = None, keys: KeyStore | None = None
) -> None:
    """The whole run; with `resume` (a run directory), from the round after its last
    checkpoint. `nodes`: hospital names by node id, where the operator knows them.
    `keys`: where the server's signing key lives (a deployed server's state folder);
    a simulation's parties all sign with keys from the user's key store."""
    started = time.time()
    client_dp = ClientLevelDP(cfg) if cfg.privacy.mode == "client" else None  # checks delta before anything is written
    store = keys or KeyStore(default_key_store())
    previous = checkpoint.load(RunDirectory(resume), store) if resume else None
    if previous is not None and previous.config_sha256 != cfg.digest():
        raise FedmedError(f"the settings differ from those {resume} started with: resume with the same config, or start a new run")
    # A checkpoint's round may still await its evaluations (its record unwritten): records
    # written after it, by a round the crash cut short, are dropped.
    waiting = previous.server.get("pending") if previous else None
    out = RunDirectory.reopen(resume, waiting["round"] - 1 if waiting else previous.round) if resume and previous else RunDirectory.create(cfg)
    scalars = Scalars(out) if cfg.output.tensorboard else None  # closed where the run returns
    out.on_round = scalars.round if scalars else None
    test_set = global_test(cfg)
    model = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    rounds, n = cfg.federation.rounds, cfg.data.hospitals
    aggregation = "DP-FedAvg" if client_dp else NAMES[cfg.federation.strategy]
    title = f"fedmed: {NAMES[cfg.federation.strategy]} over {n} hospitals, {rounds} rounds -> {out.path}"
    reporter = RoundReporter(rounds, title + (f" (resumed after round {previous.round})" if previous else ""))
    ledger = ServerLedger(out, cfg.output.save_updates, store, previous.ledger_run if previous else "")
    strategy = _strategy(cfg, kept_at_hospitals(cfg, model), client_dp, ledger)

    config = wire.config_record(cfg, deployed=bool(nodes))
    arrays = ArrayRecord(model.state_dict())
    last_test: dict = {}
    label_counts: dict[str, list[int]] = {}  # hospital -> training labels, as it reports them
    heatmap_stale = False  # the report has grown since its heatmap was drawn (round 1's)
    if previous is None:
        ledger.start(cfg, model, arrays, aggregation, wire.config_from_record(config).digest())
    else:
        ledger.resume(previous.round, aggregation)
        strategy.restore(previous.strategy)
        if client_dp is not None and previous.client_dp:
            client_dp.restore(previous.client_dp)
        last_test, label_counts = previous.server["last_test"], previous.server["label_counts"]
        heatmap_stale = previous.server.get("heatmap_stale", False)
        arrays = ArrayRecord({k: Array(v) for k, v in previous.arrays.items()})
    if nodes:  # a deployment: names from the enrolment, each hospital's own budget
        strategy.enrolled = dict(nodes)
        strategy.budgets = {name: cfg.privacy.budget_for(name) for name in nodes.values()}
    else:  # a simulation: any node plays any hospital it is asked to
        strategy.hospitals = [hospital_name(i) for i in range(n)]
        attackers = attack.attackers(cfg, strategy.hospitals)
        if attackers:
            reporter.console.print(f"attack: {', '.join(attackers)} {attack.describe(cfg.attack)}")
        wanted = sampling.seats_needed(n, cfg.federation.fraction_train, cfg.federation.fraction_evaluate)
        strategy.seats = sampling.seats(grid, wanted, cfg.simulation.node_timeout, NO_NODES)

    f = cfg.federation
    # Every hospital trains and evaluates each round: round r's training requests also ask
    # for an evaluation of the model they carry (round r-1's), so a round is one message
    # per hospital, not two; the last round's model is evaluated after the loop. A round's
    # record is written once its model's evaluations are in (`pending` until then).
    merged = strategy.evaluate_with_training = f.fraction_train == 1.0 and f.fraction_evaluate == 1.0
    pending: Pending | None = Pending(**waiting) if waiting else None
    completed = previous.round if previous else 0  # the last round checkpointed
    out.write_status("running", completed, rounds)

    def send(messages: Iterable[Message]) -> list[Message]:
        return exchange(grid, messages, f.round_timeout)

    def evaluated(model_round: int, replies: list[Message]) -> None:
        """Round `model_round`'s model evaluated: its record, if the model moved then."""
        nonlocal pending
        strategy.aggregate_evaluate(model_round, replies)
        if pending is not None and pending.round == model_round:
            record = pending.record(cfg, strategy.log.round(model_round))
            ledger.round_record(record)  # signed first: the audit holds metrics.jsonl to it
            out.append_round(record)
            pending = None

    try:  # until a signal stops the run (`fedmed simulate` takes SIGINT and SIGTERM over)
        for server_round in range(previous.round + 1 if previous else 1, rounds + 1):
            interrupt.check()
            train = strategy.configure_train(server_round, arrays, ConfigRecord(dict(config)), grid)
            if merged and server_round > 1:
                replies = send([*train, *strategy.evaluate_only(server_round - 1, ConfigRecord(dict(config)), grid)])
                evaluated(server_round - 1, replies)  # before this round's training is recorded: the ledger keeps their order
                training = {m.metadata.message_id for m in strategy.asked}
                replies = [m for m in replies if m.metadata.reply_to_message_id in training]
            else:
                replies = send(train)
            aggregated, _ = strategy.aggregate_train(server_round, replies)
            arrays = aggregated if aggregated is not None else arrays

            outcome = strategy.log.round(server_round)
            for site, decline in sorted(outcome.declined.items()):
                reporter.console.print(f"round {server_round}: {site} declined to train: {decline.reason}")
            for site in outcome.dropped:
                reporter.console.print(f"round {server_round}: {site} dropped out (no update); the round goes on without it")
            if _model_moved(strategy, outcome, reporter):
                new = {site: u.metrics[wire.LABEL_COUNTS] for site, u in outcome.trained.items() if site not in label_counts}
                if new:  # hospitals reporting for the first time: (re)write the heterogeneity report
                    label_counts.update(new)
                    rep = heterogeneity.report(label_counts, cfg.data.classes)
                    # Hospitals asked for the first time in later rounds (partial participation):
                    # the report now, its heatmap once the run stops.
                    heterogeneity.write(out, rep, heatmap=server_round == 1)
                    heatmap_stale = heatmap_stale or server_round > 1
                    if server_round == 1:
                        heterogeneity.print_table(reporter.console, rep)
                model.load_state_dict(arrays.to_torch_state_dict())
                last_test = evaluate(model, test_set.x, test_set.y, cfg.train.device)
                took, elapsed = reporter.round_done(server_round, last_test, f"  hospitals {len(outcome.trained) + len(outcome.declined)}/{n}")
                pending = Pending(server_round, took, elapsed, last_test, client_dp.metrics() if client_dp else None)
            if not merged:
                evaluated(server_round, send(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid)))
            checkpoint.save(out, checkpoint.Checkpoint(
                round=server_round,
                config_sha256=cfg.digest(),
                arrays={k: v.numpy() for k, v in arrays.items()},
                strategy=strategy.state(),
                ledger_run=ledger.run_id,
                client_dp=client_dp.state() if client_dp else None,
                server={"last_test": last_test, "label_counts": label_counts, "pending": asdict(pending) if pending else None, "heatmap_stale": heatmap_stale},
            ), ledger.server_key)
            completed = server_round
        if merged:  # the last round's model
            evaluated(rounds, send(strategy.configure_evaluate(rounds, arrays, ConfigRecord(dict(config)), grid)))
    except interrupt.Stop as stop:  # where it stopped, signed; resumable from the last checkpoint
        if heatmap_stale:
            heterogeneity.write(out, heterogeneity.report(label_counts, cfg.data.classes))
        ledger.interrupted(completed, interrupt.signal_name(stop.signum))
        out.write_status("interrupted", completed, rounds, interrupt.signal_name(stop.signum))
        if scalars is not None:
            scalars.close()
        return

    if heatmap_stale:  # every hospital that reported, drawn once
        heterogeneity.write(out, heterogeneity.report(label_counts, cfg.data.classes))
    final = strategy.log.round(rounds).evaluated
    per_hospital = {site: _final_figures(e.metrics) for site, e in sorted(final.items())}
    if cfg.output.save_model:
        out.save_model(arrays.to_torch_state_dict())
    model.load_state_dict(arrays.to_torch_state_dict())
    out.save_scores(predict(model, test_set.x, cfg.train.device), test_set.y.numpy())
    print_classes(reporter.console, last_test, cfg.data.classes)
    spent = privacy_report.table(cfg, strategy.log, client_dp.metrics() if client_dp else None)
    privacy_report.print_table(reporter.console, spent)
    extra: dict[str, Any] = {"privacy": spent} if spent else {}
    if cfg.attack.active:  # never hidden: who attacked, and how
        extra["attack"] = {"kind": cfg.attack.kind, "hospitals": attack.attackers(cfg, strategy.hospitals or sorted(strategy.enrolled.values())), **attack.parameters(cfg.attack)}
    if cfg.data.val_fraction:  # the last round's model on the hospitals' validation splits, pooled
        extra["validation"] = _federated_eval(cfg, strategy.log.round(rounds), wire.VAL_CONFUSION)
    if cfg.personal.method != "none":
        extra["personal"] = {"method": cfg.personal.method, **_personal_gain(per_hospital)}
    out.write_summary(summary(cfg, describe(cfg), last_test, per_hospital, time.time() - started, **extra))
    ledger.end(arrays, rounds, last_test.get("accuracy"))  # binds the files written above
    reporter.console.print(f"run directory: {out.path}")
    key = ledger.server_key
    reporter.console.print(f"ledger keys: {ledger.trust_file} (server key {key.key_id}); audit with `fedmed audit {out.path} --keys {ledger.trust_file}`")
    out.write_status("finished", rounds, rounds)
    if scalars is not None:
        scalars.close()


@dataclass(frozen=True)
class Pending:
    """A round whose model moved, awaiting its evaluations at the hospitals: what its
    record holds besides them (kept in the checkpoint, so a resumed run writes it)."""

    round: int
    took: float
    elapsed: float
    test: dict[str, Any]
    privacy: dict[str, Any] | None  # client-level DP's figures after the round

    def record(self, cfg: FedmedConfig, outcome: RoundOutcome) -> dict[str, Any]:
        return round_record(
            self.round, self.took, self.elapsed, self.test, outcome.hospitals(), federated_eval=_federated_eval(cfg, outcome),
            failures=len(outcome.dropped), dropped=sorted(outcome.dropped), dropped_reasons=dict(sorted(outcome.dropped.items())),
            declined=sorted(outcome.declined), declined_reasons={site: d.reason for site, d in sorted(outcome.declined.items())},
            **({"privacy": self.privacy} if self.privacy is not None else {}),
            **({"selected": outcome.selected} if outcome.selected is not None else {}),
            **({"validation": _federated_eval(cfg, outcome, wire.VAL_CONFUSION)} if cfg.data.val_fraction else {}),
        )


def _final_figures(metrics: dict[str, Any]) -> dict[str, Any]:
    """A hospital's figures for the summary: the global model's on its own test split,
    and its personal model's beside them where the run personalises."""
    out = {"accuracy": metrics[wire.EVAL_ACCURACY], "macro_f1": metrics[wire.EVAL_MACRO_F1]}
    if wire.PERSONAL_ACCURACY in metrics:
        out.update(personal_accuracy=metrics[wire.PERSONAL_ACCURACY], personal_macro_f1=metrics[wire.PERSONAL_MACRO_F1])
    return out


def _personal_gain(per_hospital: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Global against personal accuracy over the hospitals that reported both."""
    both = [h for h in per_hospital.values() if "personal_accuracy" in h]
    if not both:
        return {}
    glob, own = float(np.mean([h["accuracy"] for h in both])), float(np.mean([h["personal_accuracy"] for h in both]))
    return {"hospitals": len(both), "mean_global_accuracy": glob, "mean_personal_accuracy": own, "mean_gain": own - glob}


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Send the round's requests and collect the replies until all are in or `timeout`
    seconds pass. Flower's `send_and_receive` looks for replies every 3 s over a real
    SuperLink, a delay added to every request; this looks again after REPLY_POLL_S[0],
    backing off to REPLY_POLL_S[1] while no reply comes (each look is a request the
    SuperLink serves: a deployed round waits seconds for fresh ClientApp processes), and
    stops (interrupt.Stop) as soon as a signal asks the run to stop."""
    waiting = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    pause, longest = REPLY_POLL_S
    while waiting:
        interrupt.check()  # a signal stops the run: its replies are not waited for
        pulled = list(grid.pull_messages(waiting))
        replies += pulled
        waiting -= {m.metadata.reply_to_message_id for m in pulled}
        if not waiting or time.monotonic() >= deadline:
            break
        pause = REPLY_POLL_S[0] if pulled else min(pause * 1.5, longest)
        time.sleep(pause)
    interrupt.check()  # replies in as the run was stopped may be failures of the Ray actors stopped under them
    return replies


def _strategy(cfg: FedmedConfig, kept: set[str], client_dp: ClientLevelDP | None, ledger: ServerLedger) -> Recording:
    """The configured algorithm, asking the configured share of hospitals each round
    (drawn from the run seed: `sampling`), once `federation.min_hospitals` are connected;
    `kept`: the arrays hospitals keep (FedBN, FedPer)."""
    f = cfg.federation
    return build_strategy(
        cfg,
        kept,
        client_dp,
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        min_available_nodes=f.min_hospitals or cfg.data.hospitals,
        ledger=ledger,
    )


def _model_moved(strategy: Recording, outcome: RoundOutcome, reporter: RoundReporter) -> bool:
    """Whether the round trained the model. Not when every hospital has spent its budget,
    or every hospital asked declined; an error when every one that did not decline failed."""
    if strategy.all_declined:  # every hospital has spent its budget: the model no longer changes
        return False
    if outcome.trained:
        return True
    if not outcome.dropped and outcome.declined:
        reporter.console.print(f"round {outcome.round}: every hospital asked declined; the model stays as it is")
        return False
    reasons = "; ".join(sorted(set(outcome.dropped.values()))) or NO_REPLY
    raise FedmedError(f"round {outcome.round}: no hospital returned an update ({reasons})")


def _federated_eval(cfg: FedmedConfig, outcome: RoundOutcome, key: str = wire.EVAL_CONFUSION) -> dict:
    """The hospitals' evaluations pooled: metrics from their summed confusion matrices (of
    their test splits; `wire.VAL_CONFUSION`: of their validation splits)."""
    if not outcome.federated_eval or key not in outcome.federated_eval:
        return {}
    k = cfg.data.num_classes
    return from_confusion(np.asarray(outcome.federated_eval[key]).reshape(k, k))
