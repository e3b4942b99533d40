"""Hydra sweeps as one MLflow parent run with a child run per job, and a summary on the parent.

    medspark -m model=small_cnn,dense train.lr=1e-3,3e-4                         # 4 jobs, one after another
    medspark -m hydra/launcher=parallel hydra.launcher.n_jobs=2 cluster.cores=1 train.lr=1e-3,3e-4   # 2 at once

`MlflowSweep` is a Hydra callback (registered in conf/config.yaml under hydra.callbacks), so it works with any
sweeper (basic, Optuna) and any launcher (basic, joblib): hooks that run where the sweep is driven, not in the
jobs. on_multirun_start creates the parent run in the configured store and experiment (or adopts the run of
`mlflow run`, when the sweep was launched by one) and exports its id as $MEDSPARK_PARENT_RUN_ID; the jobs
inherit it (in-process with the basic launcher, as worker processes with joblib), and tracking.run() makes
each job's run a child (tag mlflow.parentRunId) in the parent's experiment. on_multirun_end reads the children
back from MLflow and logs on the parent: sweep_summary.md (job overrides, objective, train_seconds, wall
seconds, status), sweep_summary.png (objective and wall time per job), sweep_summary.json, the best objective
as metric best_<objective> and the best run as tag medspark.best_run_id. With tracking.register=auto (the
default) the jobs register nothing and the finished sweep registers its best job, once, and offers it to the
champion (medspark.registry). A sweep that stops early (a failed job with the basic sweeper, Ctrl-C) still gets
its summary, from an exit hook, and the parent ends FAILED (and registers nothing).
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import runs_objective
from .tracking import PARENT_RUN_ENV, SWEEP_PARAMS_ENV

log = logging.getLogger("medspark")
SUMMARY = "sweep_summary"


class MlflowSweep(Callback):
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.parent_id: str | None = None
        self.state: dict[str, Any] = {}

    # ------------------------------------------------------------------ hooks (run in the sweeping process)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        import mlflow
        from mlflow.entities import Param

        from . import tracking
        from .config import project_root

        experiment_id = tracking.configure(config.tracking)
        client = mlflow.MlflowClient()
        overrides = [tracking.mask_text(str(o)) for o in config.hydra.overrides.task]  # never a secret in clear
        swept = [tracking.mask_text(o) for o in swept_overrides(config)]
        tags = {"medspark.sweep": "parent", "medspark.sweep.overrides": " ".join(overrides)[:5000],
                "medspark.sweep.sweeper": str(config.hydra.sweeper.get("_target_", "")),
                "medspark.sweep.launcher": str(config.hydra.launcher.get("_target_", "")),
                "medspark.dataset": str(config.dataset.name)}
        commit = tracking.git_commit(project_root())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        if os.environ.get(PARENT_RUN_ENV):  # a sweep inside something that has a parent already
            tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
        adopted = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run -P overrides="-m ..."`: its run is the parent
        if adopted:
            tracking.use_experiment_of(adopted, "this sweep was launched by `mlflow run` (MLFLOW_RUN_ID)")
            client.update_run(adopted, name=("sweep " + " ".join(swept))[:250])
            for k, v in tags.items():
                client.set_tag(adopted, k, v)
            run = client.get_run(adopted)
        else:
            run = client.create_run(experiment_id, run_name=("sweep " + " ".join(swept))[:250], tags=tags)
        self.parent_id = run.info.run_id
        self.state = {"experiment_id": run.info.experiment_id, "objective": str(config.train.objective),
                      "direction": direction(config), "started": time.time(), "done": False,
                      "uri": mlflow.get_tracking_uri(),
                      "tracking": {k: OmegaConf.select(config, f"tracking.{k}") for k in (
                          "register", "registered_model", "champion_alias", "champion_mode")}}
        client.log_batch(self.parent_id, params=[
            Param(k, str(v)[:6000]) for k, v in {
                "sweep_overrides": " ".join(overrides) or "(none)", "sweep_params": " ".join(swept) or "(none)",
                "sweep_hydra_overrides": tracking.mask_text(" ".join(str(o) for o in config.hydra.overrides.hydra))
                or "(none)",
                "objective": self.state["objective"], "direction": self.state["direction"],
                "launcher": tags["medspark.sweep.launcher"].rsplit(".", 1)[-1],
                "n_jobs": OmegaConf.select(config, "hydra.launcher.n_jobs", default=1)}.items()])
        os.environ[PARENT_RUN_ENV] = self.parent_id
        os.environ[SWEEP_PARAMS_ENV] = " ".join(swept)  # what the jobs are named by (tracking.run_name)
        atexit.register(self._on_exit)
        print(f"medspark sweep: parent MLflow run {self.parent_id} (experiment "
              f"{client.get_experiment(run.info.experiment_id).name}); jobs are its child runs", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled and self.parent_id and not self.state.get("done"):
            self.finish("FINISHED")

    def _on_exit(self) -> None:
        """The sweep raised (the basic sweeper re-raises a failed job after its batch) or was interrupted."""
        if self.parent_id and not self.state.get("done"):
            try:
                self.finish("FAILED")
            except Exception as e:  # never mask the error that ended the sweep
                log.warning("could not write the sweep summary: %s", e)

    # ------------------------------------------------------------------ summary

    def finish(self, status: str) -> dict:
        import mlflow
        from mlflow.entities import Metric, RunTag

        self.state["done"] = True
        os.environ.pop(PARENT_RUN_ENV, None)
        os.environ.pop(SWEEP_PARAMS_ENV, None)
        mlflow.set_tracking_uri(self.state["uri"])
        client = mlflow.MlflowClient()
        children = client.search_runs([self.state["experiment_id"]],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                                      order_by=["attributes.start_time ASC"], max_results=10000)
        objective = runs_objective(self.state["objective"], children)  # train.objective=auto: the jobs' metric
        maximize = self.state["direction"] == "maximize"
        rows = job_rows(children, objective)
        best = best_row(rows, maximize)
        md = table(rows, objective, best)
        now = int(time.time() * 1000)
        metrics = {"sweep_jobs": len(rows), "sweep_jobs_finished": sum(r["status"] == "FINISHED" for r in rows),
                   "sweep_jobs_failed": sum(r["status"] in ("FAILED", "KILLED") for r in rows),
                   "sweep_seconds": time.time() - self.state["started"]}
        tags = {"mlflow.note.content": f"Sweep of {len(rows)} jobs, objective `{objective}` "
                                       f"({self.state['direction']}).\n\n{md}"}
        if best:
            metrics[f"best_{objective}"] = best["objective"]
            tags |= {"medspark.best_run_id": best["run_id"], "medspark.best_overrides": best["overrides"][:5000]}
        client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory(prefix="medspark-sweep-") as tmp:
            (Path(tmp) / f"{SUMMARY}.md").write_text(md)
            (Path(tmp) / f"{SUMMARY}.json").write_text(json.dumps(
                {"objective": objective, "direction": self.state["direction"], "status": status, "best": best,
                 "jobs": rows}, indent=2))
            files = [Path(tmp) / f"{SUMMARY}.md", Path(tmp) / f"{SUMMARY}.json"]
            if rows:
                plot(rows, objective, best, Path(tmp) / f"{SUMMARY}.png")
                files.append(Path(tmp) / f"{SUMMARY}.png")
            for f in files:
                client.log_artifact(self.parent_id, str(f))
        champion = self.register_best(client, status, best, objective)
        client.set_terminated(self.parent_id, status)
        print(f"\n=== medspark sweep {status.lower()}: {len(rows)} jobs, parent run {self.parent_id} ===\n{md}",
              flush=True)
        if best:
            print(f"best {objective} = {best['objective']:.4f}: job {best['job']} ({best['overrides']}), "
                  f"run {best['run_id']}", flush=True)
        if champion:
            print(f"registered: {champion.get('registration', 'no')}; champion {champion.get('champion_uri', '')} "
                  f"{champion['decision']} ({champion['reason']})", flush=True)
        return {"rows": rows, "best": best, "champion": champion}

    def register_best(self, client, status: str, best: dict | None, objective: str) -> dict | None:
        """tracking.register=auto: the jobs registered nothing; a finished sweep registers its best job, once, and
        offers it to the champion (medspark.registry.register_run). The decision goes on the parent run as tags
        medspark.registration and medspark.champion. None when there is nothing to do (always, never, no name)."""
        from mlflow.entities import RunTag

        from . import registry

        tracking = self.state.get("tracking") or {}
        if (tracking.get("register") or "auto") != "auto" or not tracking.get("registered_model"):
            return None
        if not best or status != "FINISHED":
            decision = {"decision": "skipped", "reason": "no finished job with a finite objective" if not best else
                        f"the sweep did not finish ({status}): nothing registered"}
        else:
            from mlflow.exceptions import MlflowException

            try:
                decision = registry.register_run(client, best["run_id"], tracking, objective, best["objective"])
            except MlflowException as e:  # the sweep's results stand; only the registration failed
                log.warning("could not register the best job's models: %s", e)
                decision = {"decision": "error", "reason": f"{type(e).__name__}: {e}"[:500]}
        tags = {"medspark.registration": decision.get("registration", f"not registered: {decision['reason']}"),
                registry.TAG: decision["decision"], f"{registry.TAG}.reason": decision["reason"]}
        client.log_batch(self.parent_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
        return decision


def swept_overrides(config: DictConfig) -> list[str]:
    """What the sweep varies: the command line's sweep overrides (a,b / range / choice / interval) plus an
    Optuna-style hydra.sweeper.params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
    out = [o.input_line for o in parsed if o.is_sweep_override()]
    params = OmegaConf.select(config, "hydra.sweeper.params")
    if params:
        out += [f"{k}={v}" for k, v in params.items()]
    return out


