"""MLflow tracking for pipeline stages: one MLflow run per DVC stage execution.

Where runs go: `MLFLOW_TRACKING_URI` if set, else `tracking.uri` from params.yaml, else an
embedded SQLite store `<project root>/mlflow.db` with artifacts in `<project root>/mlartifacts`.
The project root is the DVC repository root. `dvc exp run --temp` and queued experiments run
in throwaway copies under `<root>/.dvc/tmp/exps/`; a store there would be deleted with the copy,
so the root always resolves to the original project (DVC also exports it as `DVC_ROOT`).

What a stage run records (see `StageRun`): the flattened config as params (and in full as
the artifact resolved_config.json), step metrics, final (summary) metrics under their own
names, artifacts, and these tags:
    tinyworlds.stage           the stage name
    tinyworlds.datasets        comma-separated dataset names
    tinyworlds.git_commit      commit of the code (also mlflow.source.git.commit)
    tinyworlds.pipeline_run    one id per `dvc repro` / `dvc exp run` invocation
    tinyworlds.dvc_experiment  DVC experiment name, under `dvc exp run`
    tinyworlds.final_metrics   which metrics are the final ones (what `tinyworlds runs` shows)
The stages of one pipeline run are children of one parent run (tagged tinyworlds.parent),
so the MLflow UI shows them grouped.

Modules: `store` (where), `lineage` (who), `flatten` (params), `run` (the stage run), `report`
(`tinyworlds runs`), `tags`. mlflow is imported inside functions: importing it takes about a second.
"""