def direction(config: DictConfig) -> str:
    """maximize or minimize train.objective: the Optuna sweeper's setting, else tracking.champion_mode, else
    from the name (a loss is minimized)."""
    d = OmegaConf.select(config, "hydra.sweeper.direction")
    d = getattr(d, "name", d)  # the Optuna sweeper stores an Enum (a list for multi-objective: not used here)
    if d in ("maximize", "minimize"):
        return d
    mode = OmegaConf.select(config, "tracking.champion_mode")
    if mode in ("max", "min"):
        return "maximize" if mode == "max" else "minimize"
    return "minimize" if "loss" in str(config.train.objective) else "maximize"


def job_rows(children, objective: str) -> list[dict]:
    """One row per child run, in job order; `overrides` keeps what differs between jobs (all when nothing does)."""
    def job_key(r):
        j = r.data.tags.get("medspark.job", "")
        return (int(j) if j.isdigit() else 10 ** 9, r.info.start_time)

    children = sorted(children, key=job_key)
    words = [r.data.tags.get("medspark.overrides", "").split() for r in children]
    common = set.intersection(*map(set, words)) if len(words) > 1 else set()
    rows = []
    for r, w in zip(children, words):
        m, end = r.data.metrics, r.info.end_time
        rows.append({"job": r.data.tags.get("medspark.job", str(len(rows))), "run_id": r.info.run_id,
                     "overrides": " ".join(x for x in w if x not in common) or " ".join(w) or "(none)",
                     "objective": m.get(objective, float("nan")), "train_seconds": m.get("train_seconds", float("nan")),
                     "wall_seconds": (end - r.info.start_time) / 1000 if end else float("nan"),
                     "status": r.info.status})
    return rows


def best_row(rows: list[dict], maximize: bool) -> dict | None:
    ok = [r for r in rows if r["status"] == "FINISHED" and math.isfinite(r["objective"])]
    if not ok:
        return None
    return (max if maximize else min)(ok, key=lambda r: r["objective"])


def table(rows: list[dict], objective: str, best: dict | None) -> str:
    def num(v, fmt):
        return fmt.format(v) if isinstance(v, float) and math.isfinite(v) else "-"

    lines = [f"| job | overrides | {objective} | train_seconds | wall_seconds | status | run |",
             "|---:|---|---:|---:|---:|---|---|"]
    for r in rows:
        obj = num(r["objective"], "{:.4f}")
        if best and r["run_id"] == best["run_id"]:
            obj = f"**{obj}**"
        overrides = r["overrides"].replace("|", "\\|")
        lines.append(f"| {r['job']} | `{overrides}` | {obj} | {num(r['train_seconds'], '{:.1f}')} | "
                     f"{num(r['wall_seconds'], '{:.1f}')} | {r['status']} | {r['run_id'][:8]} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], objective: str, best: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['job']}: {r['overrides']}" for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(rows) + 4), 4.5))
    colors = ["tab:orange" if best and r["run_id"] == best["run_id"] else
              ("tab:blue" if r["status"] == "FINISHED" else "tab:red") for r in rows]
    ax1.bar(x, [r["objective"] if math.isfinite(r["objective"]) else 0 for r in rows], color=colors)
    ax1.set_title(f"{objective} per job (orange: best, red: not finished)")
    ax2.bar(x, [r["wall_seconds"] if math.isfinite(r["wall_seconds"]) else 0 for r in rows], color="lightgray",
            label="whole job (run start to end)")
    ax2.bar(x, [r["train_seconds"] if math.isfinite(r["train_seconds"]) else 0 for r in rows], width=0.5,
            color="tab:blue", label="train_seconds")
    ax2.set_title("wall time per job (s)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
